"""The model package: round trip, hash check, and refusal of pickles without running them."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from medfusion.errors import ModelPackageError, UntrustedCheckpointError
from medfusion.models.net import FusionNet, NetConfig, RoleNetConfig
from medfusion.models.package import load_package, save_package


def _net() -> FusionNet:
    torch.manual_seed(0)
    cfg = NetConfig(
        roles={"ct": RoleNetConfig(grid=(16, 16, 16))}, n_clinical=2, n_classes=2, embed_dim=8
    )
    return FusionNet(cfg).eval()


def _save(tmp_path: Path) -> tuple[Path, FusionNet]:
    net = _net()
    card = {"net": net.config.to_dict(), "labels": ["normal", "abnormal"], "auc": float("nan")}
    out = save_package(tmp_path / "model", card=card, tensors=net.state_dict())
    return out, net


def test_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    out, net = _save(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]
    card, tensors = load_package(out)
    assert card["labels"] == ["normal", "abnormal"]
    assert card["auc"] is None  # JSON has no NaN
    assert card["weights_sha256"] == hashlib.sha256(
        (out / "weights.safetensors").read_bytes()
    ).hexdigest()
    assert "medfusion_version" in card
    again = FusionNet(NetConfig.from_dict(card["net"])).eval()
    again.load_state_dict(tensors)
    images, clinical, present = net.dummy_inputs(2)
    images = {k: torch.randn_like(v) for k, v in images.items()}
    clinical = torch.randn_like(clinical)
    with torch.no_grad():
        assert torch.equal(net(images, clinical, present).logits,
                           again(images, clinical, present).logits)


def test_resaving_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    out, _ = _save(tmp_path)
    save_package(out, card={"v": 2}, tensors={"w": torch.ones(3)})
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]
    card, tensors = load_package(out)
    assert card["v"] == 2 and torch.equal(tensors["w"], torch.ones(3))


def test_changed_weights_fail_the_hash_check(tmp_path: Path) -> None:
    out, _ = _save(tmp_path)
    path = out / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError) as info:
        load_package(out)
    assert not isinstance(info.value, UntrustedCheckpointError)
    assert "sha256" in str(info.value)


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("rehash", [False, True])
def test_planted_pickle_is_refused_without_running(tmp_path: Path, rehash: bool) -> None:
    """F1: a pickle in place of the weights never runs, even when the card's hash is
    updated to match it."""
    out, _ = _save(tmp_path)
    marker = tmp_path / "pwned.txt"
    payload = pickle.dumps({"state_dict": _Payload(marker)})
    (out / "weights.safetensors").write_bytes(payload)
    if rehash:
        card = json.loads((out / "model.json").read_text())
        card["weights_sha256"] = hashlib.sha256(payload).hexdigest()
        (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(UntrustedCheckpointError, match="pickle"):
        load_package(out)
    assert not marker.exists()


def test_pickle_protocol0_and_torch_zip_are_refused(tmp_path: Path) -> None:
    out, net = _save(tmp_path)
    marker = tmp_path / "pwned0.txt"
    (out / "weights.safetensors").write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(UntrustedCheckpointError):
        load_package(out)
    assert not marker.exists()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    (out / "weights.safetensors").write_bytes(buf.getvalue())
    with pytest.raises(UntrustedCheckpointError, match="zip"):
        load_package(out)


def test_a_torch_checkpoint_instead_of_safetensors_is_refused(tmp_path: Path) -> None:
    out, net = _save(tmp_path)
    (out / "weights.safetensors").unlink()
    marker = tmp_path / "pwned_pt.txt"
    (out / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UntrustedCheckpointError, match="safetensors"):
        load_package(out)
    assert not marker.exists()


def test_missing_or_broken_parts_raise_model_package_error(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError):
        load_package(tmp_path / "nowhere")
    out, _ = _save(tmp_path)
    (out / "model.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match="JSON"):
        load_package(out)
    (out / "model.json").write_text("[1, 2]")
    with pytest.raises(ModelPackageError):
        load_package(out)
    (out / "model.json").write_text("{}")
    with pytest.raises(ModelPackageError, match="weights_sha256"):
        load_package(out)
    (out / "model.json").unlink()
    with pytest.raises(ModelPackageError, match="model.json"):
        load_package(out)


def test_truncated_safetensors_with_matching_hash_is_refused(tmp_path: Path) -> None:
    out, _ = _save(tmp_path)
    data = (out / "weights.safetensors").read_bytes()[:-16]
    (out / "weights.safetensors").write_bytes(data)
    card = json.loads((out / "model.json").read_text())
    card["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError):
        load_package(out)


def test_card_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError):
        save_package(tmp_path / "m", card={"f": object()}, tensors={"w": torch.ones(1)})
    with pytest.raises(ModelPackageError):
        save_package(tmp_path / "m", card={1: "x"}, tensors={"w": torch.ones(1)})
    assert not (tmp_path / "m" / "model.json").exists()
