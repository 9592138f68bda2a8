"""Temperature scaling: recovers a planted temperature, never changes the predicted class."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.errors import CalibrationError, MedfusionError
from medfusion.uncertainty import TemperatureScaler, expected_calibration_error, softmax


def _planted(n: int, n_classes: int, temperature: float, seed: int):
    """Labels drawn from softmax(z): z is perfectly calibrated, z * T is over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, n_classes))
    p = softmax(z)
    y = np.array([rng.choice(n_classes, p=row) for row in p])
    return z * temperature, y


@pytest.mark.parametrize(("planted", "n_classes"), [(2.5, 3), (0.6, 2), (1.7, 5)])
def test_recovers_planted_temperature_within_10_percent(planted: float, n_classes: int) -> None:
    logits, y = _planted(4000, n_classes, planted, seed=1)
    scaler = TemperatureScaler().fit(logits, y)
    assert abs(scaler.temperature - planted) / planted < 0.10
    # calibration must actually improve the calibration error of an over/under-confident model
    assert expected_calibration_error(scaler.transform(logits), y) < expected_calibration_error(
        softmax(logits), y
    )


def test_never_changes_the_predicted_class() -> None:
    logits, y = _planted(500, 4, 3.0, seed=2)
    scaler = TemperatureScaler().fit(logits, y)
    rng = np.random.default_rng(3)
    test_logits = rng.normal(0.0, 5.0, size=(1000, 4))
    probs = scaler.transform(test_logits)
    np.testing.assert_array_equal(probs.argmax(axis=1), test_logits.argmax(axis=1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_fit_is_deterministic_and_round_trips() -> None:
    logits, y = _planted(800, 3, 2.0, seed=4)
    a = TemperatureScaler().fit(logits, y).temperature
    b = TemperatureScaler().fit(logits.copy(), y.copy()).temperature
    assert a == b
    restored = TemperatureScaler.from_dict(TemperatureScaler().fit(logits, y).to_dict())
    assert restored.temperature == a


def test_separable_validation_keeps_t_equal_to_one() -> None:
    """Perfectly separated validation logits have no finite NLL optimum (T -> 0)."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, size=40)
    logits = np.zeros((40, 2))
    logits[np.arange(40), y] = rng.uniform(2.0, 6.0, size=40)
    scaler = TemperatureScaler().fit(logits, y)
    assert scaler.temperature == 1.0 and scaler.to_dict()["separable"] is True


def test_accepts_torch_tensors() -> None:
    import torch

    logits, y = _planted(300, 2, 2.0, seed=5)
    scaler = TemperatureScaler().fit(torch.tensor(logits, requires_grad=True), torch.tensor(y))
    assert scaler.transform(torch.tensor(logits)).shape == (300, 2)


@pytest.mark.parametrize(
    ("logits", "y"),
    [
        (np.zeros((4, 1)), np.zeros(4, dtype=int)),  # one class column
        (np.zeros((4, 2)), np.array([0, 1, 2, 0])),  # label out of range
        (np.zeros((4, 2)), np.array([0, 1])),  # length mismatch
        (np.array([[0.0, np.nan]] * 4), np.zeros(4, dtype=int)),  # NaN
        (np.zeros(4), np.zeros(4, dtype=int)),  # wrong rank
        (np.zeros((4, 2)), np.array([0.5, 1, 0, 1])),  # non-integer labels
    ],
)
def test_bad_input_raises_calibration_error(logits: np.ndarray, y: np.ndarray) -> None:
    with pytest.raises(CalibrationError) as info:
        TemperatureScaler().fit(logits, y)
    assert isinstance(info.value, MedfusionError) and info.value.code == "CALIBRATION"


def test_unfitted_and_bad_state_are_refused() -> None:
    with pytest.raises(CalibrationError):
        TemperatureScaler().transform(np.zeros((2, 2)))
    with pytest.raises(CalibrationError):
        TemperatureScaler.from_dict({"temperature": -1.0})
    with pytest.raises(CalibrationError):
        TemperatureScaler.from_dict({})
