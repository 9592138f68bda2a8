"""Validation metrics with confidence intervals: pure numpy / scipy / scikit-learn, no I/O.

Conventions used everywhere in this module:

* ``y`` is a 0/1 integer array (1 = the positive class of a one-vs-rest task), ``p`` the
  predicted probability of that class, both of length n.
* Every interval is a two-sided 95% interval unless ``level`` says otherwise.
* An estimate that cannot be computed on the data given (one class absent, empty bin, too few
  studies) is ``nan`` -- never an exception -- and the caller turns it into a note.
* Bootstrap replicates resample *patients* (clusters) with replacement and give each study the
  number of times its patient was drawn as a weight, so every metric is computed for all
  replicates at once as a weighted statistic (one matrix operation instead of a Python loop).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats
from sklearn import metrics as skm

LEVEL = 0.95


def z_value(level: float = LEVEL) -> float:
    """The two-sided normal quantile for ``level`` (1.959964 for 95%)."""
    return float(stats.norm.ppf(0.5 + level / 2.0))


def _nan_interval() -> dict[str, float]:
    return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}


# --- proportions -------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3).

    Unlike the Wald interval it stays inside [0, 1] and behaves at 0/n and n/n.
    """
    if n <= 0:
        return math.nan, math.nan
    z = z_value(level)
    phat = successes / n
    denom = 1.0 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    # Clamp so rounding never puts the estimate outside its own interval.
    return max(0.0, min(centre - half, phat)), min(1.0, max(centre + half, phat))


def proportion(successes: int, n: int, level: float = LEVEL) -> dict[str, float]:
    """A proportion with its Wilson interval and the counts it came from."""
    low, high = wilson_interval(successes, n, level)
    value = successes / n if n > 0 else math.nan
    return {
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "numerator": int(successes),
        "denominator": int(n),
        "ci_method": "wilson",
    }


# --- DeLong ------------------------------------------------------------------------------
def _delong_components(
    y: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """AUCs and DeLong structural components for k score vectors on the same cases.

    Fast midrank algorithm of Sun & Xu (2014, IEEE Signal Process. Lett. 21:1389): the
    placement values come from three rankings instead of the O(m*n) kernel matrix.
    ``scores`` has shape (k, n). Returns (aucs, v10 (k, m), v01 (k, n_neg), m, n_neg).
    """
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    both = np.concatenate([pos, neg], axis=1)
    # Midranks (ties share the average rank): rankdata(method="average") is exactly that.
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(both, axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives that outrank it
    return aucs, v10, v01, m, n


def delong_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance matrix (k, k) for score rows ``scores`` (k, n)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    aucs, v10, v01, m, n = _delong_components(np.asarray(y), scores)
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def delong_auc(y: np.ndarray, p: np.ndarray, level: float = LEVEL) -> dict[str, float]:
    """AUROC with its DeLong standard error and normal interval (clipped to [0, 1])."""
    y = np.asarray(y)
    if y.sum() == 0 or y.sum() == len(y):
        return {**_nan_interval(), "se": math.nan}
    aucs, cov = delong_covariance(y, np.asarray(p, dtype=np.float64)[None, :])
    auc, se = float(aucs[0]), float(math.sqrt(max(cov[0, 0], 0.0)))
    z = z_value(level)
    return {
        "value": auc,
        "ci_low": max(0.0, auc - z * se),
        "ci_high": min(1.0, auc + z * se),
        "se": se,
    }


def delong_paired_test(
    y: np.ndarray, p1: np.ndarray, p2: np.ndarray, level: float = LEVEL
) -> dict[str, float]:
    """Paired DeLong test of AUROC(p1) == AUROC(p2) on the same cases (DeLong et al. 1988).

    Returns both AUCs, the difference p1 - p2 with its normal interval, z and the two-sided
    p-value.
    """
    y = np.asarray(y)
    out = {
        "auroc_a": math.nan,
        "auroc_b": math.nan,
        "difference": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "se": math.nan,
        "z": math.nan,
        "p_value": math.nan,
    }
    if y.sum() == 0 or y.sum() == len(y):
        return out
    scores = np.vstack([np.asarray(p1, np.float64), np.asarray(p2, np.float64)])
    aucs, cov = delong_covariance(y, scores)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    z = z_value(level)
    out.update(auroc_a=float(aucs[0]), auroc_b=float(aucs[1]), difference=diff, se=se)
    out.update(ci_low=diff - z * se, ci_high=diff + z * se)
    if se > 0:
        out["z"] = diff / se
        out["p_value"] = float(2.0 * stats.norm.sf(abs(diff / se)))
    else:
        # Identical rankings: no evidence of a difference.
        out["z"] = 0.0
        out["p_value"] = 1.0 if diff == 0 else 0.0
    return out


# --- bootstrap ---------------------------------------------------------------------------
def cluster_index(groups: Sequence[str] | None, n: int) -> np.ndarray:
    """Map each study to a cluster (patient) index; without groups each study is its own."""
    if groups is None:
        return np.arange(n)
    _, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return inverse.reshape(-1)


def bootstrap_weights(
    clusters: np.ndarray, n_bootstrap: int, seed: int | Sequence[int], chunk: int | None = None
) -> Iterator[np.ndarray]:
    """Yield (b, n) float arrays of study weights for patient-level bootstrap replicates.

    Each replicate draws as many patients as there are, with replacement; a study's weight
    is how often its patient was drawn. Chunks
    bound memory to about 2 million weights at a time whatever the cohort size.
    """
    rng = np.random.default_rng(seed)
    n_clusters = int(clusters.max()) + 1 if len(clusters) else 0
    if n_clusters == 0:
        return
    if chunk is None:
        chunk = int(max(1, min(200, 2_000_000 // max(len(clusters), 1))))
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        draws = rng.integers(0, n_clusters, size=(b, n_clusters))
        # counts per (replicate, patient) in one bincount over row-offset patient indices
        flat = (draws + np.arange(b)[:, None] * n_clusters).ravel()
        counts = np.bincount(flat, minlength=b * n_clusters).reshape(b, n_clusters)
        yield counts[:, clusters].astype(np.float64)
        done += b


@dataclass(frozen=True)
class _Ranked:
    """Scores sorted once, with the boundaries of tied groups (reused by every replicate)."""

    order: np.ndarray
    starts: np.ndarray
    y_sorted: np.ndarray

    @classmethod
    def of(cls, y: np.ndarray, p: np.ndarray) -> _Ranked:
        order = np.argsort(p, kind="mergesort")
        sorted_p = p[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1]
        return cls(order=order, starts=starts, y_sorted=y[order].astype(np.float64))

    def grouped(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted positives and negatives per distinct score, ascending: (b, u) each."""
        ws = w[:, self.order]
        pos = np.add.reduceat(ws * self.y_sorted, self.starts, axis=1)
        neg = np.add.reduceat(ws * (1.0 - self.y_sorted), self.starts, axis=1)
        return pos, neg


def weighted_auroc(
    ranked: _Ranked, w: np.ndarray, grouped: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """AUROC for each weight row: P(score_pos > score_neg) + 0.5 P(tie), weighted."""
    pos, neg = grouped if grouped is not None else ranked.grouped(w)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_average_precision(
    ranked: _Ranked, w: np.ndarray, grouped: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Average precision for each weight row (the step-wise sum scikit-learn uses)."""
    pos, neg = grouped if grouped is not None else ranked.grouped(w)
    pos, neg = pos[:, ::-1], neg[:, ::-1]  # descending thresholds
    tp = np.cumsum(pos, axis=1)
    fp = np.cumsum(neg, axis=1)
    total = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
        ap = (pos * precision).sum(axis=1) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, ap, np.nan)


def percentile_interval(
    replicates: np.ndarray, level: float = LEVEL, min_valid: float = 0.5
) -> tuple[float, float, int]:
    """Percentile interval of the finite replicates; nan when fewer than ``min_valid`` are."""
    finite = replicates[np.isfinite(replicates)]
    if len(replicates) == 0 or len(finite) < min_valid * len(replicates):
        return math.nan, math.nan, int(len(finite))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high), int(len(finite))


# --- calibration -------------------------------------------------------------------------
def equal_width_bins(p: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Bin index in [0, n_bins) for equal-width bins on [0, 1]; 1.0 falls in the last bin."""
    return np.minimum((np.asarray(p) * n_bins).astype(np.int64), n_bins - 1).clip(0)


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, n_bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """ECE with equal-width bins: sum over bins of (n_b / n) |mean(p_b) - mean(y_b)|.

    Also returns the reliability-diagram table (one row per non-empty bin).
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return math.nan, []
    bins = equal_width_bins(p, n_bins)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    ece = float(np.abs(sum_p - sum_y).sum() / len(y))
    table = []
    for b in range(n_bins):
        if count[b] == 0:
            continue
        k = int(sum_y[b])
        low, high = wilson_interval(k, int(count[b]))
        table.append(
            {
                "bin_low": b / n_bins,
                "bin_high": (b + 1) / n_bins,
                "n": int(count[b]),
                "mean_predicted": float(sum_p[b] / count[b]),
                "observed": float(sum_y[b] / count[b]),
                "observed_ci_low": low,
                "observed_ci_high": high,
            }
        )
    return ece, table


def weighted_ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Equal-width ECE for each weight row (bins fixed by p, so one matrix product)."""
    # n_b |mean(p_b) - mean(y_b)| = |sum over the bin of (p - y)|: one product per bin.
    bins = equal_width_bins(p, n_bins)
    gap = np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    total_gap = np.zeros(w.shape[0])
    for b in range(n_bins):
        members = np.flatnonzero(bins == b)
        if len(members):
            total_gap += np.abs(w[:, members] @ gap[members])
    with np.errstate(invalid="ignore", divide="ignore"):
        return total_gap / w.sum(axis=1)


def adaptive_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-mass bins (Nixon et al. 2019): sort by p, split into n_bins groups of
    (nearly) equal size, average |mean(p) - mean(y)| weighted by group size."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    total = 0.0
    for idx in np.array_split(order, min(n_bins, len(y))):
        total += abs(p[idx].sum() - y[idx].sum())
    return float(total / len(y))


def logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps] so 0 and 1 stay finite."""
    return special.logit(np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps))


def _fit_logistic(
    x: np.ndarray | None, y: np.ndarray, offset: np.ndarray | None
) -> np.ndarray | None:
    """Unpenalised logistic regression of y on [1, x] (or on 1 with ``offset``) by Newton's
    method (scipy trust-exact with the exact gradient and Hessian). None if it diverges."""
    design = np.ones((len(y), 1)) if x is None else np.column_stack([np.ones(len(y)), x])
    off = np.zeros(len(y)) if offset is None else offset

    def nll(beta: np.ndarray) -> float:
        eta = design @ beta + off
        return float(np.sum(np.logaddexp(0.0, eta) - y * eta))

    def grad(beta: np.ndarray) -> np.ndarray:
        mu = special.expit(design @ beta + off)
        return design.T @ (mu - y)

    def hess(beta: np.ndarray) -> np.ndarray:
        mu = special.expit(design @ beta + off)
        return (design * (mu * (1 - mu))[:, None]).T @ design

    start = np.zeros(design.shape[1])
    if x is not None:
        start[1] = 1.0
    res = optimize.minimize(nll, start, jac=grad, hess=hess, method="trust-exact")
    beta = res.x
    # Perfect separation sends the slope to infinity: the optimiser stops on a huge value.
    if not np.all(np.isfinite(beta)) or np.max(np.abs(beta)) > 1e3:
        return None
    if np.max(np.abs(grad(beta))) > 1e-4 * max(1.0, len(y)):
        return None
    return beta


def calibration_fit(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Logistic recalibration on logit(p) (Cox 1958): logit P(y=1) = a + b logit(p).

    ``slope`` = b and ``intercept`` = a from the joint fit (ideal: 1 and 0);
    ``intercept_slope1`` is calibration-in-the-large, a fitted with b fixed at 1
    (offset logit(p); ideal 0). nan when one class is absent or the classes are separated.
    """
    y = np.asarray(y, dtype=np.float64)
    out = {"slope": math.nan, "intercept": math.nan, "intercept_slope1": math.nan}
    if len(y) < 3 or y.sum() == 0 or y.sum() == len(y):
        return out
    x = logit(p)
    # With one predictor the maximum likelihood slope is infinite exactly when the classes
    # are (quasi-)separated by x: say so (nan) instead of reporting where the optimiser gave up.
    separated = x[y == 0].max() <= x[y == 1].min() or x[y == 1].max() <= x[y == 0].min()
    beta = None if separated else _fit_logistic(x, y, None)
    if beta is not None:
        out["intercept"], out["slope"] = float(beta[0]), float(beta[1])
    beta1 = _fit_logistic(None, y, x)
    if beta1 is not None:
        out["intercept_slope1"] = float(beta1[0])
    return out


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between p and the 0/1 outcome (scikit-learn's definition)."""
    if len(y) == 0:
        return math.nan
    return float(skm.brier_score_loss(np.asarray(y), np.asarray(p), pos_label=1))


def multiclass_brier(y_index: np.ndarray, probs: np.ndarray) -> float:
    """Brier's original multiclass score: mean over studies of sum_k (p_k - y_k)^2 (in [0, 2])."""
    if len(y_index) == 0:
        return math.nan
    onehot = np.eye(probs.shape[1])[y_index]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


# --- threshold metrics, utility, selective prediction ------------------------------------
def confusion(y: np.ndarray, decision: np.ndarray) -> dict[str, int]:
    """TP, FP, TN, FN counts of 0/1 decisions against 0/1 truth."""
    y = np.asarray(y).astype(bool)
    d = np.asarray(decision).astype(bool)
    return {
        "tp": int(np.sum(y & d)),
        "fp": int(np.sum(~y & d)),
        "tn": int(np.sum(~y & ~d)),
        "fn": int(np.sum(y & ~d)),
    }


def threshold_metrics(y: np.ndarray, decision: np.ndarray, level: float = LEVEL) -> dict:
    """Sensitivity, specificity, PPV, NPV (Wilson intervals) and accuracy from 0/1 decisions."""
    c = confusion(y, decision)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    return {
        "counts": c,
        "sensitivity": proportion(tp, tp + fn, level),
        "specificity": proportion(tn, tn + fp, level),
        "ppv": proportion(tp, tp + fp, level),
        "npv": proportion(tn, tn + fn, level),
        "accuracy": proportion(tp + tn, tp + fp + tn + fn, level),
    }


def decision_curve(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | None = None
) -> dict[str, list[float]]:
    """Net benefit of treating when p >= t (Vickers & Elkin 2006) against treat-all/none.

    NB(t) = TP/n - FP/n * t / (1 - t); treat-all uses prevalence; treat-none is 0.
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    if thresholds is None:
        thresholds = np.round(np.arange(0.01, 1.0, 0.01), 2)
    n = len(y)
    if n == 0:
        return {"thresholds": [], "model": [], "treat_all": [], "treat_none": []}
    prevalence = y.mean()
    odds = thresholds / (1.0 - thresholds)
    decide = p[None, :] >= thresholds[:, None]
    tp = (decide & y[None, :]).sum(axis=1) / n
    fp = (decide & ~y[None, :]).sum(axis=1) / n
    return {
        "thresholds": thresholds.tolist(),
        "model": (tp - fp * odds).tolist(),
        "treat_all": (prevalence - (1 - prevalence) * odds).tolist(),
        "treat_none": [0.0] * len(thresholds),
    }


def risk_coverage(
    correct: np.ndarray, confidence: np.ndarray, points: int = 101
) -> dict[str, object]:
    """Selective prediction: keep the most confident studies first and track the error rate.

    ``aurc`` is the mean selective risk over coverages k/n, k = 1..n (Geifman et al. 2019);
    ties in confidence keep the input order (stable sort) so the curve is deterministic.
    """
    correct = np.asarray(correct).astype(bool)
    n = len(correct)
    if n == 0:
        return {"aurc": math.nan, "coverage": [], "risk": [], "risk_at_coverage": {}}
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="mergesort")
    errors = np.cumsum(~correct[order])
    k = np.arange(1, n + 1)
    risk = errors / k
    coverage = k / n
    pick = np.unique(np.linspace(0, n - 1, min(points, n)).round().astype(int))
    at = {}
    for target in (0.5, 0.8, 0.9, 1.0):
        idx = max(int(math.ceil(target * n)) - 1, 0)
        at[f"{target:.2f}"] = float(risk[idx])
    return {
        "aurc": float(risk.mean()),
        "coverage": coverage[pick].tolist(),
        "risk": risk[pick].tolist(),
        "risk_at_coverage": at,
    }


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each probability row."""
    return stats.entropy(np.clip(probs, 0.0, 1.0), axis=1)
