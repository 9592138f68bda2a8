"""Feature-statistics shift: is this study unlike the training data?

Every medfusion image encoder normalises with BatchNorm, whose running statistics are the
training data's per-channel mean ``m_c`` and variance ``v_c`` of each layer's input; a text
encoder keeps the same statistics of its pooled note features in a BatchNorm layer of its
own (``feature_stats``, observed only). For one study, let ``mu_c`` be the spatial mean of
channel ``c`` at that layer (a note's pooled feature ``c`` itself) and
``z_c = (mu_c - m_c) / sqrt(v_c)``: how far the study's average feature lies from the
training average, in training standard deviations. By the law of total variance
``E_train[z_c^2] <= 1``, and for layers with many spatial cells it is far smaller.

A role's *raw shift* is the **median** over its encoder's BatchNorm layers of the
channel-averaged ``z_c^2`` (the median because the deepest layers have a handful of cells,
so their ``mu_c`` is nearly one activation and heavy-tailed even on held-out studies).
Roles are kept apart: on a synthetic cohort whose CT phantoms barely vary, the CT layers
give the same value for every study, and pooling them with the MR layers would hide an
MR-only problem behind the constant CT value.

**Fitted on validation** (:class:`ShiftReference`, stored in the model card by the trainer),
because the raw scale depends on the data and the role:

* ``feature_shift`` = max over the study's image and text roles of raw shift / the validation
  median of that role: 1 is a typical validation study, 5 means five times as shifted
  (0 for a clinical-only study);
* ``shift_pvalue`` = (1 + #{validation feature_shift >= s}) / (n + 1): a conformal p-value,
  uniform on studies exchangeable with validation, small on studies unlike every one;
* ``threshold``: the validation's conformal (1 - alpha) quantile of ``feature_shift``
  (alpha = 0.02; with fewer than 49 validation studies, their maximum);
* ``OUT_OF_DISTRIBUTION`` when ``s > FLAG_MARGIN * threshold`` (twice): a few dozen
  validation studies pin their own tail down poorly (measured on a synthetic CT + MR
  model: 3 of 28 held-out studies lay 0.1-16% above the largest of 32 validation scores,
  while noise and swapped modalities lay tens to hundreds of times above it), so the flag
  is kept for studies clearly beyond the validation range; the p-value reports the rest;
* distance-aware probabilities: beyond the threshold the (temperature-scaled) logits are
  divided by ``s / threshold``, so confidence shrinks in proportion to how far beyond the
  validation range the study's features lie (the idea of SNGP's distance-aware output,
  Liu et al. 2020, with this score as the distance). Studies within the validation range
  keep their temperature-scaled probability exactly; the predicted class never changes
  (all logits are divided by one positive number);
* a flagged study's conformal prediction set is every label (``abstain``): the conformal
  guarantee assumes the study is exchangeable with the calibration studies, and this
  study has just failed that test (``FusionModel.predict_prepared``).

Packages trained before the reference existed, or on fewer than 10 validation studies (the
trainer then fits none), report the raw shift (max over roles) with the fixed
``SHIFT_FLAG_THRESHOLD`` flag and unadjusted probabilities.

It complements MC dropout: head-only dropout cannot see that the encoders received
something unusual, while this score reads exactly that. It is a screening signal, not a
calibrated probability; a low shift does not prove the study is in distribution.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

SHIFT_FLAG_THRESHOLD = 0.25  # fallback for packages without a fitted ShiftReference
FLAG_OOD = "OUT_OF_DISTRIBUTION"
DEFAULT_SHIFT_ALPHA = 0.02
FLAG_MARGIN = 2.0
#: the floor of the threshold: a validation split whose shifts are all ~0 (tiny volumes,
#: constant images) must not make every rounding difference "out of distribution"
MIN_THRESHOLD = 1e-3
#: the floor of a role's validation median (the unit of the normalised score)
MIN_MEDIAN = 1e-6


class _ShiftRecorder:
    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}

    def hook_for(self, role: str):  # noqa: ANN201 - a forward hook
        def hook(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            x = inputs[0]
            if x.ndim < 2 or module.running_mean is None or module.running_var is None:
                return
            # (B, C, *spatial) image features: their spatial mean; (B, C) pooled note
            # features (a text encoder's statistics layer): the features themselves.
            mu = x.detach().double()
            mu = mu.flatten(2).mean(-1) if mu.ndim > 2 else mu  # (B, C)
            z2 = (mu - module.running_mean.double()) ** 2 / (
                module.running_var.double() + module.eps)
            self.values.setdefault(role, []).append(z2.mean(dim=1))  # (B,)
        return hook


@contextlib.contextmanager
def record_shift(encoders: Mapping[str, nn.Module]) -> Iterator[_ShiftRecorder]:
    """While active, every BatchNorm layer of the ``encoders`` (role -> module) records
    the per-sample mean z^2 of its input against its running statistics."""
    recorder = _ShiftRecorder()
    handles = [
        m.register_forward_hook(recorder.hook_for(role))
        for role, enc in encoders.items()
        for m in enc.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        yield recorder
    finally:
        for h in handles:
            h.remove()


def role_shifts_of(recorder: _ShiftRecorder) -> dict[str, float]:
    """Raw shift per image or text role that ran, from one recorded batch-of-one pass."""
    return {role: float(torch.cat(values).median())
            for role, values in sorted(recorder.values.items()) if values}


def raw_shift(role_shifts: Mapping[str, float]) -> float:
    """A reference-free summary: the largest role's raw shift (0 without image or text roles)."""
    return max(role_shifts.values(), default=0.0)


def role_shifts(
    net: nn.Module,
    images: Mapping[str, torch.Tensor | None],
    clinical: torch.Tensor | None,
    present: torch.Tensor,
) -> list[dict[str, float]]:
    """Per study, the raw shift of each present image or text role (see module doc)."""
    present = torch.as_tensor(present).to(torch.bool)
    out = []
    was_training = net.training
    try:
        net.eval()
        for b in range(int(present.shape[0])):
            imgs = {r: (None if x is None else x[b:b + 1]) for r, x in images.items()}
            clin = None if clinical is None else clinical[b:b + 1]
            with record_shift(net.encoders) as rec, torch.no_grad():
                net.encode(imgs, clin, present[b:b + 1])
            out.append(role_shifts_of(rec))
    finally:
        net.train(was_training)
    return out


def feature_shift(
    net: nn.Module,
    images: Mapping[str, torch.Tensor | None],
    clinical: torch.Tensor | None,
    present: torch.Tensor,
) -> list[float]:
    """Per-study raw feature shift: the largest present role's median-over-layers mean z^2
    (0 for a clinical-only study). Normalised scores need a :class:`ShiftReference`."""
    return [raw_shift(r) for r in role_shifts(net, images, clinical, present)]


def _normalised(role_shifts: Mapping[str, float], medians: Mapping[str, float]) -> float:
    """The largest ratio of a role's raw shift to its median (unknown roles ignored)."""
    return max((float(s) / max(medians[r], MIN_MEDIAN)
                for r, s in role_shifts.items() if r in medians), default=0.0)


@dataclass(frozen=True)
class ShiftReference:
    """The validation studies' feature shifts, and what follows from them (module doc)."""

    scores: tuple[float, ...]
    alpha: float = DEFAULT_SHIFT_ALPHA
    #: validation median of each image or text role's raw shift (the unit of ``feature_shift``)
    role_medians: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("a ShiftReference needs at least one validation score")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        object.__setattr__(self, "scores", tuple(sorted(float(v) for v in self.scores)))
        object.__setattr__(self, "role_medians",
                           {str(k): float(v) for k, v in sorted(self.role_medians.items())})

    @classmethod
    def fit(cls, validation: Sequence[Mapping[str, float]],
            alpha: float = DEFAULT_SHIFT_ALPHA) -> ShiftReference:
        """From the validation studies' per-role raw shifts (:func:`role_shifts`)."""
        roles = sorted({r for v in validation for r in v})
        medians = {r: float(np.median([v[r] for v in validation if r in v])) for r in roles}
        return cls(scores=tuple(_normalised(v, medians) for v in validation), alpha=alpha,
                   role_medians=medians)

    def score(self, role_shifts: Mapping[str, float]) -> float:
        """``feature_shift``: the largest ratio of a role's raw shift to its validation
        median (roles the reference has not seen are ignored; 0 without imaging)."""
        return _normalised(role_shifts, self.role_medians)

    def scores_of(self, role_shifts: Sequence[Mapping[str, float]]) -> list[float]:
        """:meth:`score` of each study."""
        return [self.score(r) for r in role_shifts]

    @property
    def threshold(self) -> float:
        """The conformal (1 - alpha) quantile of the validation shifts (their maximum when
        validation is too small for that quantile), floored at ``MIN_THRESHOLD``."""
        n = len(self.scores)
        rank = min(n, math.ceil((n + 1) * (1.0 - self.alpha)))
        return max(self.scores[rank - 1], MIN_THRESHOLD)

    def pvalues(self, shifts: Sequence[float]) -> np.ndarray:
        """Conformal p-values (1 + #{validation >= s}) / (n + 1) of the given shifts."""
        ref = np.asarray(self.scores)
        s = np.asarray(shifts, dtype=np.float64)
        above = len(ref) - np.searchsorted(ref, s, side="left")
        return (1.0 + above) / (len(ref) + 1.0)

    def flagged(self, shifts: Sequence[float]) -> np.ndarray:
        """True where a shift exceeds ``FLAG_MARGIN`` times :attr:`threshold`."""
        return np.asarray(shifts, dtype=np.float64) > FLAG_MARGIN * self.threshold

    def excess(self, shifts: Sequence[float]) -> np.ndarray:
        """How far beyond the validation range: ``max(1, shift / threshold)``."""
        return np.maximum(np.asarray(shifts, dtype=np.float64) / self.threshold, 1.0)

    def adjust(self, probs: np.ndarray, shifts: Sequence[float]) -> np.ndarray:
        """Distance-aware probabilities: each row's log-probabilities divided by
        :meth:`excess` and renormalised; rows within the validation range are returned
        unchanged (bit for bit)."""
        probs = np.asarray(probs, dtype=np.float64)
        scale = self.excess(shifts)
        out = probs.copy()
        rows = scale > 1.0
        if rows.any():
            logits = np.log(np.clip(probs[rows], 1e-12, 1.0)) / scale[rows, None]
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            out[rows] = e / e.sum(axis=1, keepdims=True)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scores": [round(v, 8) for v in self.scores], "alpha": self.alpha,
                "threshold": round(self.threshold, 8), "n": len(self.scores),
                "role_medians": {r: float(f"{v:.8g}") for r, v in self.role_medians.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShiftReference:
        return cls(scores=tuple(float(v) for v in d["scores"]),
                   alpha=float(d.get("alpha", DEFAULT_SHIFT_ALPHA)),
                   role_medians=dict(d.get("role_medians", {})))


def model_role_shifts(nets: Sequence[nn.Module], images: Mapping[str, Any],
                      clinical: Any, present: Any) -> list[dict[str, float]]:
    """Per-study raw shift of each present role for an ensemble (the mean over its
    networks), from stacked numpy arrays as the trainer and ``FusionModel`` hold them."""
    imgs = {r: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            for r, a in images.items()}
    clin = None if clinical is None else torch.from_numpy(
        np.ascontiguousarray(clinical, dtype=np.float32))
    pres = torch.from_numpy(np.ascontiguousarray(present, dtype=bool))
    per_net = [role_shifts(net, imgs, clin, pres) for net in nets]
    return [{r: float(np.mean([m[i][r] for m in per_net])) for r in per_net[0][i]}
            for i in range(len(per_net[0]))]
