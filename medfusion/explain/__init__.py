"""Explanations: Grad-CAM per imaging modality on the source grid, modality Shapley values,
clinical attributions, and sanity checks. See docs/trust.md."""

from __future__ import annotations

import importlib
from typing import Any

from medfusion.explain.api import explain_prediction
from medfusion.explain.attribution import clinical_attributions, modality_shapley
from medfusion.explain.export import saliency_to_source, write_explanation
from medfusion.explain.gradcam import role_cam, target_layer

# The sanity checks import scipy.stats (seconds of start-up); scoring never runs them, so
# they load on first use (PEP 562) rather than with every `medfusion score`.
_LAZY = {"deletion_auc", "random_deletion_auc", "randomization_check", "rank_correlation"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("medfusion.explain.sanity"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "clinical_attributions",
    "deletion_auc",
    "explain_prediction",
    "modality_shapley",
    "random_deletion_auc",
    "randomization_check",
    "rank_correlation",
    "role_cam",
    "saliency_to_source",
    "target_layer",
    "write_explanation",
]
