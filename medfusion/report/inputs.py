"""Reading the batch's outputs and the labels file, defensively.

``scores.csv`` (written by ``medfusion score``) has ``study_id``, ``prob_<label>`` (one per
label, in model order) and optional columns (``status``, ``raw_prob_*``, ``entropy``,
``prediction_set``, ``abstain``, ...). Missing optional columns only switch report sections
off. ``labels.csv`` has ``study_id``, ``label`` and optional ``patient_id`` and subgroup
columns. Anything that makes a report impossible raises :class:`ReportInputError` with a
stable code; nothing read here is ever echoed back except column names, label names and
counts (study ids of the batch are already pseudonymous keys; ``patient_id`` is only used to
group the bootstrap).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import ReportInputError

# Above this a CSV is surely not a scores/labels table (and would exhaust memory).
MAX_TABLE_BYTES = 2 * 1024**3
MAX_JSON_BYTES = 64 * 1024**2
# A status that means "this row holds no usable prediction".
_FAILED_STATUS = {"failed", "failure", "error", "skipped", "timeout", "budget_exceeded"}
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def _read_csv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV; a clear error when it is absent, empty or not text."""
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(
            f"the {what} file was not found; pass the path of an existing CSV",
            code="REPORT_FILE_MISSING",
        )
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise ReportInputError(
            f"the {what} file is larger than {MAX_TABLE_BYTES >> 30} GiB; it is not a table "
            "medfusion wrote",
            code="REPORT_BAD_TABLE",
        )
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = []
            for raw in reader:
                if None in raw:  # more cells than header columns
                    raise ReportInputError(
                        f"the {what} file has a row with more cells than header columns "
                        f"(line {reader.line_num}); fix the CSV quoting",
                        code="REPORT_BAD_TABLE",
                    )
                rows.append({k.strip(): (v or "").strip() for k, v in raw.items()})
    except UnicodeDecodeError:
        raise ReportInputError(
            f"the {what} file is not UTF-8 text; save it as UTF-8 CSV",
            code="REPORT_BAD_TABLE",
        ) from None
    except csv.Error as error:
        raise ReportInputError(
            f"the {what} file is not a valid CSV ({error}); fix the quoting",
            code="REPORT_BAD_TABLE",
        ) from None
    except OSError as error:
        raise ReportInputError(
            f"the {what} file cannot be read ({error.strerror}); check its permissions",
            code="REPORT_FILE_UNREADABLE",
        ) from None
    if not header:
        raise ReportInputError(
            f"the {what} file is empty (no header row)", code="REPORT_BAD_TABLE"
        )
    dupes = [h for h, c in Counter(header).items() if c > 1]
    if dupes:
        raise ReportInputError(
            f"the {what} file repeats column(s) {sorted(dupes)}; keep one of each",
            code="REPORT_BAD_TABLE",
        )
    return header, rows


def _float(text: str) -> float:
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def _unique_ids(rows: list[dict[str, str]], what: str) -> list[str]:
    ids = [r.get("study_id", "") for r in rows]
    counts = Counter(i for i in ids if i)
    dupes = sum(1 for c in counts.values() if c > 1)
    if dupes:
        raise ReportInputError(
            f"{dupes} study_id value(s) appear more than once in the {what} file; keep one row "
            "per study",
            code="REPORT_DUPLICATE_ID",
        )
    return ids


@dataclass
class Scores:
    """The usable rows of a scores.csv."""

    labels: tuple[str, ...]
    study_ids: list[str]
    probs: np.ndarray
    columns: list[str]
    n_rows: int
    n_unusable: int
    entropy: np.ndarray | None = None
    prediction_sets: list[frozenset[int] | None] | None = None
    abstain: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def read_scores(path: Path, *, what: str = "scores") -> Scores:
    """Parse scores.csv: label order from the ``prob_<label>`` columns."""
    header, rows = _read_csv(path, what)
    if "study_id" not in header:
        raise ReportInputError(
            f"the {what} file has no study_id column; pass the scores.csv written by "
            "`medfusion score`",
            code="REPORT_MISSING_COLUMN",
        )
    labels = tuple(h[len("prob_") :] for h in header if h.startswith("prob_"))
    if len(labels) < 2:
        raise ReportInputError(
            f"the {what} file needs one prob_<label> column per label (found {len(labels)}); "
            "pass the scores.csv written by `medfusion score`",
            code="REPORT_MISSING_COLUMN",
        )
    _unique_ids(rows, what)
    notes: list[str] = []
    keep_ids: list[str] = []
    keep_rows: list[dict[str, str]] = []
    prob_rows: list[list[float]] = []
    unusable = 0
    for row in rows:
        status = row.get("status", "").lower()
        values = [_float(row.get(f"prob_{lab}", "")) for lab in labels]
        if not row.get("study_id") or status in _FAILED_STATUS or not all(
            math.isfinite(v) for v in values
        ):
            unusable += 1
            continue
        keep_ids.append(row["study_id"])
        keep_rows.append(row)
        prob_rows.append(values)
    probs = np.asarray(prob_rows, dtype=np.float64).reshape(-1, len(labels))
    if probs.size and (probs.min() < -1e-6 or probs.max() > 1 + 1e-6):
        raise ReportInputError(
            f"the {what} file has prob_ values outside [0, 1]; the report needs probabilities, "
            "not logits",
            code="REPORT_BAD_VALUE",
        )
    probs = np.clip(probs, 0.0, 1.0)
    if probs.size:
        sums = probs.sum(axis=1)
        off = int(np.sum(np.abs(sums - 1.0) > 1e-3))
        if off:
            notes.append(
                f"{what}: {off} row(s) have probabilities that do not sum to 1 (within 0.001); "
                "used as given."
            )
    if unusable:
        notes.append(f"{what}: {unusable} row(s) without a usable prediction were left out.")
    scores = Scores(
        labels=labels,
        study_ids=keep_ids,
        probs=probs,
        columns=header,
        n_rows=len(rows),
        n_unusable=unusable,
        notes=notes,
    )
    if "entropy" in header:
        ent = np.asarray([_float(r.get("entropy", "")) for r in keep_rows], dtype=np.float64)
        scores.entropy = ent if np.all(np.isfinite(ent)) else None
        if scores.entropy is None and len(ent):
            notes.append(f"{what}: entropy column incomplete; risk-coverage by entropy skipped.")
    if "prediction_set" in header:
        index = {lab: k for k, lab in enumerate(labels)}
        sets: list[frozenset[int] | None] = []
        unknown = 0
        for r in keep_rows:
            text = r.get("prediction_set", "")
            members = [m for m in text.split("|") if m] if text else []
            if any(m not in index for m in members):
                unknown += 1
                sets.append(None)
            else:
                sets.append(frozenset(index[m] for m in members))
        if unknown:
            notes.append(
                f"{what}: {unknown} prediction_set value(s) name unknown labels; left out of "
                "the conformal summary."
            )
        scores.prediction_sets = sets
    if "abstain" in header:
        flags = [r.get("abstain", "").lower() for r in keep_rows]
        if all(f in _TRUE or f in _FALSE for f in flags):
            scores.abstain = np.asarray([f in _TRUE for f in flags], dtype=bool)
        else:
            notes.append(f"{what}: abstain column is not true/false; abstention skipped.")
    return scores


@dataclass
class Labels:
    """Ground truth per study id, plus optional patient ids and subgroup columns."""

    truth: dict[str, int]
    patients: dict[str, str]
    subgroups: dict[str, dict[str, str]]
    n_rows: int
    n_missing_label: int
    columns: list[str]


def _label_mapping(values: set[str], labels: Sequence[str]) -> dict[str, int]:
    """How label cells map to class indices: exact label names first; failing that, class
    indices 0..K-1; for two classes also true/false (true = the second label)."""
    by_name = {lab: k for k, lab in enumerate(labels)}
    folded = {lab.lower(): k for k, lab in enumerate(labels)}
    mapping: dict[str, int] = {}
    unmatched = set()
    for v in values:
        if v in by_name:
            mapping[v] = by_name[v]
        elif v.lower() in folded:
            mapping[v] = folded[v.lower()]
        else:
            unmatched.add(v)
    if unmatched and not mapping:
        as_index: dict[str, int] = {}
        for v in unmatched:
            number = _float(v)
            if math.isfinite(number) and number.is_integer() and 0 <= int(number) < len(labels):
                as_index[v] = int(number)
        if len(as_index) == len(unmatched):
            return as_index
        if len(labels) == 2 and all(v.lower() in {"true", "false"} for v in unmatched):
            return {v: int(v.lower() == "true") for v in unmatched}
    if unmatched:
        shown = sorted(unmatched)[:5]
        raise ReportInputError(
            f"labels.csv has {len(unmatched)} label value(s) the model does not know "
            f"(e.g. {shown}); use the model's label names {list(labels)} or class indices "
            f"0..{len(labels) - 1}",
            code="REPORT_UNKNOWN_LABEL",
        )
    return mapping


def read_labels(path: Path, labels: Sequence[str], subgroups: Sequence[str]) -> Labels:
    """Parse labels.csv against the model's label names."""
    header, rows = _read_csv(path, "labels")
    missing = [c for c in ("study_id", "label") if c not in header]
    if missing:
        raise ReportInputError(
            f"labels.csv lacks column(s) {missing}; it needs study_id and label (optional: "
            "patient_id and subgroup columns)",
            code="REPORT_MISSING_COLUMN",
        )
    absent = [s for s in subgroups if s not in header]
    if absent:
        available = [c for c in header if c not in ("study_id", "label", "patient_id")]
        raise ReportInputError(
            f"subgroup column(s) {absent} are not in labels.csv (available: {available})",
            code="REPORT_MISSING_COLUMN",
        )
    if "patient_id" in subgroups:
        raise ReportInputError(
            "patient_id cannot be a subgroup column (it identifies patients); choose another",
            code="REPORT_BAD_VALUE",
        )
    _unique_ids(rows, "labels")
    rows = [r for r in rows if r.get("study_id")]
    mapping = _label_mapping({r["label"] for r in rows if r["label"] != ""}, labels)
    truth: dict[str, int] = {}
    patients: dict[str, str] = {}
    groups: dict[str, dict[str, str]] = {s: {} for s in subgroups}
    n_missing = 0
    for r in rows:
        sid = r["study_id"]
        if r["label"] == "":
            n_missing += 1
            continue
        truth[sid] = mapping[r["label"]]
        if r.get("patient_id"):
            patients[sid] = r["patient_id"]
        for s in subgroups:
            groups[s][sid] = r.get(s, "") or "(missing)"
    return Labels(
        truth=truth,
        patients=patients,
        subgroups=groups,
        n_rows=len(rows),
        n_missing_label=n_missing,
        columns=header,
    )


def read_failures(path: Path) -> dict[str, Any] | None:
    """Counts of failures.csv by code and stage (None when the file is absent)."""
    if not Path(path).is_file():
        return None
    header, rows = _read_csv(path, "failures")
    codes = Counter(r.get("code", "") or "(none)" for r in rows)
    stages = Counter(r.get("stage", "") or "(none)" for r in rows)
    ids = {r.get("study_id", "") for r in rows if r.get("study_id")}
    return {
        "n": len(rows),
        "n_studies": len(ids),
        "by_code": dict(sorted(codes.items())),
        "by_stage": dict(sorted(stages.items())),
        "study_ids": ids,
    }


def read_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object from disk (None when absent); a clear error when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ReportInputError(f"{what} is implausibly large", code="REPORT_BAD_TABLE")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ReportInputError(
            f"{what} cannot be read ({error.strerror}); check its permissions",
            code="REPORT_FILE_UNREADABLE",
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ReportInputError(
            f"{what} is not valid JSON; pass the file written by medfusion",
            code="REPORT_BAD_TABLE",
        ) from None
    if not isinstance(data, dict):
        raise ReportInputError(f"{what} must hold a JSON object", code="REPORT_BAD_TABLE")
    return data


def card_sha256(card: dict[str, Any]) -> str:
    """The model card digest the batch records in run.json (sorted-key JSON, SHA-256)."""
    return hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def find_key(data: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in nested dicts/lists."""
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            if k == key:
                found.append(v)
            found.extend(find_key(v, key))
    elif isinstance(data, list):
        for v in data:
            found.extend(find_key(v, key))
    return found


def safe_child(base: Path, *parts: str) -> Path | None:
    """``base/parts`` if it resolves inside ``base`` (no ``..`` or symlink escape), else None."""
    base_real = os.path.realpath(base)
    target = os.path.realpath(os.path.join(base_real, *parts))
    if os.path.commonpath([target, base_real]) != base_real or target == base_real:
        return None
    return Path(target)
