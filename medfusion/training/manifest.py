"""Manifest CSV reading, validation and patient-grouped splits.

A manifest has one row per study: ``study_id`` (unique), ``label`` (a recipe label name),
optional ``patient_id`` and ``split`` (train / val / test), one column per imaging role of
the recipe holding a path relative to the manifest (empty = that modality is missing), and
the recipe's clinical columns. Error messages name the CSV line and column, never a value
that could identify a patient.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import ManifestError
from medfusion.training.recipe import Recipe

SPLITS = ("train", "val", "test")
_MISSING = {"", "na", "n/a", "nan", "none", "null"}


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row. ``line`` is the 1-based CSV line (for messages)."""

    line: int
    study_id: str
    label: int | None
    patient_id: str
    split: str | None
    paths: dict[str, Path | None]
    clinical: dict[str, Any] | None


def _err(message: str) -> ManifestError:
    return ManifestError(message + " See docs/training.md for the manifest contract.")


def parse_clinical_value(raw: Any, kind: str) -> Any:
    """A manifest/CSV cell as a clinical value: None when missing, float for numeric."""
    if raw is None:
        return None
    if isinstance(raw, float) and math.isnan(raw):
        return None
    text = str(raw).strip()
    if text.lower() in _MISSING:
        return None
    if kind == "numeric":
        value = float(text)  # ValueError handled by callers with a line/column message
        if not math.isfinite(value):
            return None
        return value
    return text


def read_manifest(path: str | Path, recipe: Recipe, *, require_labels: bool = True,
                  require_columns: bool = True) -> list[ManifestRow]:
    """Read and validate ``path`` against ``recipe``.

    Raises :class:`ManifestError` (code ``MANIFEST``) on: a missing file or column, a
    duplicate or empty study_id, a label outside ``recipe.labels``, a bad split value, an
    image path that does not exist (paths are resolved relative to the manifest's folder),
    or a non-numeric value in a numeric clinical column. With ``require_columns=False``
    (prediction), absent role / clinical columns mean "missing for every study".
    """
    path = Path(path)
    if not path.is_file():
        raise _err("Manifest CSV not found: pass the path of a CSV file.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw_rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _err(f"Manifest could not be read as a UTF-8 CSV ({type(exc).__name__}).") from None
    required = ["study_id"] + (["label"] if require_labels else [])
    if require_columns:
        required += list(recipe.roles) + list(recipe.clinical)
    missing = [c for c in required if c not in columns]
    if missing:
        raise _err(f"Manifest lacks column(s) {missing}; it needs study_id, label, one column per "
                   "imaging role of the recipe and every clinical column of the recipe.")
    if not raw_rows:
        raise _err("Manifest has no rows.")
    base = path.resolve().parent
    label_index = {name: i for i, name in enumerate(recipe.labels)}
    seen: set[str] = set()
    rows: list[ManifestRow] = []
    for offset, raw in enumerate(raw_rows):
        line = offset + 2  # header is line 1
        study_id = (raw.get("study_id") or "").strip()
        if not study_id:
            raise _err(f"Line {line}: empty study_id.")
        if study_id in seen:
            raise _err(f"Line {line}: duplicate study_id; every study_id must be unique.")
        seen.add(study_id)
        label: int | None = None
        label_raw = (raw.get("label") or "").strip()
        if require_labels or label_raw:
            if label_raw not in label_index:
                raise _err(f"Line {line}: label is not one of the recipe labels "
                           f"{list(recipe.labels)}.")
            label = label_index[label_raw]
        split_raw = (raw.get("split") or "").strip().lower()
        if split_raw and split_raw not in SPLITS:
            raise _err(f"Line {line}: split must be one of {list(SPLITS)} or empty.")
        patient = (raw.get("patient_id") or "").strip() or f"study:{study_id}"
        paths: dict[str, Path | None] = {}
        for role in recipe.roles:
            cell = (raw.get(role) or "").strip()
            if not cell:
                paths[role] = None
                continue
            target = Path(cell)
            target = target if target.is_absolute() else base / target
            if not target.exists():
                raise _err(f"Line {line}, column `{role}`: the path does not exist (paths are "
                           "relative to the manifest's folder).")
            paths[role] = target
        clinical: dict[str, Any] | None = None
        if recipe.clinical:
            clinical = {}
            for column, spec in recipe.clinical.items():
                try:
                    clinical[column] = parse_clinical_value(raw.get(column), spec["type"])
                except ValueError:
                    raise _err(f"Line {line}, column `{column}`: expected a number "
                               "(or empty for missing).") from None
        rows.append(ManifestRow(line, study_id, label, patient, split_raw or None, paths,
                                clinical))
    return rows


def _grouped_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
                     ) -> np.ndarray:
    """Boolean mask of a stratified, patient-grouped holdout of about ``fraction``."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if fraction <= 0 or n_groups < 2:
        return np.zeros(len(labels), dtype=bool)
    n_splits = max(2, min(n_groups, int(round(1.0 / fraction))))
    counts = Counter(labels.tolist())
    if min(counts.values()) >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, hold = next(iter(splitter.split(np.zeros(len(labels)), labels, groups)))
    else:
        # Too few studies of a class to stratify: a plain grouped split still never leaks.
        gss = GroupShuffleSplit(n_splits=1, test_size=1.0 / n_splits, random_state=seed)
        _, hold = next(iter(gss.split(np.zeros(len(labels)), labels, groups)))
    mask = np.zeros(len(labels), dtype=bool)
    mask[hold] = True
    return mask


def assign_splits(rows: Sequence[ManifestRow], *, val_fraction: float, test_fraction: float,
                  seed: int = 0) -> list[str]:
    """The split of every row: the manifest's ``split`` where given, else a stratified split
    grouped by ``patient_id`` (a patient's studies always land on one side).

    Rows without a split inherit their patient's given split. A patient given two different
    splits raises :class:`ManifestError`. When no row ends up in ``val``, a validation set is
    carved out of ``train`` (grouped too).
    """
    patient_split: dict[str, str] = {}
    for row in rows:
        if row.split is None:
            continue
        previous = patient_split.setdefault(row.patient_id, row.split)
        if previous != row.split:
            raise _err(f"Line {row.line}: this patient already has studies in split "
                       f"`{previous}`; one patient must never be on both sides of a split.")
    splits: list[str | None] = [patient_split.get(r.patient_id) for r in rows]
    labels = np.array([-1 if r.label is None else r.label for r in rows])
    groups = np.array([r.patient_id for r in rows])

    auto = np.array([s is None for s in splits])
    if auto.any():
        idx = np.flatnonzero(auto)
        # A test split is only carved when the manifest gives none.
        want_test = test_fraction if "test" not in patient_split.values() else 0.0
        test_mask = _grouped_holdout(labels[idx], groups[idx], want_test, seed)
        for i in idx[test_mask]:
            splits[i] = "test"
        rest = idx[~test_mask]
        frac = val_fraction / max(1e-9, 1.0 - want_test)
        val_mask = _grouped_holdout(labels[rest], groups[rest], frac, seed + 1)
        for i, is_val in zip(rest, val_mask, strict=False):
            splits[i] = "val" if is_val else "train"
    if "val" not in splits:
        idx = np.array([i for i, s in enumerate(splits) if s == "train"])
        if len(idx):
            val_mask = _grouped_holdout(labels[idx], groups[idx], val_fraction, seed + 2)
            for i in idx[val_mask]:
                splits[i] = "val"
    final = [s or "train" for s in splits]
    if "train" not in final:
        raise _err("No study is in the training split: mark some rows split=train or leave "
                   "`split` empty.")
    return final
