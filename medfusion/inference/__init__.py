"""Prediction: a loaded model package (:class:`FusionModel`), studies prepared for it, its
calibrated predictions with uncertainty, conformal sets, out-of-distribution and
input-domain flags, explanations on request, and the one predictions table every command
writes (:mod:`medfusion.inference.table`). See docs/architecture.md."""

from __future__ import annotations

from medfusion.inference.manifest import predict_columns, predict_manifest
from medfusion.inference.model import FusionModel
from medfusion.inference.prepared import PreparedInputs, stack_prepared
from medfusion.inference.table import fmt_float, prediction_columns, prediction_row
from medfusion.inference.trust import TrustOutputs, trust_outputs

__all__ = [
    "FusionModel",
    "PreparedInputs",
    "TrustOutputs",
    "fmt_float",
    "predict_columns",
    "predict_manifest",
    "prediction_columns",
    "prediction_row",
    "stack_prepared",
    "trust_outputs",
]
