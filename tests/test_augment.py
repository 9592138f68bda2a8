"""Training-time augmentation: the default ``flip_affine`` turns, scales and shifts each
sample a little, deterministically for a seeded generator, without moving the grid."""

from __future__ import annotations

import pytest
import torch

from medfusion.training import trainer
from medfusion.training.recipe import load_recipe
from medfusion.training.trainer import _augment, _random_affine


def _box(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.zeros(shape)
    x[:, :, 10:22, 12:20, 8:24] = 1.0
    return x


def test_the_default_recipe_augments_with_flips_and_small_affines() -> None:
    recipe = load_recipe({"labels": ["a", "b"], "modalities": {"ct": {}}})
    assert recipe.augment == "flip_affine"
    assert recipe.tta is True  # test-time flips still follow the training flips


def test_zero_ranges_give_back_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no rotation, scaling or shift the resampling is the identity: the grid
    convention (align_corners=False, coordinate order K, J, I) moves no voxel."""
    for name in ("AFFINE_DEGREES", "AFFINE_SCALE", "AFFINE_SHIFT"):
        monkeypatch.setattr(trainer, name, 0.0)
    x = torch.rand(3, 1, 12, 10, 8)
    out = _random_affine(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)
    flat = torch.rand(2, 1, 16, 12, 1)
    assert torch.allclose(_random_affine(flat, torch.Generator().manual_seed(0)), flat,
                          atol=1e-5)


def test_each_sample_moves_a_little_and_keeps_its_size() -> None:
    x = _box((6, 1, 32, 32, 32))
    out = _random_affine(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    ratio = out.sum(dim=(1, 2, 3, 4)) / x.sum(dim=(1, 2, 3, 4))
    # scaling by 1 +- 0.1 changes a volume by at most 0.9^3 .. 1.1^3 (+ interpolation)
    assert bool((ratio > 0.7).all()) and bool((ratio < 1.36).all())
    changed = (out - x).abs().sum(dim=(1, 2, 3, 4)) / x.sum(dim=(1, 2, 3, 4))
    assert bool((changed > 0.05).all())  # every sample is transformed
    assert bool((changed < 1.2).all())  # ... but stays where it was, not somewhere else


def test_a_radiograph_turns_in_its_own_plane() -> None:
    x = torch.zeros(4, 1, 64, 64, 1)
    x[:, :, 20:44, 28:36, :] = 1.0
    out = _random_affine(x, torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    ratio = out.sum(dim=(1, 2, 3, 4)) / x.sum(dim=(1, 2, 3, 4))
    assert bool((ratio > 0.78).all()) and bool((ratio < 1.25).all())  # 0.9^2 .. 1.1^2


def test_the_same_generator_seed_gives_the_same_batch() -> None:
    x = {"ct": _box((4, 1, 32, 32, 32)), "notes": torch.ones(4, 16)}
    a = _augment(x, torch.Generator().manual_seed(5), "flip_affine")
    b = _augment(x, torch.Generator().manual_seed(5), "flip_affine")
    c = _augment(x, torch.Generator().manual_seed(6), "flip_affine")
    assert torch.equal(a["ct"], b["ct"])
    assert not torch.equal(a["ct"], c["ct"])
    flips_only = _augment(x, torch.Generator().manual_seed(5), "flip")
    assert not torch.equal(a["ct"], flips_only["ct"])  # the mode reaches the affine step
    assert a["notes"] is x["notes"]  # token ids are never resampled


def test_a_radiograph_rotation_is_in_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar across J tilts within the (I, J) plane: its extent along I grows."""
    monkeypatch.setattr(trainer, "AFFINE_DEGREES", 40.0)
    monkeypatch.setattr(trainer, "AFFINE_SCALE", 0.0)
    monkeypatch.setattr(trainer, "AFFINE_SHIFT", 0.0)
    x = torch.zeros(8, 1, 64, 64, 1)
    x[:, :, 30:34, 8:56, :] = 1.0
    out = _random_affine(x, torch.Generator().manual_seed(3))
    rows = (out[:, 0, :, :, 0] > 0.5).any(dim=2).sum(dim=1)
    assert int((rows > 10).sum()) >= 5, rows.tolist()
