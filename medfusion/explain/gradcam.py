"""Grad-CAM and Grad-CAM++ for one imaging role of a fusion network (wrapping MONAI).

``monai.visualize.GradCAM`` explains a single-input classifier. A fusion network takes every
modality at once, so :class:`RoleForward` turns it into a single-input module for role
``r``: ``forward(x)`` runs the whole fusion network with ``x`` in role ``r`` and the other
inputs (other roles, clinical features, the presence mask) held fixed, and returns logits.

Target layer (chosen automatically per encoder, :func:`target_layer`): the deepest
convolutional block whose feature map still has at least ``MIN_CAM_CELLS`` cells along every
axis the input extends along (a 1-cell map cannot localise anything). Candidates, deepest
first, per registry encoder:

* ``smallcnn``: ``backbone.features.3``, ``.2``, ``.1``, ``.0`` (residual units, then stem);
  at 32^3 this is ``features.3`` (4^3 cells), at 16^3 ``features.1`` (4^3).
* ``resnet10`` / ``resnet18``: ``backbone.layer4``, ``layer3``, ``layer2``, ``layer1``;
  at 64^3 ``layer3`` (4^3).
* ``densenet121``: ``backbone.class_layers.relu`` (after ``norm5``), then
  ``backbone.features.denseblock3``, ``denseblock2``, ``denseblock1``.
* any other encoder: its convolution layers, deepest first.

Two MONAI habits are corrected here: its ``default_normalizer`` maps the maximum to 0 (it
*flips* the map, see its docstring), so a plain [0, 1] min-max is used instead; and its
hooks are never removed, so the ones added for a call are taken off afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from medfusion.errors import ExplanationError
from medfusion.models.net import RoleNetConfig

METHODS = ("gradcam", "gradcampp")
#: the smallest feature-map extent (per non-unit input axis) accepted as a Grad-CAM layer
MIN_CAM_CELLS = 6

_CANDIDATES: dict[str, tuple[str, ...]] = {
    "smallcnn": (
        "backbone.features.3",
        "backbone.features.2",
        "backbone.features.1",
        "backbone.features.0",
    ),
    "resnet10": ("backbone.layer4", "backbone.layer3", "backbone.layer2", "backbone.layer1"),
    "resnet18": ("backbone.layer4", "backbone.layer3", "backbone.layer2", "backbone.layer1"),
    "densenet121": (
        "backbone.class_layers.relu",
        "backbone.features.denseblock3",
        "backbone.features.denseblock2",
        "backbone.features.denseblock1",
    ),
}

_LAYER_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = (
    weakref.WeakKeyDictionary()
)


def role_config(net: nn.Module, role: str):  # noqa: ANN201 - a RoleNetConfig
    """The RoleNetConfig of ``role`` in ``net`` (ExplanationError naming the roles if none)."""
    roles = getattr(getattr(net, "config", None), "roles", None)
    if not isinstance(roles, Mapping) or role not in roles:
        known = sorted(roles) if isinstance(roles, Mapping) else []
        raise ExplanationError(
            f"the model has no imaging role {role!r} to explain (roles: {known})."
        )
    return roles[role]


def _candidates(encoder: nn.Module, encoder_name: str) -> list[str]:
    names = [n for n in _CANDIDATES.get(encoder_name, ()) if n in dict(encoder.named_modules())]
    if names:
        return names
    convs = [
        n for n, m in encoder.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)) and n
    ]
    return list(reversed(convs))


def candidate_layers(net: nn.Module, role: str) -> list[str]:
    """The layers (names inside ``net.encoders[role]``) :func:`target_layer` chooses from,
    deepest first."""
    rc = role_config(net, role)
    return _candidates(net.encoders[role], rc.encoder)


def target_layer(net: nn.Module, role: str) -> str:
    """The encoder layer (name inside ``net.encoders[role]``) Grad-CAM reads for ``role``.

    Decided once per encoder and grid by a dry forward pass of zeros (cached).
    """
    rc = role_config(net, role)
    encoder = net.encoders[role]
    key = (tuple(rc.grid), int(rc.spatial_dims), str(rc.encoder))
    cached = _LAYER_CACHE.get(encoder, {}).get(key)
    if cached is not None:
        return cached
    names = _candidates(encoder, rc.encoder)
    if not names:
        raise ExplanationError(f"the {rc.encoder!r} encoder of {role!r} has no conv layer.")
    modules = dict(encoder.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        modules[n].register_forward_hook(
            lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape[2:]))
        )
        for n in names
    ]
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            encoder(torch.zeros(1, 1, *rc.grid))
    finally:
        encoder.train(was_training)
        for h in handles:
            h.remove()
    input_axes = [g for g in rc.grid if g > 1]
    chosen = names[-1]
    for n in names:  # deepest first
        spatial = [s for s in shapes.get(n, ()) if s > 0]
        if len(spatial) >= len(input_axes) and all(
            s >= min(MIN_CAM_CELLS, g) for s, g in zip(sorted(spatial)[-len(input_axes):],
                                                        sorted(input_axes), strict=True)
        ):
            chosen = n
            break
    _LAYER_CACHE.setdefault(encoder, {})[key] = chosen
    return chosen


class RoleForward(nn.Module):
    """``forward(x) -> logits`` of the fusion network with ``x`` in ``role``; everything
    else fixed. For a 2D (X-ray) role ``x`` is (B, 1, I, J) and gains the unit depth axis.

    The other modalities' embeddings are computed once, without gradients, at construction:
    each Grad-CAM call then runs only this role's encoder and the fusion head (the encoders
    are independent, so the logits are exactly those of the full network in eval mode).
    """

    def __init__(
        self,
        net: nn.Module,
        role: str,
        images: Mapping[str, torch.Tensor | None],
        clinical: torch.Tensor | None,
        present: torch.Tensor,
    ) -> None:
        super().__init__()
        self.net = net
        self.role = role
        self.two_d = int(role_config(net, role).spatial_dims) == 2
        self._present = torch.as_tensor(present).to(torch.bool)
        self._index = list(net.modalities).index(role)
        self._only_role = torch.zeros_like(self._present)
        self._only_role[:, self._index] = True
        others = self._present.clone()
        others[:, self._index] = False
        was_training = net.training
        try:
            net.eval()
            with torch.no_grad():
                if bool(others.any(dim=1).all()):
                    fixed = net.encode(images, clinical, others)
                else:  # some sample has only this role: zeros elsewhere, as encode gives
                    fixed = net.encode(images, clinical, self._present).zero_()
        finally:
            net.train(was_training)
        self._fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-1) if self.two_d else x
        k = x.shape[0]
        fixed, present, only_role = self._fixed, self._present, self._only_role
        if fixed.shape[0] == 1 and k > 1:
            # One study's context, broadcast over a batch of variants of its role input
            # (occlusion sensitivity feeds many occluded copies at once).
            fixed = fixed.expand(k, -1, -1)
            present, only_role = present.expand(k, -1), only_role.expand(k, -1)
        emb_role = self.net.encode({self.role: x}, None, only_role[:k])[:, self._index]
        emb = fixed[:k].clone()
        emb[:, self._index] = emb_role
        return self.net.head(emb, present[:k]).logits


def _normalize01(cam: torch.Tensor) -> np.ndarray:
    """Per-sample min-max to [0, 1], maximum = most important; a flat map becomes zeros."""
    arr = cam.detach().cpu().double().numpy()
    out = np.zeros_like(arr)
    for b in range(arr.shape[0]):
        lo, hi = float(arr[b].min()), float(arr[b].max())
        if np.isfinite(lo) and np.isfinite(hi) and hi - lo > 1e-12:
            out[b] = (arr[b] - lo) / (hi - lo)
    return out


@contextmanager
def _temporary_hooks(module: nn.Module) -> Iterator[None]:
    """Remove the forward/backward hooks MONAI registers on ``module`` during the block."""
    before_fwd = set(module._forward_hooks)
    before_bwd = set(module._backward_hooks)
    inplace = getattr(module, "inplace", None)
    try:
        yield
    finally:
        # torch's RemovableHandle.remove() does exactly this; MONAI keeps no handle
        for key in set(module._forward_hooks) - before_fwd:
            module._forward_hooks.pop(key, None)
        for key in set(module._backward_hooks) - before_bwd:
            module._backward_hooks.pop(key, None)
        if inplace is not None:
            module.inplace = inplace


def checked_request(net: nn.Module, role: str, images: Mapping[str, torch.Tensor | None],
                    present: torch.Tensor, target: int) -> tuple[RoleNetConfig, torch.Tensor]:
    """The role's config and input tensor for a saliency request, refusing (ExplanationError)
    an unknown role, a role absent from any study of the batch and a target out of range."""
    rc = role_config(net, role)  # refuses a net without the role before it is indexed
    modalities = list(net.modalities)
    x = images.get(role)
    if x is None or not bool(torch.as_tensor(present)[:, modalities.index(role)].all()):
        raise ExplanationError(f"role {role!r} is absent from the study; nothing to explain.")
    n_classes = int(net.config.n_classes)
    if not 0 <= int(target) < n_classes:
        raise ExplanationError(f"target class {target} is outside 0..{n_classes - 1}.")
    return rc, x


def role_cam(
    net: nn.Module,
    role: str,
    images: Mapping[str, torch.Tensor | None],
    clinical: torch.Tensor | None,
    present: torch.Tensor,
    target: int,
    method: str = "gradcam",
    layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM (``"gradcam"``) or Grad-CAM++ (``"gradcampp"``) of class ``target`` for
    ``role``, upsampled to the role's model grid: float64 (B, I, J, K) in [0, 1].

    ``images`` / ``clinical`` / ``present`` are the network inputs (batch B); the role must be
    present in every sample. ``layer`` overrides the automatic :func:`target_layer`.
    """
    from monai.visualize import GradCAM, GradCAMpp

    if method not in METHODS:
        raise ExplanationError(f"unknown saliency method {method!r}; use one of {METHODS}.")
    rc, x = checked_request(net, role, images, present, target)
    layer = layer or target_layer(net, role)
    encoder_layer = dict(net.encoders[role].named_modules()).get(layer)
    if encoder_layer is None:
        raise ExplanationError(f"the encoder of {role!r} has no layer {layer!r}.")
    wrapper = RoleForward(net, role, images, clinical, present)
    x = x.detach().clone().float()
    if wrapper.two_d:
        x = x[..., 0]
    x.requires_grad_(True)  # hooks fire even when the weights are frozen
    cls = GradCAM if method == "gradcam" else GradCAMpp
    was_training = net.training
    flags = {m: m.training for m in net.modules()}
    # MONAI switches the wrapper to eval and afterwards back to the *wrapper's* previous
    # mode; a new nn.Module is in training mode, which would leave the network training
    # (BatchNorm statistics updated by the next forward pass): start it in eval mode and
    # restore every submodule's own flag afterwards.
    wrapper.eval()
    try:
        with _temporary_hooks(encoder_layer), torch.enable_grad():
            cam = cls(
                nn_module=wrapper,
                target_layers=f"net.encoders.{role}.{layer}",
                postprocessing=lambda t: t,
            )(x, class_idx=int(target))
    finally:
        net.train(was_training)
        for m, flag in flags.items():
            m.training = flag
        net.zero_grad(set_to_none=True)  # no gradients left behind on the weights
    out = _normalize01(cam[:, 0])
    if wrapper.two_d:
        out = out[..., None]
    expected = (x.shape[0], *rc.grid)
    if out.shape != expected:  # pragma: no cover - MONAI upsamples to the input size
        raise ExplanationError(f"Grad-CAM came out {out.shape}, expected {expected}.")
    return out
