"""Entropy, mutual information and probability spread on hand-checkable member outputs."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.errors import CalibrationError
from medfusion.uncertainty import (
    mutual_information,
    predictive_entropy,
    probability_std,
    summarize_members,
)


def test_entropy_bounds() -> None:
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    h = predictive_entropy(p)
    assert h[0] == pytest.approx(0.0, abs=1e-9)
    assert h[1] == pytest.approx(np.log(2))
    assert 0 < h[2] < np.log(2)


def test_mutual_information_separates_disagreement_from_ambiguity() -> None:
    # study 0: every member says 50/50 (aleatoric); study 1: members disagree confidently
    members = np.array(
        [
            [[0.5, 0.5], [0.99, 0.01]],
            [[0.5, 0.5], [0.01, 0.99]],
        ]
    )
    mi = mutual_information(members)
    h = predictive_entropy(members)
    assert h[0] == pytest.approx(h[1], abs=1e-9)  # same total uncertainty
    assert mi[0] == pytest.approx(0.0, abs=1e-9)
    assert mi[1] > 0.5
    np.testing.assert_allclose(probability_std(members)[:, 0], [0.0, 0.49])
    summary = summarize_members(members)
    np.testing.assert_allclose(summary["prob_std"], [0.0, 0.49])
    np.testing.assert_allclose(summary["probs"], [[0.5, 0.5], [0.5, 0.5]])


def test_refuses_non_probabilities() -> None:
    with pytest.raises(CalibrationError):
        mutual_information(np.ones((2, 3, 2)))
    with pytest.raises(CalibrationError):
        predictive_entropy(np.array([[0.2, 0.2]]))
    with pytest.raises(CalibrationError):
        probability_std(np.array([[0.5, 0.5]]))
