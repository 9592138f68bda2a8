"""Everything the batch writes, written so that a kill at any moment leaves no partial file.

* ``journal.jsonl`` is the source of truth: one JSON line per finished study, appended and
  fsync'ed before the study counts as done. A torn last line (killed mid-write) is dropped
  and truncated away on resume.
* ``scores.csv`` / ``failures.csv`` / ``run.json`` are snapshots rebuilt from the journal and
  swapped in atomically (temp file, fsync, ``os.replace``).
* saliency of one study is written into a temporary folder under ``OUT/saliency`` and renamed
  into place in one step, before the study's journal line.

Rows are formatted once (by :mod:`medfusion.inference.table`) and stored as strings in the
journal, so rebuilding is byte-exact whatever the order in which studies finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfusion.atomic import atomic_open, ensure_output_dir, write_text
from medfusion.errors import OutputError, UnsafePathError
from medfusion.inference.table import prediction_columns
from medfusion.keys import safe_component

__all__ = ["safe_component", "score_columns"]

JOURNAL = "journal.jsonl"
SCORES = "scores.csv"
FAILURES = "failures.csv"
RUN_JSON = "run.json"
SALIENCY = "saliency"
FAILURE_COLUMNS = ("study_id", "stage", "code", "message")


def score_columns(
    labels: Sequence[str],
    roles: Sequence[str],
    explain: bool,
    *,
    modalities: Sequence[str] | None = None,
) -> list[str]:
    """The column order of scores.csv for a model (documented in docs/scoring.md): the
    predictions table of :mod:`medfusion.inference.table` (Shapley values with
    ``explain``), with ``status`` after ``study_id`` and, with ``explain``,
    ``saliency_<role>`` over imaging roles at the end."""
    shared = prediction_columns(labels, roles if modalities is None else modalities,
                                shapley=explain)
    cols = [shared[0], "status", *shared[1:]]
    if explain:
        cols += [f"saliency_{role}" for role in roles]
    return cols


def path_under(base: str | os.PathLike[str], *parts: str) -> Path:
    """``base/parts...`` after checking the result stays inside ``base``."""
    base_real = os.path.realpath(base)
    target = os.path.realpath(os.path.join(base_real, *parts))
    if os.path.commonpath([target, base_real]) != base_real or target == base_real:
        raise UnsafePathError("refused to write outside the output folder")
    return Path(target)


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buf.getvalue()


def prepare_output_dir(out_dir: str | os.PathLike[str], *, resume: bool) -> Path:
    """Create/validate OUT before any scoring: writable, with free space, and empty
    unless resuming. Raises :class:`OutputError` (exit 1) otherwise."""
    out = ensure_output_dir(out_dir)
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


@dataclass(frozen=True)
class Entry:
    """What the journal keeps in memory per finished study: where its line is, and the few
    fields the totals need. Rows stay on disk, so memory does not grow with row size."""

    offset: int
    length: int
    key: str
    status: str
    code: str | None
    skipped_files: int
    unsafe_links: int


class Journal:
    """Append-only record of finished studies (one JSON object per line, fsync'ed).

    The first line is a header holding the run's configuration; resuming with a different
    model or options is refused rather than mixing rows of two configurations. Only a
    small :class:`Entry` per study is held in memory; :meth:`get` reads a record back.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.header: dict[str, Any] | None = None
        self.entries: dict[str, Entry] = {}
        self._handle: io.BufferedRandom | None = None

    def _index(self, record: Mapping[str, Any], offset: int, length: int) -> None:
        self.entries[record["study_id"]] = Entry(
            offset=offset, length=length, key=str(record.get("key") or ""),
            status=str(record["status"]), code=record.get("code"),
            skipped_files=int(record.get("skipped_files") or 0),
            unsafe_links=int(record.get("unsafe_links") or 0),
        )

    def load(self) -> None:
        """Read an existing journal, dropping (and truncating away) a torn last line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        offset = 0
        for raw in data[:good].splitlines(keepends=True):
            length = len(raw)
            try:
                record = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                record = {}  # a torn line that happened to end in a newline byte
            if "header" in record:
                self.header = record["header"]
            elif "study_id" in record and "status" in record:
                self._index(record, offset, length)
            offset += length
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
        mode = "r+b" if self.path.exists() else "w+b"
        self._handle = open(self.path, mode)  # noqa: SIM115 - kept open for the run
        if self.header is None:
            self.header = header
            self._append({"header": header})

    def _append(self, record: Mapping[str, Any]) -> tuple[int, int]:
        assert self._handle is not None
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        try:
            offset = self._handle.seek(0, os.SEEK_END)
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise OutputError(
                f"writing the journal failed ({error.strerror}); free space, then run again "
                "with --resume",
                code="OUTPUT_WRITE_FAILED",
            ) from None
        return offset, len(line)

    def add(self, record: dict[str, Any]) -> None:
        """Record one finished study durably."""
        offset, length = self._append(record)
        self._index(record, offset, length)

    def get(self, study_id: str) -> dict[str, Any]:
        """The full record of a finished study, read back from the journal file."""
        entry = self.entries[study_id]
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            return json.loads(handle.read(entry.length))

    def iter_sorted(self) -> Iterator[dict[str, Any]]:
        """Every record in ``study_id`` order, streamed from disk."""
        with open(self.path, "rb") as handle:
            for study_id in sorted(self.entries):
                entry = self.entries[study_id]
                handle.seek(entry.offset)
                yield json.loads(handle.read(entry.length))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def atomic_write_rows(
    path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, str]]
) -> int:
    """Stream rows into ``path`` atomically (temp file, fsync, rename); returns the count."""
    n = 0
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
            n += 1
    return n


def rebuild_tables(out: Path, journal: Journal, columns: Sequence[str]) -> tuple[int, int]:
    """Rewrite scores.csv and failures.csv from the journal (sorted, streamed, atomic)."""
    ok = (r["row"] for r in journal.iter_sorted() if r["status"] == "scored")
    n_ok = atomic_write_rows(out / SCORES, columns, ok)
    bad = (r["failure"] for r in journal.iter_sorted() if r["status"] != "scored")
    n_bad = atomic_write_rows(out / FAILURES, FAILURE_COLUMNS, bad)
    return n_ok, n_bad


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
