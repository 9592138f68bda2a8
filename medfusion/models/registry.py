"""Named model components: image encoders and fusion heads.

Recipes name components from these registries (never import paths), so a recipe can only
build what is listed here.

Encoders map ``(B, C, *spatial)`` to ``(B, embed_dim)``. They are thin wrappers over
``monai.networks.nets`` / ``monai.networks.blocks``:

``smallcnn`` (default)
    A small residual 3D CNN from MONAI ``Convolution`` / ``ResidualUnit`` blocks
    (about 1 M parameters), built for 2 CPU cores.
``resnet10`` / ``resnet18``
    MONAI ``ResNet`` with a stride-2 stem (``conv1_t_stride=2``): the default stride-1 stem
    is about 7x slower on CPU for no measured gain at these grid sizes.
``densenet121``
    MONAI ``DenseNet121``. Needs a grid of at least 32 per axis (its five stride-2
    reductions would otherwise shrink a 16-voxel axis to nothing).

Normalisation: every encoder uses BatchNorm (MONAI's ResNet/DenseNet default, chosen for
``smallcnn`` too). In eval mode BatchNorm uses running statistics, so a sample's output does
not depend on the rest of its batch; :class:`medfusion.models.net.FusionNet` only ever feeds
an encoder the samples in which its modality is present, so zero-filled placeholders for
missing modalities never enter those statistics.

X-ray: an X-ray role uses ``spatial_dims=2``. The preprocessing hands an X-ray over as
``(1, I, J, 1)``; the 2D encoders accept ``(B, C, I, J)`` or ``(B, C, I, J, 1)`` and drop the
trailing unit axis (a 3D network on a depth-1 volume would waste most of its kernel and its
depth pooling would collapse the axis).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medfusion.errors import ModalityMismatchError, RecipeError
from medfusion.models.heads import (
    AttentionHead,
    ConcatHead,
    FusionHead,
    GatedHead,
    KernelHead,
    LateHead,
)

EncoderBuilder = Callable[..., nn.Module]


class _Encoder(nn.Module):
    """Wrap a backbone: squeeze the unit depth axis of 2D inputs, return (B, embed_dim)."""

    def __init__(self, backbone: nn.Module, spatial_dims: int, embed_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2 and x.ndim == 5:
            if x.shape[-1] != 1:
                raise ModalityMismatchError(
                    f"a 2D encoder got a volume of depth {x.shape[-1]}; an X-ray must be "
                    "(B, C, I, J) or (B, C, I, J, 1)"
                )
            x = x[..., 0]
        return self.backbone(x)


class SmallCNN(nn.Module):
    """A small residual CNN from MONAI blocks.

    A stride-2 stem convolution, then residual units that each halve the grid while doubling
    channels, global average pooling and a linear projection to ``embed_dim``. Stops halving
    once a 16-voxel axis would reach 2 voxels, so BatchNorm always sees more than one value
    per channel even for a single training sample.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        embed_dim: int = 64,
        channels: tuple[int, ...] = (16, 32, 64, 128),
    ) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit

        layers: list[nn.Module] = [
            Convolution(
                spatial_dims,
                in_channels,
                channels[0],
                strides=2,
                kernel_size=3,
                act="RELU",
                norm="BATCH",
            )
        ]
        n_units = len(channels) - 1
        for u, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            layers.append(
                ResidualUnit(
                    spatial_dims,
                    c_in,
                    c_out,
                    strides=1 if u == n_units - 1 else 2,
                    kernel_size=3,
                    subunits=2,
                    act="RELU",
                    norm="BATCH",
                )
            )
        self.features = nn.Sequential(*layers)
        pool = nn.AdaptiveAvgPool3d(1) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.pool = pool
        self.proj = nn.Linear(channels[-1], embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.proj(h)


def _smallcnn(spatial_dims: int, in_channels: int, embed_dim: int) -> nn.Module:
    return SmallCNN(spatial_dims=spatial_dims, in_channels=in_channels, embed_dim=embed_dim)


def _resnet(depth: int) -> EncoderBuilder:
    def build(spatial_dims: int, in_channels: int, embed_dim: int) -> nn.Module:
        from monai.networks.nets import resnet10, resnet18

        fn = {10: resnet10, 18: resnet18}[depth]
        return fn(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            num_classes=embed_dim,
        )

    build.__doc__ = f"MONAI resnet{depth} with a stride-2 stem, projecting to embed_dim."
    return build


def _densenet121(spatial_dims: int, in_channels: int, embed_dim: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=embed_dim)


#: encoder name -> builder(spatial_dims, in_channels, embed_dim) -> nn.Module
ENCODERS: dict[str, EncoderBuilder] = {
    "smallcnn": _smallcnn,
    "resnet10": _resnet(10),
    "resnet18": _resnet(18),
    "densenet121": _densenet121,
}

DEFAULT_ENCODER = "smallcnn"

#: smallest grid size per (in-plane) axis each encoder accepts: below it the stride-2
#: reductions shrink an axis to nothing (densenet121 fails at 16^3).
MIN_GRID: dict[str, int] = {"smallcnn": 8, "resnet10": 16, "resnet18": 16, "densenet121": 32}

#: fusion head name -> head class (see medfusion.models.heads for each head's maths)
FUSION_HEADS: dict[str, type[FusionHead]] = {
    "attention": AttentionHead,
    "concat": ConcatHead,
    "gated": GatedHead,
    "late": LateHead,
    "kernel": KernelHead,
}

DEFAULT_FUSION = "attention"


def _check_name(kind: str, name: str, choices: dict) -> None:
    if name not in choices:
        raise RecipeError(
            f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}"
        )


def build_encoder(
    name: str, *, spatial_dims: int = 3, in_channels: int = 1, embed_dim: int
) -> nn.Module:
    """Build the registered encoder ``name`` mapping (B, C, *spatial) to (B, embed_dim).

    ``spatial_dims=2`` builds a 2D encoder (for X-ray) that also accepts a trailing unit
    depth axis. Raises :class:`~medfusion.errors.RecipeError` for an unknown name or bad
    sizes.
    """
    _check_name("encoder", name, ENCODERS)
    if spatial_dims not in (2, 3):
        raise RecipeError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if int(in_channels) < 1 or int(embed_dim) < 1:
        raise RecipeError(
            f"in_channels and embed_dim must be positive, got {in_channels}, {embed_dim}"
        )
    backbone = ENCODERS[name](int(spatial_dims), int(in_channels), int(embed_dim))
    return _Encoder(backbone, int(spatial_dims), int(embed_dim))


def get_fusion_head(name: str) -> type[FusionHead]:
    """The fusion head class registered as ``name`` (RecipeError when unknown)."""
    _check_name("fusion head", name, FUSION_HEADS)
    return FUSION_HEADS[name]
