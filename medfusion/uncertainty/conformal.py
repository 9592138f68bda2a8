"""Split conformal prediction sets (LAC and APS), optionally class-conditional.

Given calibrated probabilities on a calibration split that the model never trained on, the
set ``{c : score(x, c) <= q}`` with ``q`` the ``ceil((n + 1)(1 - alpha))``-th smallest
calibration score contains the true class with probability at least ``1 - alpha``, provided
calibration and test studies are exchangeable (same population, same scanner mix...).

* ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): score ``1 - p_c``.
  Smallest sets on average. Plain LAC can return an empty set; with ``nonempty=True`` (the
  default) the predicted class always enters, which can only raise coverage.
* ``aps`` (adaptive prediction sets, Romano et al. 2020), non-randomised: score = total
  probability of the classes ranked at or above ``c``. Sets grow with the model's own
  uncertainty; slightly conservative because it is not randomised (deterministic output).
* ``class_conditional=True`` (Mondrian): one threshold per true class, so coverage holds
  within each class (e.g. for the rare positive class), at the price of larger sets; a
  class with fewer than ``1/alpha - 1`` calibration studies always enters the set.

Only the calibration *scores* are stored, so ``alpha`` is chosen at prediction time. The
threshold rule is the textbook one; the tests check it against crepes' p-values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medfusion.errors import CalibrationError
from medfusion.uncertainty._arrays import check_alpha, check_labels, check_probabilities

METHODS = ("lac", "aps")


def nonconformity(probs: np.ndarray, method: str) -> np.ndarray:
    """Score of every candidate class, shape (N, C); larger = less conforming."""
    if method == "lac":
        return 1.0 - probs
    if method == "aps":
        # mass of the classes strictly more probable than c, plus p_c itself; ties are
        # resolved by the stable class order so the score is a fixed function of (x, c)
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=1)
        cumulative = np.cumsum(sorted_p, axis=1)
        scores = np.empty_like(probs)
        np.put_along_axis(scores, order, cumulative, axis=1)
        return scores
    raise CalibrationError(f"unknown conformal method {method!r}; use one of {METHODS}.")


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n+1)(1-alpha))``-th smallest score; ``inf`` when n is too small."""
    n = int(scores.size)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-12)
    if n == 0 or rank > n:
        return math.inf
    return float(np.sort(scores)[rank - 1])


class ConformalPredictor:
    """Split-conformal prediction sets on top of (calibrated) class probabilities.

    Example::

        cp = ConformalPredictor("aps").fit(val_probs, val_labels)
        sets = cp.prediction_sets(test_probs, alpha=0.1)   # [(1,), (0, 1), ...]
        abstain = [len(s) != 1 for s in sets]
    """

    def __init__(self, method: str = "lac", class_conditional: bool = False,
                 nonempty: bool = True) -> None:
        if method not in METHODS:
            raise CalibrationError(f"unknown conformal method {method!r}; use one of {METHODS}.")
        self.method = method
        self.class_conditional = bool(class_conditional)
        self.nonempty = bool(nonempty)

    def fit(self, probs_cal: Any, y: Any) -> ConformalPredictor:
        """Store the score of the true class of each calibration study."""
        probs = check_probabilities(probs_cal, "probs_cal")
        labels = check_labels(y, probs.shape[0], probs.shape[1])
        scores = nonconformity(probs, self.method)
        self.scores_ = scores[np.arange(len(labels)), labels].astype(np.float64)
        self.labels_ = labels
        self.n_classes_ = int(probs.shape[1])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "scores_"):
            raise CalibrationError(
                "ConformalPredictor is not fitted; call fit(probs_cal, y) on a calibration split."
            )

    def thresholds(self, alpha: float = 0.1) -> np.ndarray:
        """Per-class score thresholds (all equal unless class-conditional), shape (C,)."""
        self._check_fitted()
        alpha = check_alpha(alpha)
        if not self.class_conditional:
            return np.full(self.n_classes_, conformal_threshold(self.scores_, alpha))
        return np.array(
            [
                conformal_threshold(self.scores_[self.labels_ == c], alpha)
                for c in range(self.n_classes_)
            ]
        )

    def prediction_sets(self, probs: Any, alpha: float = 0.1) -> list[tuple[int, ...]]:
        """One tuple of class indices per row of ``probs``, ordered by decreasing probability."""
        self._check_fitted()
        p = check_probabilities(np.atleast_2d(np.asarray(probs, dtype=np.float64)), "probs")
        if p.shape[1] != self.n_classes_:
            raise CalibrationError(
                f"probs has {p.shape[1]} classes but the calibration had {self.n_classes_}."
            )
        included = nonconformity(p, self.method) <= self.thresholds(alpha)[None, :]
        order = np.argsort(-p, axis=1, kind="stable")
        if self.nonempty:
            # The predicted class always enters: an empty set would make the model abstain
            # on exactly the studies it is surest about when the calibration split was
            # (near) separable (a tiny LAC threshold), and adding it only raises coverage.
            included[np.arange(len(p)), order[:, 0]] = True
        return [tuple(int(c) for c in row_order if row_in[c]) for row_order, row_in in
                zip(order, included, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (method, scores and labels of the calibration split)."""
        self._check_fitted()
        return {
            "kind": "split_conformal",
            "method": self.method,
            "class_conditional": self.class_conditional,
            "nonempty": self.nonempty,
            "n_classes": self.n_classes_,
            "scores": [float(s) for s in self.scores_],
            "labels": [int(v) for v in self.labels_],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ConformalPredictor:
        """Rebuild a fitted predictor from :meth:`to_dict` output."""
        try:
            # Cards written before non-empty sets existed keep their (possibly empty) sets.
            predictor = cls(str(state["method"]), bool(state.get("class_conditional", False)),
                            bool(state.get("nonempty", False)))
            scores = np.asarray(state["scores"], dtype=np.float64)
            labels = np.asarray(state["labels"], dtype=np.int64)
            n_classes = int(state["n_classes"])
        except (KeyError, TypeError, ValueError) as error:
            raise CalibrationError(
                "conformal state is incomplete (needs method, scores, labels, n_classes); "
                "re-calibrate the model."
            ) from error
        if scores.shape != labels.shape or scores.ndim != 1 or not np.all(np.isfinite(scores)):
            raise CalibrationError("conformal state has mismatched or non-finite scores/labels.")
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise CalibrationError("conformal state has labels outside its class range.")
        predictor.scores_ = scores
        predictor.labels_ = labels
        predictor.n_classes_ = n_classes
        return predictor


def empirical_coverage(sets: list[tuple[int, ...]], y: Any) -> float:
    """Fraction of studies whose true class is in its prediction set."""
    labels = np.asarray(y).astype(np.int64).ravel()
    if len(sets) != labels.size:
        raise CalibrationError(f"{len(sets)} sets but {labels.size} labels.")
    return float(np.mean([int(label) in s for s, label in zip(sets, labels, strict=True)]))
