"""Occlusion sensitivity for one imaging role of a fusion network (wrapping MONAI).

The map answers the question a reader asks of a saliency figure, "where is the evidence?",
by experiment: a box of the role's input is replaced by the volume's mean intensity, the
whole fusion network is run again (other modalities and clinical features held fixed, as in
:class:`~medfusion.explain.gradcam.RoleForward`), and the drop of the target class
probability is credited to the box. ``monai.visualize.OcclusionSensitivity`` slides the box
over the model grid (``mask`` voxels per axis, half-box steps) and averages overlapping
boxes; a box whose removal *raises* the probability scores 0, then the map is scaled to
[0, 1] (maximum = most evidence; a map with no evidence anywhere is all zeros).

Why it is medfusion's default saliency: on a CT cohort with a planted lesion and a larger,
brighter decoy present in both classes (``pipelines/bench_saliency.py``), Grad-CAM's peak
fell on the lesion for 17% of positives and on the decoy for 52% although the model was
perfect (test AUROC 1.0); occlusion's peak fell on the lesion for 97% (docs/trust.md).
Grad-CAM weights feature channels by their mean gradient, so a channel that fires on every
bright blob lights up the biggest blob; occlusion only credits what changes the output.

Cost: one forward pass per box position: about (grid / step)^3 passes, i.e. ~1,300 at the
32^3 default grid (a few seconds per study on 2 CPU cores); Grad-CAM needs one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from medfusion.explain.gradcam import RoleForward, checked_request

#: box edge as a fraction of the smallest non-unit grid axis (32 -> 6 voxels)
MASK_FRACTION = 0.2
#: overlap of neighbouring boxes (0.5: the box moves by half its edge)
OVERLAP = 0.5
#: occluded copies per forward pass
BATCH = 64


def mask_voxels(grid: tuple[int, ...]) -> tuple[int, ...]:
    """The occlusion box per axis for a model grid: ``MASK_FRACTION`` of the smallest
    non-unit axis (at least 2 voxels), 1 along unit axes (a radiograph's depth)."""
    extents = [int(g) for g in grid if int(g) > 1]
    edge = max(2, int(round(MASK_FRACTION * min(extents)))) if extents else 1
    return tuple(1 if int(g) == 1 else min(edge, int(g)) for g in grid)


def role_occlusion(
    net: nn.Module,
    role: str,
    images: Mapping[str, torch.Tensor | None],
    clinical: torch.Tensor | None,
    present: torch.Tensor,
    target: int,
) -> np.ndarray:
    """Occlusion sensitivity of class ``target`` for ``role`` on the role's model grid:
    float64 (B, I, J, K) in [0, 1] (see the module docstring). Same inputs and refusals as
    :func:`~medfusion.explain.gradcam.role_cam`."""
    from monai.visualize import OcclusionSensitivity

    rc, x = checked_request(net, role, images, present, target)
    mask = mask_voxels(tuple(rc.grid))
    two_d = int(rc.spatial_dims) == 2
    was_training = net.training
    flags = {m: m.training for m in net.modules()}
    out = np.zeros((x.shape[0], *rc.grid), dtype=np.float64)
    try:
        net.eval()
        for b in range(x.shape[0]):
            one = {r: (None if v is None else v[b:b + 1]) for r, v in images.items()}
            wrapper = RoleForward(net, role, one, None if clinical is None
                                  else clinical[b:b + 1], torch.as_tensor(present)[b:b + 1])
            wrapper.eval()
            xb = one[role].detach().float()
            if two_d:
                xb = xb[..., 0]
            occlusion = OcclusionSensitivity(wrapper, mask_size=mask[:xb.ndim - 2],
                                             n_batch=BATCH, verbose=False, mode="mean_img",
                                             overlap=OVERLAP)
            with torch.no_grad(), warnings.catch_warnings():
                # MONAI indexes with a list of slices, which torch deprecates; the result is
                # still the documented one (tests/test_explain.py checks it on a known model).
                warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
                full = torch.softmax(wrapper(xb).double(), dim=1)[0, int(target)]
                occluded, _ = occlusion(xb)
            drop = (full - occluded[0, int(target)].double()).clamp(min=0.0).numpy()
            top = float(drop.max())
            drop = drop / top if top > 0 and math.isfinite(top) else np.zeros_like(drop)
            out[b] = drop.reshape(rc.grid)
    finally:
        net.train(was_training)
        for module, flag in flags.items():
            module.training = flag
    return out
