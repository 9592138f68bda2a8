"""Feature-statistics shift: is this study unlike the training data? (no fitting needed)

Every medfusion encoder normalises with BatchNorm, whose running statistics are the
training data's per-channel mean ``m_c`` and variance ``v_c`` of each layer's input. For one
study, let ``mu_c`` be the spatial mean of channel ``c`` at that layer and
``z_c = (mu_c - m_c) / sqrt(v_c)``: how far the study's average feature lies from the
training average, in training standard deviations. By the law of total variance
``E_train[z_c^2] <= 1``, and for layers with many spatial cells it is far smaller.

``feature_shift`` is, over the BatchNorm layers of the encoders of the present imaging
roles, the *median* of the per-layer channel-averaged ``z_c^2`` (0 when no imaging role is
present). The median because the deepest layers have a handful of cells, so their
``mu_c`` is nearly one activation and heavy-tailed even on held-out studies. A study above
``SHIFT_FLAG_THRESHOLD`` (0.25: the typical layer's channel means off by half a training
standard deviation) is flagged ``OUT_OF_DISTRIBUTION``.

Measured on a model trained by ``medfusion train`` (synthetic CT + MR, 32^3): held-out
studies 0.01 (max 0.03), noise volumes 0.58, CT and MR swapped 1.04.

It complements MC dropout: head-only dropout cannot see that the encoders received
something unusual, while this score reads exactly that. It is a screening signal, not a
calibrated probability; a low shift does not prove the study is in distribution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

SHIFT_FLAG_THRESHOLD = 0.25
FLAG_OOD = "OUT_OF_DISTRIBUTION"


class _ShiftRecorder:
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def hook(self, module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        x = inputs[0]
        if x.ndim < 3 or module.running_mean is None or module.running_var is None:
            return
        mu = x.detach().double().flatten(2).mean(-1)  # (B, C)
        z2 = (mu - module.running_mean.double()) ** 2 / (module.running_var.double() + module.eps)
        self.values.append(z2.mean(dim=1))  # (B,)


@contextlib.contextmanager
def record_shift(encoders: list[nn.Module]) -> Iterator[_ShiftRecorder]:
    """While active, every BatchNorm layer of ``encoders`` records the per-sample mean z^2
    of its input against its running statistics (eval-mode forward passes only)."""
    recorder = _ShiftRecorder()
    handles = [
        m.register_forward_hook(recorder.hook)
        for enc in encoders
        for m in enc.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        yield recorder
    finally:
        for h in handles:
            h.remove()


def shift_of(recorder: _ShiftRecorder) -> float:
    """The study's feature shift from one recorded batch-of-one pass (0 if nothing ran)."""
    if not recorder.values:
        return 0.0
    # median over layers: deep layers with a handful of spatial cells make mu_c nearly a
    # single activation, whose z^2 is heavy-tailed on held-out studies (measured p95 of 17
    # on one layer), while the typical layer stays near 0
    return float(torch.cat(recorder.values).median())


def feature_shift(
    net: nn.Module,
    images: Mapping[str, torch.Tensor | None],
    clinical: torch.Tensor | None,
    present: torch.Tensor,
) -> list[float]:
    """Per-study feature shift (see module doc): the mean z^2 over every BatchNorm layer of
    the encoders of the study's present imaging roles; 0 for a clinical-only study."""
    present = torch.as_tensor(present).to(torch.bool)
    out = []
    was_training = net.training
    try:
        net.eval()
        for b in range(int(present.shape[0])):
            imgs = {r: (None if x is None else x[b:b + 1]) for r, x in images.items()}
            clin = None if clinical is None else clinical[b:b + 1]
            with record_shift(list(net.encoders.values())) as rec, torch.no_grad():
                net.encode(imgs, clin, present[b:b + 1])
            out.append(shift_of(rec))
    finally:
        net.train(was_training)
    return out
