"""Small numeric helpers shared by every layer (numpy only; torch tensors are accepted)."""

from __future__ import annotations

from typing import Any

import numpy as np


def softmax(logits: Any) -> np.ndarray:
    """Numerically stable softmax over the last axis, as float64.

    The one softmax of the package: calibration, MC dropout and prediction must turn the
    same logits into the same probabilities, to the last bit."""
    if hasattr(logits, "detach"):
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
