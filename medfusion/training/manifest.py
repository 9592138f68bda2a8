"""Manifest CSV reading, validation and patient-grouped splits.

A manifest has one row per study: ``study_id`` (unique), ``label`` (a recipe label name),
optional ``patient_id`` and ``split`` (train / val / test), one column per imaging role of
the recipe holding a path relative to the manifest (empty = that modality is missing), and
the recipe's clinical columns. Error messages name the CSV line and column, never a value
that could identify a patient.

Clinical cells are read by :mod:`medfusion.io.clinical` (its missing-value vocabulary, unit
headers such as ``weight[lb]``, ranges and levels), so training, ``predict`` and ``score``
agree on what a cell means.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import ClinicalSchemaError, ManifestError
from medfusion.io.clinical import ClinicalSchema, match_clinical_columns, validate_value
from medfusion.training.recipe import Recipe

SPLITS = ("train", "val", "test")
_RESERVED = ("study_id", "label", "patient_id", "split")


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row. ``line`` is the 1-based CSV line (for messages).

    ``clinical_error`` (prediction only): why this row's clinical cells are invalid (line and
    column, never the value); the study is then not scored. ``clinical_absent``: recipe
    clinical columns the manifest lacks, accepted as missing on request.
    """

    line: int
    study_id: str
    label: int | None
    patient_id: str
    split: str | None
    paths: dict[str, Path | None]
    clinical: dict[str, Any] | None
    clinical_error: str | None = None
    clinical_absent: tuple[str, ...] = ()


def _err(message: str) -> ManifestError:
    return ManifestError(message + " See docs/training.md for the manifest contract.")


def read_manifest(path: str | Path, recipe: Recipe, *, require_labels: bool = True,
                  require_columns: bool = True, allow_missing_clinical: bool = False,
                  bad_clinical: str = "raise") -> list[ManifestRow]:
    """Read and validate ``path`` against ``recipe``.

    Raises :class:`ManifestError` (code ``MANIFEST``) on: a missing file or column, a
    duplicate or empty study_id, a label outside ``recipe.labels``, a bad split value, an
    image path that does not exist (paths are resolved relative to the manifest's folder),
    or an invalid clinical cell (not a number, out of range, unknown level). With
    ``require_columns=False`` (prediction), absent role columns mean "modality missing for
    every study"; an absent clinical column is refused (``CLINICAL_SCHEMA``) unless
    ``allow_missing_clinical`` (then each row lists it in ``clinical_absent``). A clinical
    column spelled differently from the recipe (``Age`` for ``age``) is always refused
    (``CLINICAL_SCHEMA``). ``bad_clinical="row"`` (prediction) records an invalid clinical
    cell in that row's ``clinical_error`` instead of refusing the file.
    """
    if bad_clinical not in ("raise", "row"):
        raise ValueError("bad_clinical must be 'raise' or 'row'")
    path = Path(path)
    if not path.is_file():
        raise _err("Manifest CSV not found: pass the path of a CSV file.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            columns = [c.strip() for c in next(reader, [])]
            # (CSV line, cells); blank lines are skipped but still counted.
            raw_rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _err(f"Manifest could not be read as a UTF-8 CSV ({type(exc).__name__}).") from None
    required = ["study_id"] + (["label"] if require_labels else [])
    if require_columns:
        required += list(recipe.roles)
    missing = [c for c in required if c not in columns]
    match = None
    if recipe.clinical:
        # A re-spelled clinical column is refused before anything else; a plain absent one
        # joins the other missing columns for training, and needs the opt-in to predict.
        match = match_clinical_columns(
            columns, ClinicalSchema.from_dict(recipe.clinical),
            skip=(*_RESERVED, *recipe.roles),
            allow_missing=allow_missing_clinical or require_columns, source="the manifest",
        )
        if require_columns:
            missing += list(match.absent)
    if missing:
        raise _err(f"Manifest lacks column(s) {missing}; it needs study_id, label, one column per "
                   "imaging role of the recipe and every clinical column of the recipe.")
    if not raw_rows:
        raise _err("Manifest has no rows.")
    base = path.resolve().parent
    label_index = {name: i for i, name in enumerate(recipe.labels)}
    seen: set[str] = set()
    rows: list[ManifestRow] = []
    for line, cells in raw_rows:
        raw = dict(zip(columns, cells, strict=False))
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
        clinical_error: str | None = None
        if match is not None:
            clinical = dict.fromkeys(recipe.clinical)
            for idx, (var, conversion) in match.plan.items():
                cell = cells[idx] if idx < len(cells) else None
                try:
                    clinical[var.name] = validate_value(
                        var, cell, f"Line {line}, column `{columns[idx]}`", conversion)
                except ClinicalSchemaError as exc:
                    if bad_clinical == "raise":
                        # Training data must be clean: the whole manifest is refused.
                        raise _err(exc.message.split(" See docs/")[0]) from None
                    clinical_error = clinical_error or exc.message
        rows.append(ManifestRow(line, study_id, label, patient, split_raw or None, paths,
                                clinical, clinical_error,
                                match.absent if match is not None else ()))
    return rows


def grouped_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
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
        test_mask = grouped_holdout(labels[idx], groups[idx], want_test, seed)
        for i in idx[test_mask]:
            splits[i] = "test"
        rest = idx[~test_mask]
        frac = val_fraction / max(1e-9, 1.0 - want_test)
        val_mask = grouped_holdout(labels[rest], groups[rest], frac, seed + 1)
        for i, is_val in zip(rest, val_mask, strict=False):
            splits[i] = "val" if is_val else "train"
    if "val" not in splits:
        idx = np.array([i for i, s in enumerate(splits) if s == "train"])
        if len(idx):
            val_mask = grouped_holdout(labels[idx], groups[idx], val_fraction, seed + 2)
            for i in idx[val_mask]:
                splits[i] = "val"
    final = [s or "train" for s in splits]
    if "train" not in final:
        raise _err("No study is in the training split: mark some rows split=train or leave "
                   "`split` empty.")
    return final
