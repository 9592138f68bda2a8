"""Calibration that can remove a bias: a network whose logits all lean to one class must come
out of calibration with decisions no worse than always answering the majority label, and a
degenerate fit must say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medfusion as mf
from medfusion.testing.synthetic import write_cohort
from medfusion.training.trainer import _decisions_collapse, _preset_warnings
from medfusion.uncertainty.calibration import LogitScaler, TemperatureScaler, fit_calibration

REPO = Path(__file__).resolve().parents[1]


def _biased_logits(n: int, seed: int, offset: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits with real signal (AUROC ~0.85), 23% positives, all shifted to class 1."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.23).astype(int)
    margin = 1.6 * y + rng.normal(0.0, 1.0, n) + offset
    return np.stack([np.zeros(n), margin], axis=1), y


def test_temperature_alone_keeps_a_bias_the_offset_removes() -> None:
    z_val, y_val = _biased_logits(300, 0)
    z_test, y_test = _biased_logits(2000, 1)
    majority = 1 - y_test.mean()
    plain = TemperatureScaler().fit(z_val, y_val).transform(z_test)
    assert np.mean(plain.argmax(1) == y_test) < 0.3  # every study called positive
    scaler, report = fit_calibration(z_val, y_val)
    assert report["chosen"] == "bias" and scaler.bias is not None
    assert report["cv_nll"]["bias"] < report["cv_nll"]["temperature"]
    probs = scaler.transform(z_test)
    assert np.mean(probs.argmax(1) == y_test) >= majority
    # calibrated, not only re-thresholded: mean probability near the positive rate
    assert abs(probs[:, 1].mean() - y_test.mean()) < 0.05
    again = LogitScaler.from_dict(scaler.to_dict())
    np.testing.assert_array_equal(again.transform(z_test), probs)


def test_prior_correction_is_a_candidate_for_class_weighted_training() -> None:
    z_val, y_val = _biased_logits(300, 2, offset=0.0)
    weights = np.array([300 / (2 * (y_val == 0).sum()), 300 / (2 * (y_val == 1).sum())])
    # class weighting shifts the logits by log w: simulate it, then offer the correction
    shifted = z_val + np.log(weights)
    _, report = fit_calibration(shifted, y_val, prior_bias=-np.log(weights))
    assert set(report["cv_nll"]) == {"temperature", "prior", "bias"}
    assert report["chosen"] in ("prior", "bias")
    assert report["accuracy_calibrated"] >= report["majority_rate"]


def test_a_label_free_split_hits_the_bound_and_says_so() -> None:
    rng = np.random.default_rng(3)
    z = np.stack([np.zeros(200), rng.normal(0, 5, 200)], axis=1)  # no signal at all
    y = (rng.random(200) < 0.5).astype(int)
    scaler = TemperatureScaler().fit(z, y)
    assert scaler.to_dict()["bound_hit"] is True


def test_an_old_card_without_offsets_still_loads() -> None:
    scaler = LogitScaler.from_dict({"temperature": 2.0, "n_samples": 10})
    np.testing.assert_allclose(scaler.transform(np.array([[0.0, 2.0]])),
                               TemperatureScaler.from_dict({"temperature": 2.0})
                               .transform(np.array([[0.0, 2.0]])))


def test_collapse_guard() -> None:
    z, y = _biased_logits(200, 4)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert not _decisions_collapse(probs, y)  # biased, but an offset separates the classes
    flat = np.tile([[0.1, 0.9]], (200, 1))
    assert _decisions_collapse(flat, y)


def test_a_biased_network_is_calibrated_back_to_usable_decisions(tmp_path: Path) -> None:
    """The demo model's network with a constant added to its abnormal logit, large enough
    that every study is called abnormal."""
    model = mf.FusionModel.load(REPO / "data_samples" / "demo_model")
    cohort = write_cohort(tmp_path / "c", 48, seed=11, roles=("ct",))
    prepared, labels = [], []
    for study_id in cohort.study_ids:
        study = mf.load_study(cohort.study_dir(study_id))
        prepared.append(model.prepare(study, keep_sources=False))
        labels.append(int(cohort.subjects_labels[study_id] == "abnormal"))
    from medfusion.inference import stack_prepared

    images, clinical, present = stack_prepared(prepared, model.roles)
    raw = model.raw_probabilities_arrays(images, clinical, present)
    lean = float(np.max(np.log(raw[:, 0]) - np.log(raw[:, 1])))
    with torch.no_grad():  # just enough offset to tip every study to `abnormal`
        model.net.fusion_head.classifier[-1].bias[1] += lean + 2.0
    raw = model.raw_probabilities_arrays(images, clinical, present)
    y = np.asarray(labels)
    assert np.mean(raw.argmax(1) == 1) == 1.0  # the bias wins everywhere
    half = len(y) // 2
    logits = np.log(np.clip(raw, 1e-12, 1.0))
    scaler, report = fit_calibration(logits[:half], y[:half], folds=3)
    assert report["chosen"] == "bias"
    decided = scaler.transform(logits[half:]).argmax(1)
    majority = max(np.mean(y[half:]), 1 - np.mean(y[half:]))
    # Strictly better: on this balanced half, calling every study abnormal (what the bias
    # alone gives) scores exactly the majority rate.
    assert set(decided) == {0, 1}
    assert np.mean(decided == y[half:]) > majority


@pytest.mark.parametrize(("p01", "p99", "expected"), [
    (0.0, 255.0, "normalization: mr"), (0.0, 1.0, "normalization: none"), (-1024.0, 900.0, None)])
def test_ct_preset_on_non_hu_intensities_is_a_warning(p01: float, p99: float,
                                                      expected: str | None) -> None:
    from medfusion.training.dataset import PreparedDataset
    from medfusion.training.recipe import load_recipe

    rec = load_recipe({"labels": ["a", "b"], "modalities": {"ct": {}}})
    data = PreparedDataset(rows=[], splits=["train"] * 3, images={}, present=np.ones((3, 1)),
                           labels=np.zeros(3, dtype=int),
                           quantities={"ct": [{"p01": p01, "p99": p99}] * 3})
    warnings = _preset_warnings(data, np.arange(3), rec)
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0] and "Hounsfield" in warnings[0]


def test_calibration_split_is_held_back_from_epoch_selection(tmp_path: Path) -> None:
    import csv
    import json

    from medfusion.training.trainer import train

    cohort = write_cohort(tmp_path / "c", 70, seed=12, roles=("ct",), formats={"ct": "nifti"})
    with cohort.manifest.open(newline="") as handle:  # let the recipe's fractions split it
        rows = [{k: v for k, v in r.items() if k != "split"} for r in csv.DictReader(handle)]
    with cohort.manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    recipe = {"labels": ["normal", "abnormal"], "modalities": {"ct": {"grid": [16, 16, 16]}},
              "fusion": "concat", "epochs": 2, "batch_size": 8, "val_fraction": 0.35,
              "test_fraction": 0.1}
    model = train(recipe, cohort.manifest, tmp_path / "m", seed=0, progress=False)
    card = json.loads((model / "model.json").read_text())
    splits = card["training"]["splits"]
    assert splits["calibration"]["n"] >= 10 and splits["val"]["n"] >= 10
    assert card["calibration"]["independent"] is True
    assert card["calibration"]["conformal"]["nonempty"] is True
    assert len(card["calibration"]["conformal"]["scores"]) == splits["calibration"]["n"]
    # the scaler's two numbers at most are fitted on both halves, the conformal scores on one
    assert card["calibration"]["temperature"]["n_samples"] == (
        splits["calibration"]["n"] + splits["val"]["n"])
    assert card["metrics"]["calibration"]["n"] == splits["calibration"]["n"]
    assert card["training"]["history"] and "val_auroc" in card["training"]["history"][-1]
    assert not any("fewer than 20 validation" in w for w in card["training"]["warnings"])
    # Too few validation studies: both roles share them, and the card says so.
    small = train({**recipe, "val_fraction": 0.15}, cohort.manifest, tmp_path / "s", seed=0,
                  progress=False)
    card = json.loads((small / "model.json").read_text())
    assert card["calibration"]["independent"] is False
    assert card["calibration"]["temperature"]["n_samples"] in (0, card["training"]["splits"]
                                                                ["val"]["n"])
    assert "calibration" not in card["training"]["splits"]
    assert any("fewer than 20 validation" in w for w in card["training"]["warnings"])


def test_validation_from_train_moves_whole_patients_and_leaves_test_alone(tmp_path: Path
                                                                          ) -> None:
    import csv
    import json
    from collections import Counter

    from medfusion.training.dataset import PreparedCache, build_dataset
    from medfusion.training.manifest import assign_splits, read_manifest
    from medfusion.training.recipe import load_recipe
    from medfusion.training.trainer import _top_up_validation, train

    cohort = write_cohort(tmp_path / "c", 60, seed=5, roles=("ct",), formats={"ct": "nifti"})
    given = Counter(r["split"] for r in csv.DictReader(cohort.manifest.open(newline="")))
    recipe = {"labels": ["normal", "abnormal"], "modalities": {"ct": {"grid": [16, 16, 16]}},
              "fusion": "concat", "epochs": 1, "batch_size": 8, "ensemble": 1,
              "calibration_fraction": 0, "validation_from_train": 0.3}
    rec = load_recipe(recipe)
    rows = read_manifest(cohort.manifest, rec)
    data = build_dataset(rows, assign_splits(rows, val_fraction=0.15, test_fraction=0.15),
                         rec, PreparedCache(None))
    before = list(data.splits)
    _top_up_validation(data, rec, seed=0)
    moved = [i for i, (a, b) in enumerate(zip(before, data.splits, strict=True)) if a != b]
    assert moved and all(before[i] == "train" and data.splits[i] == "val" for i in moved)
    assert 0.2 * given["train"] <= len(moved) <= 0.4 * given["train"]
    side: dict[str, set[str]] = {}
    for row, split in zip(data.rows, data.splits, strict=True):
        side.setdefault(row.patient_id, set()).add(split)
    assert all(len(s) == 1 for s in side.values())  # a patient is never on both sides
    # auto: a validation split under half of val_fraction is topped up by 15%; this
    # cohort's own (about 15% of its patients) is left as it is
    auto = load_recipe({**recipe, "validation_from_train": "auto"})
    data = build_dataset(rows, assign_splits(rows, val_fraction=0.15, test_fraction=0.15),
                         auto, PreparedCache(None))
    assert _top_up_validation(data, auto, seed=0)["moved"] == 0
    val_patients = sorted({r.patient_id for r, s in zip(data.rows, data.splits, strict=True)
                           if s == "val"})
    data.splits[:] = ["train" if s == "val" and r.patient_id != val_patients[0] else s
                   for r, s in zip(data.rows, data.splits, strict=True)]
    n_train = data.splits.count("train")
    record = _top_up_validation(data, auto, seed=0)
    assert record["setting"] == "auto" and record["fraction"] == 0.15
    assert 0.1 * n_train <= record["moved"] <= 0.2 * n_train
    # through train: the card counts what moved, and the test split is the manifest's
    model = train(recipe, cohort.manifest, tmp_path / "m", seed=0, progress=False)
    splits = json.loads((model / "model.json").read_text())["training"]["splits"]
    assert splits["train"]["n"] == given["train"] - len(moved)
    assert splits["val"]["n"] == given["val"] + len(moved)
    assert splits["test"]["n"] == given["test"]


@pytest.mark.parametrize("bad", ["sometimes", None, 0.6, -0.1, True, float("nan")])
def test_validation_from_train_is_auto_or_a_share(bad: object) -> None:
    from medfusion.errors import RecipeError
    from medfusion.training.recipe import load_recipe

    base = {"labels": ["normal", "abnormal"], "modalities": {"ct": {}}}
    auto = load_recipe(base)
    assert auto.validation_from_train is None and auto.to_dict()["validation_from_train"] == "auto"
    assert load_recipe(auto.to_dict()) == auto
    assert load_recipe({**base, "validation_from_train": 0}).validation_from_train == 0.0
    with pytest.raises(RecipeError, match="`auto` or a number"):
        load_recipe({**base, "validation_from_train": bad})
