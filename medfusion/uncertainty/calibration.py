"""Calibration of a classifier's logits on a held-out (validation) split.

Two families, both fitted by minimising the negative log-likelihood with L-BFGS in float64
(deterministic on CPU):

* **temperature scaling** (Guo et al., 2017): ``softmax(z / T)``. One scalar rescales
  confidence without ever changing which class has the largest logit.
* **temperature plus bias**: ``softmax(z / T + b)`` with one offset per class (``b[0] = 0``).
  A temperature cannot remove a *bias*: a network whose logits all lean one way (class
  weighting shifts them by design, ``log w_c``; an epoch kept for its AUROC may lean hard)
  predicts one class for every study whatever ``T`` is. The offset moves the decision
  threshold back. The ``prior`` variant fixes ``b`` to the prior correction that class
  weighting needs (``-log w_c``) and fits only ``T``.

:func:`fit_calibration` fits every applicable variant and keeps the one with the lowest
cross-validated NLL on the validation split (a variant with more parameters always has the
lower in-sample NLL, so in-sample NLL cannot choose); :class:`LogitScaler` holds the result.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from medfusion.errors import CalibrationError
from medfusion.numerics import softmax
from medfusion.uncertainty._arrays import as_numpy, check_labels, check_scores
from medfusion.uncertainty.metrics import mean_nll

log = logging.getLogger("medfusion.uncertainty")

# log T is searched in [-_LOG_T_BOUND, _LOG_T_BOUND] (T in about [0.05, 20]). A validation
# split that the model classifies entirely correctly has no finite optimum: every sample's
# NLL keeps falling as T -> 0 (measured: T = 0.02 from 12 such studies, which then turned
# every test prediction into p = 1.0 and every entropy into 0). Such a split is therefore
# treated as "no evidence to sharpen": T = 1, recorded as ``separable`` in the state.
_LOG_T_BOUND = 3.0


_BIAS_BOUND = 15.0  # |b| bound: beyond it a class is never (or always) predicted anyway
_BIAS_L2 = 1e-4  # keeps b finite on a split that the offset alone can separate
#: Variants :func:`fit_calibration` chooses from, simplest first (ties keep the simpler).
CALIBRATION_KINDS = ("temperature", "prior", "bias")


def _separable(z: np.ndarray, labels: np.ndarray) -> bool:
    true = z[np.arange(len(labels)), labels]
    others = np.where(np.eye(z.shape[1], dtype=bool)[labels], -np.inf, z).max(axis=1)
    return bool(np.all(true > others))


class LogitScaler:
    """``softmax(logits / T + b)``: a temperature and a per-class offset (``b[0] = 0``).

    ``kind`` chooses what :meth:`fit` estimates: ``"temperature"`` (``b = 0``), ``"prior"``
    (``b = prior_bias``, fixed) or ``"bias"`` (``T`` and ``b``, starting from
    ``prior_bias``). Estimator contract as scikit-learn's: :meth:`fit` returns ``self``,
    fitted state ends in ``_``. ``bound_hit_`` says whether ``T`` or ``b`` ended on its
    search bound (then the calibration is degenerate: warn the user, do not trust it).
    """

    def __init__(self, kind: str = "temperature", prior_bias: Any = None,
                 max_iter: int = 200) -> None:
        self.kind = kind
        self.prior_bias = prior_bias
        self.max_iter = max_iter

    @property
    def temperature(self) -> float:
        """The fitted temperature (``> 1`` softens an over-confident model)."""
        if not hasattr(self, "temperature_"):
            raise CalibrationError(f"{type(self).__name__} is not fitted; call fit(logits, y) "
                                   "first.")
        return float(self.temperature_)

    @property
    def bias(self) -> np.ndarray | None:
        """The fitted per-class offset (None for a card written before offsets existed)."""
        self.temperature  # noqa: B018 - raises when not fitted
        return None if self.bias_ is None else np.asarray(self.bias_, dtype=np.float64)

    def _prior(self, n_classes: int) -> np.ndarray:
        if self.prior_bias is None:
            return np.zeros(n_classes)
        prior = np.asarray(self.prior_bias, dtype=np.float64).reshape(-1)
        if prior.shape != (n_classes,) or not np.all(np.isfinite(prior)):
            raise CalibrationError(
                f"prior_bias must hold {n_classes} finite values, got shape {prior.shape}.")
        return prior - prior[0]

    def fit(self, logits: Any, y: Any) -> LogitScaler:
        """Fit by minimising the mean NLL of ``softmax(logits / T + b)`` on labels ``y``.

        ``logits``: (N, C) with C >= 2; ``y``: (N,) integer class indices. A split that the
        logits classify entirely correctly has no finite optimum (NLL keeps falling as
        T -> 0): it is recorded as ``separable`` and left uncalibrated (T = 1, b = 0).
        """
        if self.kind not in CALIBRATION_KINDS:
            raise CalibrationError(f"unknown calibration kind {self.kind!r}; use one of "
                                   f"{', '.join(CALIBRATION_KINDS)}.")
        z = check_scores(logits, "logits")
        labels = check_labels(y, z.shape[0], z.shape[1])
        n_classes = z.shape[1]
        prior = self._prior(n_classes) if self.kind != "temperature" else np.zeros(n_classes)
        self.separable_ = _separable(z, labels)
        self.n_samples_ = int(z.shape[0])
        self.bound_hit_ = False
        if self.separable_:
            log.warning("the validation split is separated perfectly, so no temperature can "
                        "be fitted; keeping T = 1 (use a larger validation split)")
            self.temperature_, self.bias_ = 1.0, np.zeros(n_classes)
            return self
        logits_t = torch.from_numpy(z)
        labels_t = torch.from_numpy(labels)
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        free = torch.zeros(n_classes - 1, dtype=torch.float64,
                           requires_grad=self.kind == "bias")
        prior_t = torch.from_numpy(prior)
        params = [log_t, free] if self.kind == "bias" else [log_t]
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=self.max_iter,
                                      tolerance_grad=1e-10, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")

        def offsets() -> torch.Tensor:
            shift = torch.cat([torch.zeros(1, dtype=torch.float64), free])
            return (prior_t + shift).clamp(-_BIAS_BOUND, _BIAS_BOUND)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            scaled = logits_t / torch.exp(log_t.clamp(-_LOG_T_BOUND, _LOG_T_BOUND)) + offsets()
            loss = torch.nn.functional.cross_entropy(scaled, labels_t)
            if self.kind == "bias":
                loss = loss + _BIAS_L2 * (free ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        value = float(log_t.detach().item())
        bias = offsets().detach().numpy().astype(np.float64)
        if not np.isfinite(value) or not np.all(np.isfinite(bias)):  # pragma: no cover
            raise CalibrationError("calibration fit diverged; check the validation logits.")
        self.bound_hit_ = bool(abs(value) >= _LOG_T_BOUND - 1e-6
                               or np.any(np.abs(bias) >= _BIAS_BOUND - 1e-6))
        if self.bound_hit_:
            log.warning("calibration hit its search bound (T = %.3g, |b| max %.3g): the "
                        "validation split gives no usable calibration", np.exp(np.clip(
                            value, -_LOG_T_BOUND, _LOG_T_BOUND)), float(np.abs(bias).max()))
        self.temperature_ = float(np.exp(np.clip(value, -_LOG_T_BOUND, _LOG_T_BOUND)))
        self.bias_ = bias
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / T + b)``, shape (..., C)."""
        z = as_numpy(logits)
        if z.ndim < 1 or z.shape[-1] < 2 or not np.all(np.isfinite(z)):
            raise CalibrationError(
                f"logits must be finite with at least 2 class columns (got shape {z.shape})."
            )
        self.temperature  # noqa: B018 - raises when not fitted
        bias = self._bias_for(z.shape[-1])
        if bias.shape != (z.shape[-1],):
            raise CalibrationError(f"the calibration has {bias.shape[0]} classes, the logits "
                                   f"{z.shape[-1]}.")
        return softmax(z / self.temperature + bias)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for the model package."""
        return {
            "kind": self.kind,
            "temperature": self.temperature,
            "bias": None if self.bias_ is None else [float(b) for b in self.bias_],
            "n_samples": int(getattr(self, "n_samples_", 0)),
            "separable": bool(getattr(self, "separable_", False)),
            "bound_hit": bool(getattr(self, "bound_hit_", False)),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LogitScaler:
        """Rebuild a fitted scaler from :meth:`to_dict` output (a card written before the
        offset existed holds a temperature only: ``b = 0``)."""
        try:
            temperature = float(state["temperature"])
            bias = state.get("bias")
            bias_arr = None if bias is None else np.asarray(bias, dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise CalibrationError(
                "calibration state lacks a numeric 'temperature'; re-train or re-calibrate."
            ) from error
        if not np.isfinite(temperature) or temperature <= 0:
            raise CalibrationError(f"temperature must be a positive number, got {temperature}.")
        if bias_arr is not None and (bias_arr.ndim != 1 or not np.all(np.isfinite(bias_arr))):
            raise CalibrationError("calibration bias must be a list of finite numbers.")
        scaler = cls()
        scaler.kind = str(state.get("kind", "temperature"))
        scaler.temperature_ = temperature
        scaler.bias_ = bias_arr if bias_arr is not None else None
        scaler.n_samples_ = int(state.get("n_samples", 0))
        scaler.separable_ = bool(state.get("separable", False))
        scaler.bound_hit_ = bool(state.get("bound_hit", False))
        return scaler

    def _bias_for(self, n_classes: int) -> np.ndarray:
        return np.zeros(n_classes) if self.bias_ is None else self.bias_


def fit_calibration(logits: Any, y: Any, *, prior_bias: Any = None, folds: int = 5,
                    seed: int = 0) -> tuple[LogitScaler, dict[str, Any]]:
    """Fit the calibration variant with the lowest cross-validated NLL on ``(logits, y)``.

    Candidates: ``temperature``; ``prior`` (when ``prior_bias`` is given); ``bias``. Each is
    scored by stratified ``folds``-fold cross-validation (fit on k-1 folds, NLL on the
    held-out fold; deterministic for a ``seed``), the best is refitted on all of ``y``.
    With fewer than two studies per fold in some class, only ``temperature`` is fitted.
    Returns the scaler and a report for the model card: the chosen kind, the NLL of the raw
    and the calibrated probabilities on ``y``, each candidate's cross-validated NLL, and the
    accuracy of the calibrated decisions beside the majority rate.
    """
    from sklearn.model_selection import StratifiedKFold

    z = check_scores(logits, "logits")
    labels = check_labels(y, z.shape[0], z.shape[1])
    kinds = ["temperature", *(["prior"] if prior_bias is not None else []), "bias"]
    counts = np.bincount(labels, minlength=z.shape[1])
    cv_nll: dict[str, float] = {}
    if counts.min() >= 2 * folds and not _separable(z, labels):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = list(splitter.split(z, labels))
        for kind in kinds:
            losses = []
            for train, held in splits:
                part = LogitScaler(kind, prior_bias)
                with _quiet():
                    part.fit(z[train], labels[train])
                losses.append(mean_nll(part.transform(z[held]), labels[held]) * len(held))
            cv_nll[kind] = float(np.sum(losses) / len(labels))
        chosen = min(kinds, key=lambda k: (round(cv_nll[k], 9), kinds.index(k)))
    else:
        chosen = "temperature"
    scaler = LogitScaler(chosen, prior_bias).fit(z, labels)
    probs = scaler.transform(z)
    report = {
        "chosen": chosen,
        "cv_nll": cv_nll,
        "folds": folds if cv_nll else 0,
        "nll_raw": mean_nll(softmax(z), labels),
        "nll_calibrated": mean_nll(probs, labels),
        "accuracy_calibrated": float(np.mean(probs.argmax(axis=1) == labels)),
        "majority_rate": float(counts.max() / counts.sum()),
        "bound_hit": scaler.bound_hit_,
        "separable": scaler.separable_,
    }
    return scaler, report


class _quiet:
    """Silence this module's warnings while fitting cross-validation folds (the final fit
    on the whole split still warns)."""

    def __enter__(self) -> None:
        self._was = log.disabled
        log.disabled = True

    def __exit__(self, *exc: object) -> None:
        log.disabled = self._was


class TemperatureScaler(LogitScaler):
    """Plain temperature scaling, ``softmax(logits / T)``.

    Example::

        scaler = TemperatureScaler().fit(val_logits, val_labels)
        probs = scaler.transform(test_logits)      # calibrated, same argmax as the logits
        raw = softmax(test_logits)                 # uncalibrated, for comparison
    """

    def __init__(self, max_iter: int = 200) -> None:
        super().__init__("temperature", None, max_iter)


def expected_calibration_error(probs: Any, y: Any, n_bins: int = 10) -> float:
    """Top-label ECE with equal-width confidence bins (a summary for reports and docs)."""
    p = check_scores(probs, "probs")
    labels = check_labels(y, p.shape[0], p.shape[1])
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins so that confidence 1.0 lands in the last bin
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)
