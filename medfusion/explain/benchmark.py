"""A planted-lesion task that checks explanations end to end, in world coordinates.

:func:`lesion_cohort` makes anisotropic source volumes (default 24 x 24 x 12 voxels of
1.0 x 1.0 x 2.5 mm, stored L-P-S like an axial DICOM series) in which a bright sphere
decides the label; :func:`train_lesion_model` fits a tiny :class:`FusionNet` on them
(through the real preprocessing, :func:`medfusion.preprocess.prepare_volume`); and
:func:`saliency_hits` maps each positive study's Grad-CAM back onto its source grid and
asks whether the peak lies on the lesion, measured in millimetres. Deterministic on CPU
(seeded data and initialisation, one thread recommended). Used by the test suite; also a
quick way to see whether an encoder/grid choice can localise at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medfusion.errors import ExplanationError
from medfusion.explain.export import saliency_to_source
from medfusion.explain.gradcam import role_cam
from medfusion.explain.occlusion import role_occlusion
from medfusion.models.net import FusionNet, NetConfig, RoleNetConfig
from medfusion.preprocess import RoleSpec, prepare_volume, to_tensor_input
from medfusion.types import Volume


@dataclass(frozen=True, eq=False)
class LesionStudy:
    """One synthetic study: its source volume, label, lesion centre (world mm) and radius,
    the prepared (model-grid) volume and its tensor (1, I, J, K)."""

    source: Volume
    label: int
    lesion_world: tuple[float, float, float] | None
    radius_mm: float
    prepared: Volume
    tensor: np.ndarray
    clinical: np.ndarray
    decoy_world: tuple[float, float, float] | None = None
    decoy_radius_mm: float = 0.0


def lesion_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Axial DICOM-like affine ``diag(-di, -dj, dk)`` centred on world 0."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2)
    return affine


def lesion_cohort(
    n: int,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (24, 24, 12),
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
    grid: tuple[int, int, int] = (24, 24, 24),
    radius_mm: float = 4.5,
    noise: float = 0.15,
    decoy_radius_mm: float | None = None,
    decoy_contrast: float = 1.0,
) -> list[LesionStudy]:
    """``n`` studies, alternating labels 0/1; positives carry one bright sphere placed at a
    random world position inside the field of view. Also a 2-feature clinical vector: the
    first weakly follows the label, the second is noise.

    ``decoy_radius_mm``: every study, positive and negative alike, also carries a *decoy*, a
    sphere of that radius and brightness ``decoy_contrast`` (the lesion's is 1) at a random
    position whose surface is at least 2 mm clear of the lesion's. The decoy is as likely in
    either class, so it carries no label information: a map that peaks on it points at a
    structure the decision cannot rest on. None (default): no decoy.
    """
    rng = np.random.default_rng(seed)
    affine = lesion_affine(shape, spacing)
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)
    half = (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    spec = RoleSpec(grid=grid, normalization="none", fit="resize")
    studies = []
    for i in range(n):
        label = i % 2
        array = rng.normal(0.0, noise, size=shape)
        # a smooth body-like background of random brightness and position, plus a random
        # global offset: the lesion raises the mean intensity by ~0.02, so without these
        # a network could decide from the global mean and nothing would be there to localise
        body = rng.uniform(-3.0, 3.0, size=2)
        array += rng.uniform(0.1, 0.5) * np.exp(
            -(((world[0] - body[0]) / 12) ** 2 + ((world[1] - body[1]) / 10) ** 2))
        array += rng.uniform(-0.3, 0.3)
        centre = None
        if label:
            margin = radius_mm + np.asarray([2.0, 2.0, 3.0])
            c = rng.uniform(-half + margin, half - margin)
            dist = np.sqrt(((world - c.reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
            array += np.clip(radius_mm + 0.5 - dist, 0.0, 1.0)
            centre = (float(c[0]), float(c[1]), float(c[2]))
        decoy = None
        if decoy_radius_mm is not None:
            d_margin = decoy_radius_mm + np.asarray([2.0, 2.0, 3.0])
            # rejection sampling, seeded: a decoy touching the lesion would make "on the
            # lesion" ambiguous; a negative draws its decoy the same way (no class cue)
            clear = radius_mm + decoy_radius_mm + 2.0
            for _ in range(1000):
                d = rng.uniform(-half + d_margin, half - d_margin)
                if centre is None or float(np.linalg.norm(d - np.asarray(centre))) >= clear:
                    break
            else:
                raise ExplanationError(
                    "the field of view is too small to keep the decoy clear of the lesion; "
                    "use a larger shape or smaller radii.", code="BAD_ARGUMENT")
            dist = np.sqrt(((world - d.reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
            array += decoy_contrast * np.clip(decoy_radius_mm + 0.5 - dist, 0.0, 1.0)
            decoy = (float(d[0]), float(d[1]), float(d[2]))
        source = Volume(array=array.astype(np.float32), affine=affine, modality="CT")
        prepared = prepare_volume(source, spec, role="ct")
        clinical = np.array([label + rng.normal(0.0, 1.5), rng.normal()], dtype=np.float32)
        studies.append(LesionStudy(source, label, centre, radius_mm, prepared,
                                   to_tensor_input(prepared), clinical, decoy,
                                   0.0 if decoy_radius_mm is None else decoy_radius_mm))
    return studies


def train_lesion_model(
    studies: list[LesionStudy],
    *,
    seed: int = 0,
    epochs: int = 12,
    dropout: float = 0.3,
    fusion: str = "attention",
    lr: float = 3e-3,
) -> torch.nn.Module:
    """A small FusionNet (``smallcnn`` on role ``ct`` + 2 clinical features) trained with
    Adam on ``studies``; returned in eval mode."""
    grid = tuple(int(g) for g in studies[0].tensor.shape[1:])
    torch.manual_seed(seed)
    net = FusionNet(NetConfig(
        roles={"ct": RoleNetConfig(grid=grid)}, n_clinical=2, n_classes=2, fusion=fusion,
        embed_dim=16, dropout=dropout, modality_dropout=0.2,
    ))
    x = torch.from_numpy(np.stack([s.tensor for s in studies]))
    c = torch.from_numpy(np.stack([s.clinical for s in studies]))
    y = torch.tensor([s.label for s in studies])
    present = torch.ones(len(studies), 2, dtype=torch.bool)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(studies), generator=gen)
        for start in range(0, len(order), 8):
            b = order[start:start + 8]
            loss = torch.nn.functional.cross_entropy(
                net({"ct": x[b]}, c[b], present[b]).logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def study_inputs(study: LesionStudy) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The network inputs of one study (batch of 1)."""
    return ({"ct": torch.from_numpy(study.tensor)[None]},
            torch.from_numpy(study.clinical)[None], torch.ones(1, 2, dtype=torch.bool))


def peak_world(saliency: Volume) -> np.ndarray:
    """World position (mm) of the saliency maximum."""
    ijk = np.unravel_index(int(np.argmax(saliency.array)), saliency.spatial_shape)
    return (saliency.affine @ np.array([*ijk, 1.0]))[:3]


def saliency_hits(
    net: torch.nn.Module,
    studies: list[LesionStudy],
    *,
    method: str = "gradcam",
    tolerance_mm: float = 0.0,
) -> list[float]:
    """For every positive study: distance (mm) from the source-grid saliency peak to the
    lesion surface (0 = on the lesion); ``tolerance_mm`` is subtracted."""
    out = []
    for s in studies:
        if s.lesion_world is None:
            continue
        images, clinical, present = study_inputs(s)
        cam = (role_occlusion(net, "ct", images, clinical, present, target=1)[0]
               if method == "occlusion"
               else role_cam(net, "ct", images, clinical, present, target=1, method=method)[0])
        mapped = saliency_to_source(cam, s.prepared, s.source)
        dist = float(np.linalg.norm(peak_world(mapped) - np.asarray(s.lesion_world)))
        out.append(max(0.0, dist - s.radius_mm - tolerance_mm))
    return out
