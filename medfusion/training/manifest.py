"""Manifests for training: the recipe's view of a manifest, and patient-grouped splits.

The CSV itself is read and validated by :mod:`medfusion.io.manifest` (also used by
prediction); this module reads it against a recipe and assigns train / val / test splits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfusion.io.manifest import SPLITS, ManifestRow, manifest_error, read_manifest_rows
from medfusion.training.recipe import Recipe

__all__ = ["SPLITS", "ManifestRow", "assign_splits", "grouped_holdout", "read_manifest"]


def read_manifest(path: str | Path, recipe: Recipe, *, require_labels: bool = True,
                  require_columns: bool = True, allow_missing_clinical: bool = False,
                  bad_clinical: str = "raise") -> list[ManifestRow]:
    """Read and validate ``path`` against ``recipe`` (its roles, labels and clinical
    schema); see :func:`medfusion.io.manifest.read_manifest_rows` for every rule."""
    return read_manifest_rows(
        path, roles=recipe.roles, labels=recipe.labels, clinical=recipe.clinical or None,
        require_labels=require_labels, require_columns=require_columns,
        allow_missing_clinical=allow_missing_clinical, bad_clinical=bad_clinical,
        text_roles=recipe.text_roles)


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
            raise manifest_error(f"Line {row.line}: this patient already has studies in split "
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
        raise manifest_error("No study is in the training split: mark some rows split=train "
                             "or leave `split` empty.")
    return final
