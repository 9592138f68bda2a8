"""Everything the batch writes, written so that a kill at any moment leaves no partial file.

* ``journal.jsonl`` is the source of truth: one JSON line per finished study, appended and
  fsync'ed before the study counts as done. A torn last line (killed mid-write) is dropped
  and truncated away on resume.
* ``scores.csv`` / ``failures.csv`` / ``run.json`` are snapshots rebuilt from the journal and
  swapped in atomically (temp file, fsync, ``os.replace``).
* saliency of one study is written into a temporary folder under ``OUT/saliency`` and renamed
  into place in one step, before the study's journal line.

Rows are formatted once (fixed column order, ``%.6f`` floats) and stored as strings in the
journal, so rebuilding is byte-exact whatever the order in which studies finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medfusion.errors import OutputError, UnsafePathError
from medfusion.io.keys import pseudonym

JOURNAL = "journal.jsonl"
SCORES = "scores.csv"
FAILURES = "failures.csv"
RUN_JSON = "run.json"
SALIENCY = "saliency"
FAILURE_COLUMNS = ("study_id", "stage", "code", "message")
FLOAT_FORMAT = "%.6f"

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def fmt_float(value: float | None) -> str:
    """Fixed float format; empty for missing (never ``nan`` text in a CSV)."""
    if value is None:
        return ""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        return ""
    text = FLOAT_FORMAT % value
    return "0.000000" if text == "-0.000000" else text  # one spelling of zero


def score_columns(
    labels: Sequence[str],
    roles: Sequence[str],
    explain: bool,
    *,
    modalities: Sequence[str] | None = None,
) -> list[str]:
    """The fixed column order of scores.csv for a model (documented in docs/scoring.md).

    ``weight_<m>`` runs over the model's modalities (imaging roles, then ``clinical`` when
    the model has a clinical branch); ``saliency_<role>`` over imaging roles."""
    cols = ["study_id", "status", "predicted"]
    cols += [f"prob_{label}" for label in labels]
    cols += [f"raw_prob_{label}" for label in labels]
    cols += ["entropy", "mutual_info", "prediction_set", "abstain", "modalities_used"]
    cols += [f"weight_{m}" for m in (roles if modalities is None else modalities)]
    cols += ["flags"]
    if explain:
        cols += [f"saliency_{role}" for role in roles]
    return cols


def safe_component(name: str, *, prefix: str = "k-") -> str:
    """``name`` if it is a harmless single path component, else its pseudonym (F4)."""
    if _SAFE_COMPONENT.match(name) and name not in {".", ".."}:
        return name
    return pseudonym(name, prefix=prefix)


def path_under(base: str | os.PathLike[str], *parts: str) -> Path:
    """``base/parts...`` after checking the result stays inside ``base`` (F4)."""
    base_real = os.path.realpath(base)
    target = os.path.realpath(os.path.join(base_real, *parts))
    if os.path.commonpath([target, base_real]) != base_real or target == base_real:
        raise UnsafePathError("refused to write outside the output folder")
    return Path(target)


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buf.getvalue()


def prepare_output_dir(out_dir: str | os.PathLike[str], *, resume: bool) -> Path:
    """Create/validate OUT before any scoring (E3): writable, with free space, and empty
    unless resuming. Raises :class:`OutputError` (exit 1) otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the output folder ({error.strerror}); choose a writable --out",
            code="OUTPUT_UNWRITABLE",
        ) from None
    if not out.is_dir():
        raise OutputError("--out exists and is not a folder", code="OUTPUT_UNWRITABLE")
    existing = [p.name for p in out.iterdir()]
    if existing and not resume:
        raise OutputError(
            "the output folder is not empty; pass --resume to continue an interrupted run "
            "there, or choose an empty --out",
            code="OUTPUT_NOT_EMPTY",
        )
    # A real write + fsync probe: catches read-only mounts, permissions and a full disk.
    probe = out / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * (1 << 20))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OutputError(
            f"cannot write to the output folder ({error.strerror}); free some space or "
            "choose a writable --out",
            code="OUTPUT_UNWRITABLE",
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    for stale in out.glob("*.tmp-*"):  # half-written snapshots of a killed run
        stale.unlink(missing_ok=True)
    sal = out / SALIENCY
    if sal.is_dir():  # saliency of a study killed half-way through writing
        shutil.rmtree(sal / ".staging", ignore_errors=True)
    return out


class Journal:
    """Append-only record of finished studies (one JSON object per line, fsync'ed).

    The first line is a header holding the run's configuration; resuming with a different
    model or options is refused rather than mixing rows of two configurations.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.header: dict[str, Any] | None = None
        self.records: dict[str, dict[str, Any]] = {}
        self._handle: io.BufferedWriter | None = None

    def load(self) -> None:
        """Read an existing journal, dropping (and truncating away) a torn last line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        for raw in data[:good].splitlines():
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a torn line that happened to end in a newline byte
            if "header" in record:
                self.header = record["header"]
            elif "study_id" in record:
                self.records[record["study_id"]] = record
        if good != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())

    def open(self, header: dict[str, Any]) -> None:
        """Open for appending; write ``header`` unless the journal already has one."""
        if self.header is not None and self.header != header:
            raise OutputError(
                "--resume found a run made with another model or other options "
                "(see run.json); resume with the same options or choose an empty --out",
                code="RESUME_MISMATCH",
            )
        self._handle = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
        if self.header is None:
            self.header = header
            self._append({"header": header})

    def _append(self, record: Mapping[str, Any]) -> None:
        assert self._handle is not None
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        try:
            self._handle.write(line.encode("utf-8"))
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise OutputError(
                f"writing the journal failed ({error.strerror}); free space, then run again "
                "with --resume",
                code="OUTPUT_WRITE_FAILED",
            ) from None

    def add(self, record: dict[str, Any]) -> None:
        """Record one finished study durably."""
        self._append(record)
        self.records[record["study_id"]] = record

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def rebuild_tables(out: Path, journal: Journal, columns: Sequence[str]) -> tuple[int, int]:
    """Rewrite scores.csv and failures.csv from the journal (sorted, atomic)."""
    scored = []
    failed = []
    for study_id in sorted(journal.records):
        record = journal.records[study_id]
        if record["status"] == "scored":
            scored.append(record["row"])
        else:
            failed.append(record["failure"])
    atomic_write_text(out / SCORES, csv_text(columns, scored))
    atomic_write_text(out / FAILURES, csv_text(FAILURE_COLUMNS, failed))
    return len(scored), len(failed)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
