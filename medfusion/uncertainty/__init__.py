"""Calibration (temperature scaling), epistemic uncertainty (MC dropout, deep ensembles) and
split-conformal prediction sets. See docs/trust.md for how to read each number."""

from __future__ import annotations

from medfusion.uncertainty.calibration import (
    TemperatureScaler,
    expected_calibration_error,
    softmax,
)
from medfusion.uncertainty.conformal import ConformalPredictor, empirical_coverage
from medfusion.uncertainty.metrics import (
    mutual_information,
    predictive_entropy,
    probability_std,
    summarize_members,
)

__all__ = [
    "ConformalPredictor",
    "TemperatureScaler",
    "empirical_coverage",
    "expected_calibration_error",
    "mutual_information",
    "predictive_entropy",
    "probability_std",
    "softmax",
    "summarize_members",
]
