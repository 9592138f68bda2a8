"""The plain-torch ``smallcnn`` against the MONAI blocks it mirrors: same state-dict keys and
shapes, and bit-identical outputs and gradients with the same weights (3D and 2D)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from medfusion.errors import RecipeError
from medfusion.models.registry import SmallCNN


def _monai_features(spatial_dims: int, channels: tuple[int, ...]) -> nn.Sequential:
    """The stack the encoder was first written with (MONAI blocks)."""
    layers: list[nn.Module] = [Convolution(spatial_dims, 1, channels[0], strides=2,
                                           kernel_size=3, act="RELU", norm="BATCH")]
    n_units = len(channels) - 1
    for u, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        layers.append(ResidualUnit(spatial_dims, c_in, c_out,
                                   strides=1 if u == n_units - 1 else 2, kernel_size=3,
                                   subunits=2, act="RELU", norm="BATCH"))
    return nn.Sequential(*layers)


@pytest.mark.parametrize(("spatial_dims", "shape"), [(3, (2, 1, 16, 16, 16)), (2, (2, 1, 24, 20))])
def test_same_weights_give_the_same_bytes_as_the_monai_blocks(spatial_dims: int,
                                                               shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    ours = SmallCNN(spatial_dims=spatial_dims, in_channels=1, embed_dim=8)
    reference = _monai_features(spatial_dims, (16, 32, 64, 128))
    state = ours.features.state_dict()
    assert {k: v.shape for k, v in state.items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    # Random running statistics too, so eval-mode BatchNorm is not the identity.
    state = {k: (torch.rand_like(v) + 0.5 if v.is_floating_point() else v)
             for k, v in state.items()}
    ours.features.load_state_dict(state, strict=True)
    reference.load_state_dict(state, strict=True)
    x = torch.randn(*shape)
    for train in (False, True):
        ours.train(train)
        reference.train(train)
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        out_a, out_b = ours.features(a), reference(b)
        assert torch.equal(out_a, out_b)
        out_a.square().sum().backward()
        out_b.square().sum().backward()
        assert torch.equal(a.grad, b.grad)


def test_equal_channels_are_refused() -> None:
    with pytest.raises(RecipeError):
        SmallCNN(channels=(16, 16, 32))
