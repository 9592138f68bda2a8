"""Split conformal sets: coverage >= 1 - alpha - 0.02 over repeated splits; agrees with crepes."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.errors import CalibrationError
from medfusion.uncertainty import ConformalPredictor, empirical_coverage, softmax
from medfusion.uncertainty.conformal import nonconformity


def _population(n: int, seed: int, n_classes: int = 3):
    """A noisy classifier: probabilities from logits that only partly know the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    logits = rng.normal(0.0, 1.0, size=(n, n_classes))
    logits[np.arange(n), y] += 1.2
    # a miscalibrated model: sharpen, so naive top-class sets would under-cover
    return softmax(3.0 * logits), y


@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("class_conditional", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_coverage_over_repeated_splits(method: str, class_conditional: bool, alpha: float) -> None:
    probs, y = _population(3000, seed=0)
    rng = np.random.default_rng(1)
    coverages, per_class = [], []
    for _ in range(20):
        perm = rng.permutation(len(y))
        cal, test = perm[:300], perm[300:]
        cp = ConformalPredictor(method, class_conditional).fit(probs[cal], y[cal])
        sets = cp.prediction_sets(probs[test], alpha=alpha)
        coverages.append(empirical_coverage(sets, y[test]))
        y_test = y[test]
        per_class.append(
            [
                empirical_coverage([s for s, t in zip(sets, y_test, strict=True) if t == c],
                                   y_test[y_test == c])
                for c in range(3)
            ]
        )
    assert np.mean(coverages) >= 1 - alpha - 0.02
    if class_conditional:  # Mondrian sets cover within every class, on average over splits
        assert np.mean(per_class, axis=0).min() >= 1 - alpha - 0.02
    # the sets must be informative, not the trivial all-class set
    assert np.mean([len(s) for s in sets]) < 2.9


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_matches_crepes_p_values(method: str) -> None:
    """Independent check of the threshold rule: crepes' non-smoothed conformal p-values."""
    crepes = pytest.importorskip("crepes")
    probs, y = _population(600, seed=2)
    cal_p, cal_y, test_p = probs[:200], y[:200], probs[200:]
    ours = ConformalPredictor(method, nonempty=False).fit(cal_p, cal_y)
    nonempty = ConformalPredictor(method).fit(cal_p, cal_y)
    cal_scores = nonconformity(cal_p, method)[np.arange(200), cal_y]
    reference = crepes.ConformalClassifier().fit(cal_scores)
    for alpha in (0.05, 0.1, 0.3):
        expected = reference.predict_set(
            nonconformity(test_p, method), confidence=1 - alpha, smoothing=False
        )
        got = np.zeros_like(expected)
        for i, s in enumerate(ours.prediction_sets(test_p, alpha=alpha)):
            got[i, list(s)] = 1
        np.testing.assert_array_equal(got, expected)
        # Non-empty sets: crepes' set plus the predicted class, never empty.
        plus = expected.copy()
        plus[np.arange(len(test_p)), test_p.argmax(axis=1)] = 1
        got = np.zeros_like(expected)
        for i, s in enumerate(nonempty.prediction_sets(test_p, alpha=alpha)):
            got[i, list(s)] = 1
        np.testing.assert_array_equal(got, plus)
        assert got.sum(axis=1).min() >= 1


def test_separable_calibration_never_gives_an_empty_set() -> None:
    """A calibration split the model separates perfectly gives a tiny LAC threshold; a test
    study that is slightly less certain must still get its predicted class."""
    cal = np.array([[0.999, 0.001], [0.001, 0.999]] * 20)
    y = np.array([0, 1] * 20)
    test = np.array([[0.99, 0.01], [0.02, 0.98]])
    plain = ConformalPredictor("lac", nonempty=False).fit(cal, y).prediction_sets(test, 0.1)
    assert plain == [(), ()]
    sets = ConformalPredictor("lac").fit(cal, y).prediction_sets(test, 0.1)
    assert sets == [(0,), (1,)]
    old = ConformalPredictor.from_dict({**ConformalPredictor("lac").fit(cal, y).to_dict(),
                                        "nonempty": False})
    assert old.prediction_sets(test, 0.1) == [(), ()]


def test_alpha_is_chosen_at_prediction_time_and_state_round_trips() -> None:
    probs, y = _population(1000, seed=3)
    cp = ConformalPredictor("aps", class_conditional=True).fit(probs[:400], y[:400])
    restored = ConformalPredictor.from_dict(cp.to_dict())
    wide = restored.prediction_sets(probs[400:], alpha=0.05)
    narrow = restored.prediction_sets(probs[400:], alpha=0.3)
    assert wide == cp.prediction_sets(probs[400:], alpha=0.05)
    assert all(set(n) <= set(w) for n, w in zip(narrow, wide, strict=True))
    assert sum(map(len, narrow)) < sum(map(len, wide))
    # sets are ordered by decreasing probability: the first member is the argmax when present
    for s, p in zip(wide, probs[400:], strict=True):
        assert s == tuple(sorted(s, key=lambda c: -p[c]))


def test_tiny_calibration_set_gives_the_full_set() -> None:
    probs, y = _population(5, seed=4)
    sets = ConformalPredictor().fit(probs, y).prediction_sets(probs, alpha=0.1)
    assert all(s == tuple(sorted(s)) or len(s) == 3 for s in sets)
    assert all(len(s) == 3 for s in sets)  # (n+1)(1-alpha) > n: no finite threshold


def test_bad_input_is_refused() -> None:
    probs, y = _population(50, seed=5)
    with pytest.raises(CalibrationError):
        ConformalPredictor("raps")
    with pytest.raises(CalibrationError):
        ConformalPredictor().prediction_sets(probs)
    cp = ConformalPredictor().fit(probs, y)
    for alpha in (0.0, 1.0, -0.1, "x"):
        with pytest.raises(CalibrationError):
            cp.prediction_sets(probs, alpha=alpha)
    with pytest.raises(CalibrationError):
        cp.prediction_sets(probs[:, :2] / probs[:, :2].sum(1, keepdims=True))
    with pytest.raises(CalibrationError):
        ConformalPredictor().fit(probs * 2, y)  # not probabilities
    with pytest.raises(CalibrationError):
        ConformalPredictor.from_dict({"method": "lac"})
