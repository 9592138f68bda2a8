"""Explanations: Grad-CAM per imaging modality on the source grid, modality Shapley values,
clinical attributions, and sanity checks. See docs/trust.md."""

from __future__ import annotations

from medfusion.explain.api import explain_prediction
from medfusion.explain.attribution import clinical_attributions, modality_shapley
from medfusion.explain.export import saliency_to_source, write_explanation
from medfusion.explain.gradcam import role_cam, target_layer
from medfusion.explain.sanity import (
    deletion_auc,
    random_deletion_auc,
    randomization_check,
    rank_correlation,
)

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
