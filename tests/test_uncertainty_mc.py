"""MC dropout and deep ensembles on a real FusionNet: BatchNorm untouched, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medfusion.models.net as net_module
from medfusion.errors import CalibrationError


def _net(seed: int = 0, fusion: str = "attention", dropout: float = 0.3):
    torch.manual_seed(seed)
    config = net_module.NetConfig(
        roles={"ct": net_module.RoleNetConfig(grid=(16, 16, 16))},
        n_clinical=3,
        n_classes=2,
        fusion=fusion,
        embed_dim=16,
        dropout=dropout,
    )
    return net_module.FusionNet(config)


def _inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = {"ct": torch.randn(batch, 1, 16, 16, 16, generator=g)}
    clinical = torch.randn(batch, 3, generator=g)
    present = torch.ones(batch, 2, dtype=torch.bool)
    return images, clinical, present


def _buffers(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.named_buffers()}


@pytest.mark.parametrize("fusion", ["attention", "concat", "late"])
def test_batchnorm_statistics_bit_identical(fusion: str) -> None:
    from medfusion.uncertainty.mc import mc_dropout_probs

    net = _net(fusion=fusion)
    # make the running statistics non-trivial, then leave the net in *training* mode so a
    # naive net.train() implementation would visibly update them
    net.train()
    with torch.no_grad():
        net(*_inputs(batch=4, seed=7))
    assert any("running_mean" in k for k in _buffers(net))
    before = _buffers(net)
    flags = {name: m.training for name, m in net.named_modules()}
    probs = mc_dropout_probs(net, _inputs(), n_samples=8, seed=0)
    after = _buffers(net)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert {name: m.training for name, m in net.named_modules()} == flags
    assert probs.shape == (8, 3, 2)
    # the samples really are stochastic (dropout active) and really are probabilities
    assert probs.std(axis=0).max() > 1e-4
    np.testing.assert_allclose(probs.sum(-1), 1.0)


def test_deterministic_and_leaves_global_rng_alone() -> None:
    from medfusion.uncertainty.mc import mc_dropout_probs

    net = _net()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = mc_dropout_probs(net, _inputs(), n_samples=5, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    b = mc_dropout_probs(net, _inputs(), n_samples=5, seed=3)
    np.testing.assert_array_equal(a, b)
    c = mc_dropout_probs(net, _inputs(), n_samples=5, seed=4)
    assert not np.array_equal(a, c)


def test_embeddings_path_equals_inputs_path() -> None:
    from medfusion.uncertainty.mc import mc_dropout_probs

    net = _net().eval()
    images, clinical, present = _inputs()
    with torch.no_grad():
        emb = net.encode(images, clinical, present)
    a = mc_dropout_probs(net, emb, n_samples=4, seed=1, present=present, temperature=2.0)
    b = mc_dropout_probs(net, (images, clinical, present), n_samples=4, seed=1, temperature=2.0)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_ensemble_members_and_refusals() -> None:
    from medfusion.uncertainty.mc import ensemble_probs, mc_dropout_probs

    members = [_net(seed=s) for s in range(3)]
    probs = ensemble_probs(members, _inputs(), temperatures=[1.0, 1.5, 2.0])
    assert probs.shape == (3, 3, 2)
    assert not np.allclose(probs[0], probs[1])  # different members disagree
    with pytest.raises(CalibrationError):
        ensemble_probs([], _inputs())
    with pytest.raises(CalibrationError):
        ensemble_probs(members, _inputs(), temperatures=[1.0])
    with pytest.raises(CalibrationError):
        mc_dropout_probs(_net(dropout=0.0), _inputs(), n_samples=3)
    with pytest.raises(CalibrationError):
        mc_dropout_probs(_net(), _inputs(), n_samples=0)
