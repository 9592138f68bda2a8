"""Report metrics against independent references: scikit-learn, scipy, brute force and
published values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from medfusion.report import metrics as M


def _binary(n: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = rng.normal(0, 1, n) + shift * y
    return y, special.expit(score)


# --- Wilson ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Newcombe (1998) Stat Med 17:857, Table I, method 3 (Wilson score), 4 decimals.
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
     (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    got = M.wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=6e-5)


def test_wilson_closed_form_and_edges() -> None:
    z = 1.959963984540054
    k, n = 37, 91
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert M.wilson_interval(k, n) == pytest.approx((centre - half, centre + half), rel=1e-12)
    low, high = M.wilson_interval(20, 20)
    assert high == 1.0 and 0.8 < low < 1.0
    assert all(math.isnan(v) for v in M.wilson_interval(0, 0))
    block = M.proportion(3, 4)
    assert block["value"] == 0.75 and block["numerator"] == 3 and block["denominator"] == 4


# --- DeLong ------------------------------------------------------------------------------
def _brute_force_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) directly from the O(m*n) Mann-Whitney kernel."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    aucs = psi.mean(axis=(1, 2))
    v10 = psi.mean(axis=2)  # per positive
    v01 = psi.mean(axis=1)  # per negative
    cov = np.cov(v10) / m + np.cov(v01) / n
    return aucs, np.atleast_2d(cov)


def test_delong_equals_brute_force_mann_whitney_variance() -> None:
    y, p1 = _binary(157, 1)
    _, p2 = _binary(157, 2, shift=0.4)
    p1 = np.round(p1, 2)  # ties exercise the midranks
    scores = np.vstack([p1, p2])
    aucs, cov = M.delong_covariance(y, scores)
    ref_aucs, ref_cov = _brute_force_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)
    assert aucs[0] == pytest.approx(roc_auc_score(y, p1), rel=1e-12)
    test = M.delong_paired_test(y, p1, p2)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert test["se"] == pytest.approx(math.sqrt(var), rel=1e-10)
    assert 0.0 <= test["p_value"] <= 1.0


def test_delong_on_the_hanley_mcneil_ct_ratings() -> None:
    # Hanley & McNeil (1982) Radiology 143:29, Table 1: 5-point CT ratings of 58 normal and
    # 51 abnormal patients; published AUC 0.893 (their approximate SE 0.032).
    neg = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    pos = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.zeros(58, int), np.ones(51, int)]
    out = M.delong_auc(y, np.r_[neg, pos].astype(float))
    assert round(out["value"], 3) == 0.893
    assert out["se"] == pytest.approx(0.032, abs=0.002)
    assert out["ci_low"] < out["value"] < out["ci_high"]


def test_delong_interval_agrees_with_patient_bootstrap_on_a_large_sample() -> None:
    y, p = _binary(4000, 3)
    delong = M.delong_auc(y, p)
    ranked = M._Ranked.of(y.astype(float), p)
    reps = np.concatenate(
        [M.weighted_auroc(ranked, w) for w in M.bootstrap_weights(np.arange(len(y)), 1000, 7)]
    )
    low, high, valid = M.percentile_interval(reps)
    assert valid == 1000
    assert abs(low - delong["ci_low"]) < 0.01 and abs(high - delong["ci_high"]) < 0.01


def test_paired_test_of_identical_scores_shows_no_difference() -> None:
    y, p = _binary(80, 4)
    test = M.delong_paired_test(y, p, p)
    assert test["difference"] == 0.0 and test["p_value"] == 1.0


def test_one_class_gives_nan_not_an_exception() -> None:
    out = M.delong_auc(np.ones(10, int), np.linspace(0, 1, 10))
    assert math.isnan(out["value"]) and math.isnan(out["se"])
    assert math.isnan(M.delong_paired_test(np.zeros(5, int), np.ones(5), np.ones(5))["p_value"])


# --- vectorised bootstrap statistics -----------------------------------------------------
def test_weighted_auroc_and_ap_equal_sklearn_with_sample_weights() -> None:
    y, p = _binary(300, 5)
    p = np.round(p, 2)
    ranked = M._Ranked.of(y.astype(float), p)
    rng = np.random.default_rng(0)
    w = np.vstack([np.ones(len(y)), rng.integers(0, 4, size=(3, len(y)))]).astype(float)
    auc = M.weighted_auroc(ranked, w)
    ap = M.weighted_average_precision(ranked, w)
    for row in range(len(w)):
        assert auc[row] == pytest.approx(roc_auc_score(y, p, sample_weight=w[row]), rel=1e-12)
        assert ap[row] == pytest.approx(
            average_precision_score(y, p, sample_weight=w[row]), rel=1e-12
        )


def test_bootstrap_resamples_whole_patients() -> None:
    clusters = np.array([0, 0, 0, 1, 2, 2])
    for w in M.bootstrap_weights(clusters, 50, 0, chunk=16):
        assert w.shape[1] == 6
        # studies of one patient always share a weight; total patients drawn = 3
        assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 1] == w[:, 2])
        assert np.all(w[:, [0, 3, 4]].sum(axis=1) == 3)


def test_weighted_ece_with_unit_weights_equals_ece() -> None:
    y, p = _binary(500, 6)
    ece, _ = M.expected_calibration_error(y, p)
    assert M.weighted_ece(y.astype(float), p, np.ones((1, len(y))))[0] == pytest.approx(ece)


# --- calibration -------------------------------------------------------------------------
def test_ece_and_adaptive_ece_against_a_plain_loop() -> None:
    y, p = _binary(777, 8)
    ece, table = M.expected_calibration_error(y, p, 10)
    ref = 0.0
    for b in range(10):
        sel = (p >= b / 10) & (p < (b + 1) / 10) if b < 9 else (p >= 0.9)
        if sel.any():
            ref += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    assert ece == pytest.approx(ref, rel=1e-10)
    assert sum(row["n"] for row in table) == len(y)
    order = np.argsort(p, kind="mergesort")
    ref_ace = sum(len(g) / len(y) * abs(p[g].mean() - y[g].mean())
                  for g in np.array_split(order, 10))
    assert M.adaptive_calibration_error(y, p) == pytest.approx(ref_ace, rel=1e-10)


def test_calibration_slope_matches_unpenalised_sklearn_fit() -> None:
    rng = np.random.default_rng(9)
    p = rng.uniform(0.02, 0.98, 3000)
    # outcomes drawn from a miscalibrated truth: logit(true) = 0.3 + 0.6 logit(p)
    y = (rng.uniform(size=p.size) < special.expit(0.3 + 0.6 * special.logit(p))).astype(int)
    fit = M.calibration_fit(y, p)
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000)
    ref.fit(special.logit(p)[:, None], y)
    assert fit["slope"] == pytest.approx(ref.coef_[0, 0], abs=1e-4)
    assert fit["intercept"] == pytest.approx(ref.intercept_[0], abs=1e-4)
    assert 0.5 < fit["slope"] < 0.7


def test_calibration_slope_near_one_when_calibrated_and_nan_when_separated() -> None:
    rng = np.random.default_rng(10)
    p = rng.uniform(0.01, 0.99, 5000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    fit = M.calibration_fit(y, p)
    assert abs(fit["slope"] - 1) < 0.1 and abs(fit["intercept_slope1"]) < 0.1
    separated = M.calibration_fit(np.r_[np.zeros(20), np.ones(20)], np.r_[np.full(20, 0.2),
                                                                         np.full(20, 0.8)])
    assert math.isnan(separated["slope"])


def test_brier_equals_sklearn() -> None:
    y, p = _binary(400, 11)
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    probs = np.column_stack([1 - p, p])
    assert M.multiclass_brier(y, probs) == pytest.approx(2 * brier_score_loss(y, p), rel=1e-12)


# --- threshold, utility, selective prediction --------------------------------------------
def test_decision_curve_net_benefit_formula() -> None:
    y, p = _binary(250, 12)
    curve = M.decision_curve(y, p)
    t = 0.3
    i = curve["thresholds"].index(t)
    treat = p >= t
    expected = (np.sum(treat & (y == 1)) - np.sum(treat & (y == 0)) * t / (1 - t)) / len(y)
    assert curve["model"][i] == pytest.approx(expected)
    assert curve["treat_all"][i] == pytest.approx(y.mean() - (1 - y.mean()) * t / (1 - t))


def test_risk_coverage_aurc_against_brute_force() -> None:
    rng = np.random.default_rng(13)
    conf = rng.uniform(size=200)
    correct = rng.uniform(size=200) < conf
    out = M.risk_coverage(correct, conf)
    order = np.argsort(-conf)
    risks = [np.mean(~correct[order[:k]]) for k in range(1, 201)]
    assert out["aurc"] == pytest.approx(np.mean(risks))
    assert out["risk_at_coverage"]["1.00"] == pytest.approx(np.mean(~correct))


def test_threshold_metrics_counts() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    d = np.array([1, 1, 0, 1, 0, 0, 0])
    out = M.threshold_metrics(y, d)
    assert out["counts"] == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    assert out["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert out["specificity"]["value"] == pytest.approx(3 / 4)
    assert out["ppv"]["value"] == pytest.approx(2 / 3)
    assert out["npv"]["value"] == pytest.approx(3 / 4)
