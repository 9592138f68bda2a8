"""FusionNet configuration, refusals, modality dropout, head-only MC dropout and learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medfusion.errors import (
    InvalidValuesError,
    MedfusionError,
    ModalityMismatchError,
    RecipeError,
)
from medfusion.models.net import FusionNet, NetConfig, RoleNetConfig, tta_variants


def _config(**changes) -> NetConfig:
    base = dict(
        roles={"mr": RoleNetConfig("smallcnn", 3, (16, 16, 16)), "ct": {"grid": [16, 16, 16]}},
        n_clinical=2,
        n_classes=2,
        fusion="attention",
        embed_dim=8,
    )
    base.update(changes)
    return NetConfig(**base)


def test_config_round_trips_through_json_and_sorts_roles() -> None:
    cfg = _config()
    assert list(cfg.roles) == ["ct", "mr"]
    assert cfg.modalities == ["ct", "mr", "clinical"]
    text = json.dumps(cfg.to_dict())
    again = NetConfig.from_dict(json.loads(text))
    assert again == cfg and hash(again) == hash(cfg)
    assert NetConfig.from_json(cfg.to_json()) == cfg
    assert again.roles["ct"].grid == (16, 16, 16)


def test_clinical_only_and_image_only_configs() -> None:
    assert NetConfig(n_clinical=4, n_classes=2).modalities == ["clinical"]
    assert _config(n_clinical=0).modalities == ["ct", "mr"]


@pytest.mark.parametrize(
    "changes",
    [
        {"fusion": "transformer"},
        {"n_classes": 1},
        {"roles": {}, "n_clinical": 0},
        {"roles": {"clinical": RoleNetConfig(grid=(16, 16, 16))}},
        {"dropout": 1.0},
        {"modality_dropout": -0.1},
        {"n_clinical": -1},
    ],
)
def test_invalid_configs_are_refused_with_recipe_error(changes: dict) -> None:
    with pytest.raises(RecipeError):
        _config(**changes)


@pytest.mark.parametrize(
    "role",
    [
        {"encoder": "os.system"},
        {"encoder": "densenet121", "grid": [16, 16, 16]},  # too small for its reductions
        {"encoder": "smallcnn", "spatial_dims": 2, "grid": [16, 16, 4]},
        {"encoder": "smallcnn", "grid": [16, 16]},
        {"encoder": "smallcnn", "spatial_dims": 4},
    ],
)
def test_invalid_roles_are_refused(role: dict) -> None:
    with pytest.raises(RecipeError):
        RoleNetConfig.from_dict(role)


def test_from_dict_refuses_unknown_keys_and_non_mappings() -> None:
    with pytest.raises(RecipeError, match="unknown"):
        NetConfig.from_dict({"n_classes": 2, "n_clinical": 1, "module": "os"})
    with pytest.raises(RecipeError):
        NetConfig.from_dict(["n_classes", 2])  # type: ignore[arg-type]


def _net(**changes) -> FusionNet:
    torch.manual_seed(0)
    return FusionNet(_config(**changes)).eval()


def test_bad_inputs_raise_stable_errors() -> None:
    net = _net()
    images, clinical, present = net.dummy_inputs(2)
    none_present = present.clone()
    none_present[1] = False
    with pytest.raises(ModalityMismatchError):
        net(images, clinical, none_present)
    with pytest.raises(ModalityMismatchError, match="shaped"):
        net({**images, "ct": torch.zeros(2, 1, 8, 8, 8)}, clinical, present)
    with pytest.raises(ModalityMismatchError, match="present"):
        net({"mr": images["mr"]}, clinical, present)
    with pytest.raises(ModalityMismatchError):
        net(images, clinical, present[:, :2])
    with pytest.raises(ModalityMismatchError):
        net(images, None, present)
    bad = images["ct"].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidValuesError):
        net({**images, "ct": bad}, clinical, present)
    for err in (ModalityMismatchError, InvalidValuesError):
        assert issubclass(err, MedfusionError)


def test_present_defaults_to_the_inputs_given() -> None:
    net = _net()
    images, clinical, _ = net.dummy_inputs(2)
    with torch.no_grad():
        out = net({"ct": images["ct"]}, clinical)
    assert out.logits.shape == (2, 2)
    assert out.weights[:, 1].eq(0).all()  # mr absent


def test_modality_dropout_never_drops_everything_and_only_in_training() -> None:
    net = _net(modality_dropout=0.9).train()
    present = torch.ones(256, 3, dtype=torch.bool)
    present[::3, 0] = False
    torch.manual_seed(1)
    kept = net.drop_modalities(present)
    assert kept.any(dim=1).all()
    assert not (kept & ~present).any()  # never resurrects an absent modality
    assert kept.sum() < present.sum() * 0.5
    torch.manual_seed(1)
    assert torch.equal(kept, net.drop_modalities(present))  # follows torch.manual_seed
    net.eval()
    assert torch.equal(net.drop_modalities(present), present)


def test_single_present_sample_trains_with_batchnorm() -> None:
    # With modality dropout a modality may be present in one sample of a batch only.
    net = _net(modality_dropout=0.0).train()
    images, clinical, present = net.dummy_inputs(3)
    present[1:, 0] = False
    out = net({k: torch.randn_like(v) for k, v in images.items()}, clinical, present)
    out.logits.sum().backward()
    assert torch.isfinite(out.logits).all()


def test_head_and_encoder_parameters_partition_the_model() -> None:
    net = _net()
    head = {id(p) for p in net.head_parameters()}
    enc = {id(p) for p in net.encoder_parameters()}
    assert head and enc and not head & enc
    assert head | enc == {id(p) for p in net.parameters()}
    assert all(not isinstance(m, torch.nn.Dropout) or m.p > 0 for m in net.fusion_head.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in net.encoders.modules())


def test_mc_dropout_runs_only_the_head_after_one_encoder_pass() -> None:
    net = _net(dropout=0.5)
    images, clinical, present = net.dummy_inputs(2)
    images = {k: torch.randn_like(v) for k, v in images.items()}
    with torch.no_grad():
        emb = net.encode(images, clinical, present)
        net.fusion_head.train()  # dropout on in the head only
        torch.manual_seed(0)
        samples = torch.stack([net.head(emb, present).logits for _ in range(10)])
        net.fusion_head.eval()
        det = net.head(emb, present).logits
    assert samples.std(0).abs().sum() > 0
    assert torch.equal(det, net(images, clinical, present).logits.detach())


def test_attention_learns_to_weight_the_informative_modality() -> None:
    """The clinical record carries the label, the CT is the same volume for every study
    (uninformative): after a short training the model separates the classes and the
    attention has moved most weight to the clinical record (0.71 to 0.96 over seeds 0-3;
    0.5 at initialisation)."""
    torch.manual_seed(0)
    net = FusionNet(
        _config(roles={"ct": RoleNetConfig(grid=(16, 16, 16))}, modality_dropout=0.0, dropout=0.0)
    )
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 2
    clinical = torch.stack([y.float() * 2 - 1, torch.randn(32, generator=gen)], 1)
    clinical[:, 0] += 0.3 * torch.randn(32, generator=gen)
    ct = torch.randn(1, 1, 16, 16, 16, generator=gen).expand(32, -1, -1, -1, -1).contiguous()
    present = torch.ones(32, 2, dtype=torch.bool)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net({"ct": ct}, clinical, present).logits, y)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        out = net({"ct": ct}, clinical, present)
    assert (out.logits.argmax(1) == y).float().mean() >= 0.9
    assert out.weights[:, 1].mean() > 0.6


def test_input_standardisation_is_applied_before_the_encoder() -> None:
    """A role with shift/scale sees exactly the standardised input of an identity role."""
    plain = _net()
    shifted = _config(roles={"mr": {"grid": [16, 16, 16], "input_shift": 0.5,
                                    "input_scale": 0.04},
                             "ct": {"grid": [16, 16, 16]}})
    torch.manual_seed(0)
    net = FusionNet(shifted).eval()
    net.load_state_dict(plain.state_dict())
    images, clinical, present = plain.dummy_inputs(3)
    torch.manual_seed(1)
    x = torch.rand(3, 1, 16, 16, 16)
    with torch.no_grad():
        a = net.encode({"mr": x, "ct": images["ct"]}, clinical, present)
        b = plain.encode({"mr": (x - 0.5) / 0.04, "ct": images["ct"]}, clinical, present)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The standardisation is part of the stored configuration.
    assert NetConfig.from_json(shifted.to_json()).roles["mr"].input_scale == 0.04


def test_cards_without_input_standardisation_read_as_identity() -> None:
    old = RoleNetConfig.from_dict({"encoder": "smallcnn", "spatial_dims": 3,
                                   "grid": [16, 16, 16]})
    assert (old.input_shift, old.input_scale, old.standardizes) == (0.0, 1.0, False)
    for bad in ({"input_scale": 0.0}, {"input_scale": float("nan")},
                {"input_shift": float("inf")}):
        with pytest.raises(RecipeError, match="standardisation"):
            RoleNetConfig.from_dict({"grid": [16, 16, 16], **bad})


def test_tta_variants_are_the_distinct_flips_only() -> None:
    rng = np.random.default_rng(0)
    ct = rng.normal(size=(2, 1, 4, 5, 6)).astype(np.float32)
    xray = rng.normal(size=(2, 1, 4, 5, 1)).astype(np.float32)
    ids = np.array([[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]], dtype=np.float32)

    def distinct(variants: list) -> int:
        return len({tuple(v[r].tobytes() for r in sorted(v)) for v in variants})

    volume = tta_variants({"ct": ct, "history": ids})
    assert len(volume) == distinct(volume) == 8
    assert np.array_equal(volume[0]["ct"], ct)  # the identity first
    assert all(np.array_equal(v["history"], ids) for v in volume)  # notes never flipped
    radiograph = tta_variants({"xray": xray})
    assert len(radiograph) == distinct(radiograph) == 4  # its unit depth is not an axis
    assert len(tta_variants({"history": ids})) == 1  # a text-only model: no copies
