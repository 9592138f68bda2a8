"""Calibration (temperature scaling, with a per-class offset when cross-validation prefers
it), epistemic uncertainty (MC dropout, deep ensembles), out-of-distribution screening
(feature-statistics shift) and split-conformal prediction sets.
See docs/trust.md for how to read each number."""

from __future__ import annotations

from medfusion.uncertainty.calibration import (
    LogitScaler,
    TemperatureScaler,
    expected_calibration_error,
    fit_calibration,
    softmax,
)
from medfusion.uncertainty.conformal import ConformalPredictor, empirical_coverage
from medfusion.uncertainty.mc import dropout_only, ensemble_probs, mc_dropout_probs
from medfusion.uncertainty.metrics import (
    mutual_information,
    predictive_entropy,
    probability_std,
    summarize_members,
)
from medfusion.uncertainty.shift import feature_shift

__all__ = [
    "ConformalPredictor",
    "LogitScaler",
    "TemperatureScaler",
    "dropout_only",
    "empirical_coverage",
    "ensemble_probs",
    "expected_calibration_error",
    "feature_shift",
    "fit_calibration",
    "mc_dropout_probs",
    "mutual_information",
    "predictive_entropy",
    "probability_std",
    "softmax",
    "summarize_members",
]
