"""Input validation shared by the uncertainty estimators (numpy in, numpy out)."""

from __future__ import annotations

from typing import Any

import numpy as np

from medfusion.errors import CalibrationError


def as_numpy(values: Any) -> np.ndarray:
    """A float64 numpy copy of an array-like or a (possibly grad-tracking) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def check_scores(values: Any, name: str, *, ndim: int = 2, min_classes: int = 2) -> np.ndarray:
    """Validate a (..., N, C) float array: right rank, at least two classes, all finite."""
    array = as_numpy(values)
    if array.ndim != ndim:
        raise CalibrationError(
            f"{name} must have {ndim} dimensions (got shape {array.shape}); "
            "pass one row per study and one column per class."
        )
    if array.shape[-1] < min_classes:
        raise CalibrationError(
            f"{name} has {array.shape[-1]} class column(s); at least {min_classes} are needed "
            "(use two columns for a binary task)."
        )
    if array.shape[-2] == 0:
        raise CalibrationError(f"{name} is empty; pass at least one study.")
    if not np.all(np.isfinite(array)):
        raise CalibrationError(f"{name} contains NaN or Inf; fix the model outputs first.")
    return array


def check_labels(y: Any, n: int, n_classes: int) -> np.ndarray:
    """Validate integer labels in [0, n_classes) with one label per row."""
    labels = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise CalibrationError(
            f"labels must be a 1-D array of length {n} (got shape {labels.shape})."
        )
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise CalibrationError("labels must be integer class indices, not probabilities.")
    elif labels.dtype.kind not in "iub":
        raise CalibrationError(
            f"labels must be integer class indices (got dtype {labels.dtype}); "
            "map label names to indices first."
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise CalibrationError(
            f"labels must lie in [0, {n_classes - 1}] (got {labels.min()}..{labels.max()})."
        )
    return labels


def check_probabilities(values: Any, name: str, *, ndim: int = 2) -> np.ndarray:
    """Validate class probabilities: finite, in [0, 1], rows summing to 1."""
    probs = check_scores(values, name, ndim=ndim)
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise CalibrationError(
            f"{name} must be probabilities in [0, 1]; apply softmax to logits first."
        )
    if not np.allclose(probs.sum(axis=-1), 1.0, atol=1e-4):
        raise CalibrationError(f"{name} rows must sum to 1; apply softmax to logits first.")
    return np.clip(probs, 0.0, 1.0)


def check_alpha(alpha: float) -> float:
    """The miscoverage level must lie strictly between 0 and 1."""
    try:
        value = float(alpha)
    except (TypeError, ValueError) as error:
        raise CalibrationError(f"alpha must be a number in (0, 1), got {alpha!r}.") from error
    if not 0.0 < value < 1.0:
        raise CalibrationError(f"alpha must lie in (0, 1) (e.g. 0.1 for 90% sets), got {value}.")
    return value
