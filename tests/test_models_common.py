"""The common check suite, run over every registered encoder and every fusion head.

Each check is something a user relies on: the right output shape, finite outputs, a
sample's prediction not depending on its batch-mates (eval mode), bitwise CPU determinism
for a seed, and any non-empty subset of modalities predicting with absent ones ignored.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from medfusion.models.net import FusionNet, NetConfig, RoleNetConfig
from medfusion.models.registry import ENCODERS, FUSION_HEADS, MIN_GRID, build_encoder

EMBED = 16


def _grid(name: str) -> int:
    # The smallest grid each encoder supports keeps the suite fast (densenet121 needs 32).
    return max(16, MIN_GRID[name])


def _encoder(name: str, spatial_dims: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_encoder(name, spatial_dims=spatial_dims, embed_dim=EMBED).eval()


def _volume(batch: int, g: int, seed: int = 1, depth: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, g, g, depth if depth is not None else g, generator=gen)


def test_registry_lists_the_contracted_components() -> None:
    assert {"densenet121", "resnet10", "resnet18", "smallcnn"} <= set(ENCODERS)
    assert set(FUSION_HEADS) == {"attention", "concat", "gated", "late", "kernel"}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_shape_finite_batch_invariant_deterministic(name: str) -> None:
    g = _grid(name)
    x = _volume(3, g)
    enc = _encoder(name)
    with torch.no_grad():
        out = enc(x)
        alone = enc(x[1:2])
        again = _encoder(name)(x)
    assert out.shape == (3, EMBED)
    assert torch.isfinite(out).all()
    # Eval mode: a sample's embedding does not depend on the rest of the batch.
    torch.testing.assert_close(alone, out[1:2], rtol=1e-4, atol=1e-5)
    # Same seed, same weights, same input: bitwise the same output.
    assert torch.equal(out, again)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_2d_accepts_xray_with_unit_depth(name: str) -> None:
    g = _grid(name)
    enc = _encoder(name, spatial_dims=2)
    x = _volume(2, g, depth=1)  # the preprocessing hands X-ray over as (1, I, J, 1)
    with torch.no_grad():
        a = enc(x)
        b = enc(x[..., 0])
    assert a.shape == (2, EMBED)
    assert torch.equal(a, b)


def test_encoder_train_step_runs_and_changes_output() -> None:
    enc = _encoder("smallcnn").train()
    x = _volume(4, 16)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    before = enc.eval()(x).detach()
    enc.train()
    loss = enc(x).pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, enc.eval()(x).detach())


def _net(fusion: str, seed: int = 0) -> FusionNet:
    torch.manual_seed(seed)
    cfg = NetConfig(
        roles={
            "ct": RoleNetConfig("smallcnn", 3, (16, 16, 16)),
            "xray": RoleNetConfig("smallcnn", 2, (16, 16, 1)),
        },
        n_clinical=3,
        n_classes=3,
        fusion=fusion,
        embed_dim=EMBED,
    )
    return FusionNet(cfg).eval()


def _inputs(batch: int, seed: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = {
        "ct": torch.randn(batch, 1, 16, 16, 16, generator=gen),
        "xray": torch.randn(batch, 1, 16, 16, 1, generator=gen),
    }
    return images, torch.randn(batch, 3, generator=gen)


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]


@pytest.mark.parametrize("fusion", sorted(FUSION_HEADS))
def test_head_shape_finite_batch_invariant_deterministic(fusion: str) -> None:
    net = _net(fusion)
    assert net.modalities == ["ct", "xray", "clinical"]
    images, clinical = _inputs(4)
    present = torch.ones(4, 3, dtype=torch.bool)
    present[1, 0] = False  # a batch mixing complete and incomplete studies
    present[2, :2] = False
    with torch.no_grad():
        out = net(images, clinical, present)
        alone = net({k: v[2:3] for k, v in images.items()}, clinical[2:3], present[2:3])
        again = _net(fusion)(images, clinical, present)
    assert out.logits.shape == (4, 3)
    assert out.embeddings.shape == (4, 3, EMBED)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(alone.logits, out.logits[2:3], rtol=1e-4, atol=1e-5)
    assert torch.equal(out.logits, again.logits)
    if FUSION_HEADS[fusion].has_weights:
        assert out.weights is not None and out.weights.shape == (4, 3)
    else:
        assert out.weights is None


@pytest.mark.parametrize("fusion", sorted(FUSION_HEADS))
def test_every_nonempty_subset_predicts_and_absent_inputs_are_never_read(fusion: str) -> None:
    net = _net(fusion)
    images, clinical = _inputs(2)
    for subset in SUBSETS:
        present = torch.zeros(2, 3, dtype=torch.bool)
        present[:, list(subset)] = True
        # Absent inputs hold NaN: if the network read them, the output would be NaN.
        poisoned = {k: v.clone() for k, v in images.items()}
        poisoned_clin = clinical.clone()
        for m, name in enumerate(net.modalities):
            if m not in subset:
                if name == "clinical":
                    poisoned_clin.fill_(float("nan"))
                else:
                    poisoned[name].fill_(float("nan"))
        with torch.no_grad():
            out = net(poisoned, poisoned_clin, present)
            ref = net(images, clinical, present)
        assert torch.isfinite(out.logits).all(), subset
        assert torch.equal(out.logits, ref.logits), subset
        absent = ~present
        assert (out.embeddings[absent] == 0).all()
        if out.weights is not None:
            assert (out.weights[absent] == 0).all()
        if fusion == "attention":
            torch.testing.assert_close(out.weights.sum(1), torch.ones(2))


@pytest.mark.parametrize("fusion", sorted(FUSION_HEADS))
def test_forward_is_head_of_encode(fusion: str) -> None:
    net = _net(fusion)
    images, clinical = _inputs(3)
    present = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        full = net(images, clinical, present)
        emb = net.encode(images, clinical, present)
        split = net.head(emb, present)
    assert torch.equal(full.logits, split.logits)
    assert torch.equal(full.embeddings, emb)


@pytest.mark.parametrize("fusion", sorted(FUSION_HEADS))
def test_training_step_backpropagates_to_every_present_encoder(fusion: str) -> None:
    net = _net(fusion).train()
    images, clinical = _inputs(4)
    present = torch.ones(4, 3, dtype=torch.bool)
    torch.manual_seed(0)
    out = net(images, clinical, present)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head_parameters())
    for name in ("ct", "xray"):
        assert any(p.grad is not None for p in net.encoders[name].parameters())
