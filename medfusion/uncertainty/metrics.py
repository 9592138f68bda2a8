"""Per-study uncertainty summaries from class probabilities (natural log, nats).

* ``predictive_entropy``: total uncertainty of the (averaged) prediction, ``0..log C``.
* ``mutual_information``: the epistemic part, ``H(mean_s p_s) - mean_s H(p_s)`` (BALD); it is
  large when the stochastic passes or ensemble members *disagree*, small when they agree,
  even on a 50/50 answer.
* ``probability_std``: spread of each class probability across passes/members.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medfusion.uncertainty._arrays import check_probabilities


def _entropy(p: np.ndarray) -> np.ndarray:
    # 0 * log 0 = 0 by convention; clipping keeps log finite without changing the value
    return -np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=-1)


def mean_nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of integer labels ``y`` (N,) under ``probs`` (N, C)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def predictive_entropy(p: Any) -> np.ndarray:
    """Entropy of class probabilities ``p`` (N, C) -> (N,); pass member probabilities
    (S, N, C) to get the entropy of their mean."""
    probs = np.asarray(p.detach().cpu().numpy() if hasattr(p, "detach") else p, dtype=float)
    if probs.ndim == 3:
        probs = check_probabilities(probs, "member_probs", ndim=3).mean(axis=0)
    else:
        probs = check_probabilities(probs, "probs")
    return _entropy(probs)


def mutual_information(member_probs: Any) -> np.ndarray:
    """BALD mutual information of member probabilities (S, N, C) -> (N,), >= 0."""
    members = check_probabilities(member_probs, "member_probs", ndim=3)
    total = _entropy(members.mean(axis=0))
    expected = _entropy(members).mean(axis=0)
    return np.maximum(total - expected, 0.0)


def probability_std(member_probs: Any) -> np.ndarray:
    """Standard deviation (ddof=0) of each class probability across members: (S,N,C) -> (N,C)."""
    members = check_probabilities(member_probs, "member_probs", ndim=3)
    return members.std(axis=0)


def summarize_members(member_probs: Any) -> dict[str, np.ndarray]:
    """Mean probabilities and the three per-study numbers a Prediction carries.

    ``prob_std`` is the spread of the probability of the class predicted by the mean.
    """
    members = check_probabilities(member_probs, "member_probs", ndim=3)
    mean = members.mean(axis=0)
    predicted = mean.argmax(axis=1)
    std = members.std(axis=0)
    return {
        "probs": mean,
        "entropy": _entropy(mean),
        "mutual_info": mutual_information(members),
        "prob_std": std[np.arange(len(predicted)), predicted],
    }
