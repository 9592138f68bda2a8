"""Uncertainty rises on out-of-distribution inputs, for a model trained by the public
``medfusion.train`` (its feature-shift reference is fitted on the validation split)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from medfusion.inference import FusionModel
from medfusion.testing.synthetic import write_cohort
from medfusion.training.dataset import load_input_volume
from medfusion.training.manifest import read_manifest
from medfusion.training.recipe import load_recipe
from medfusion.training.trainer import train
from medfusion.types import Study
from medfusion.uncertainty.shift import ShiftReference

RECIPE = {
    "labels": ["normal", "abnormal"],
    "modalities": {"ct": {"grid": [16, 16, 16]}, "mr": {"grid": [16, 16, 16]}},
    "clinical": {"age": {"type": "numeric"}, "sex": {"type": "categorical"},
                 "crp": {"type": "numeric"}},
    "fusion": "attention",
    "epochs": 8,
    "batch_size": 8,
    "val_fraction": 0.25,
    "test_fraction": 0.25,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ood")
    # 96 studies: the cohort's own split gives 15 validation studies (>= 10 needed to fit
    # the temperature and the feature-shift reference)
    cohort = write_cohort(root / "cohort", 96, seed=7, roles=("ct", "mr"),
                          formats={"ct": "nifti", "mr": "nifti"})
    model_dir = train(RECIPE, cohort.manifest, root / "model", seed=0, progress=False)
    model = FusionModel.load(model_dir)
    rows = [r for r in read_manifest(cohort.manifest, load_recipe(RECIPE)) if r.split == "test"]
    studies = [Study(key=f"st-{i}", clinical=r.clinical,
                     volumes={k: load_input_volume(p) for k, p in r.paths.items() if p})
               for i, r in enumerate(rows)]
    return model_dir, model, studies


def _noise(study: Study, rng: np.random.Generator) -> Study:
    vols = {r: dataclasses.replace(v, array=rng.normal(
        float(v.array.mean()), float(v.array.std()), v.array.shape).astype(np.float32))
        for r, v in study.volumes.items()}
    return dataclasses.replace(study, volumes=vols)


def _swapped(study: Study) -> Study:
    v = study.volumes
    return dataclasses.replace(study, volumes={"ct": v["mr"], "mr": v["ct"]})


def test_card_holds_the_validation_shift_reference(trained) -> None:
    model_dir, model, _ = trained
    card = json.loads((model_dir / "model.json").read_text())
    ref = card["calibration"]["shift"]
    assert ref["n"] == card["training"]["splits"]["val"]["n"] == len(ref["scores"])
    assert model.shift_reference == ShiftReference.from_dict(ref)


@pytest.mark.parametrize("kind", ["noise", "swapped"])
def test_uncertainty_is_higher_out_of_distribution(trained, kind: str) -> None:
    _, model, studies = trained
    complete = [s for s in studies if set(s.volumes) == {"ct", "mr"}]
    assert len(complete) >= 8
    rng = np.random.default_rng(3)
    held = [model.predict(s) for s in complete]
    ood = [model.predict(_noise(s, rng) if kind == "noise" else _swapped(s)) for s in complete]
    flagged = [("OUT_OF_DISTRIBUTION" in p.flags) for p in ood]
    assert np.mean(flagged) >= 0.8
    assert np.mean([("OUT_OF_DISTRIBUTION" in p.flags) for p in held]) <= 0.2
    assert np.median([p.shift_pvalue for p in ood]) < np.median([p.shift_pvalue for p in held])
    # the numbers a researcher reads rise: entropy, and a flagged study abstains with the
    # full label set (outside the conformal guarantee)
    assert np.mean([p.entropy for p in ood]) > np.mean([p.entropy for p in held])
    for p, f in zip(ood, flagged, strict=True):
        if f:
            assert p.abstain and set(p.prediction_set) == set(model.labels)
    # the distance-aware adjustment never changes the predicted class
    for p in ood:
        assert p.predicted == max(p.raw_probabilities, key=p.raw_probabilities.get)


def test_in_distribution_probabilities_are_only_temperature_scaled(trained) -> None:
    _, model, studies = trained
    ref = model.shift_reference
    within = 0
    for s in studies:
        p = model.predict(s)
        if p.feature_shift <= ref.threshold:
            within += 1
            raw = np.array([p.raw_probabilities[k] for k in model.labels])
            expected = model.calibrated(raw[None])[0]
            got = np.array([p.probabilities[k] for k in model.labels])
            np.testing.assert_allclose(got, expected, atol=1e-9)
    assert within >= len(studies) // 2  # most held-out studies lie within the range


def test_shift_reference_pvalues_and_threshold() -> None:
    ref = ShiftReference(tuple(float(v) for v in range(1, 100)), alpha=0.02)  # 1..99
    assert ref.threshold == 98.0  # ceil(100 * 0.98) = 98th smallest
    np.testing.assert_allclose(ref.pvalues([0.5, 50.0, 99.0, 500.0]),
                               [1.0, 51 / 100, 2 / 100, 1 / 100])
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    out = ref.adjust(probs, [98.0, 196.0])
    assert out[0].tolist() == [0.9, 0.1]  # at the threshold: untouched
    # twice the threshold: log-odds halved (ln 9 / 2 = ln 3), class kept
    np.testing.assert_allclose(out[1], [0.75, 0.25])
    small = ShiftReference((0.0, 0.0, 0.0))
    assert small.threshold > 0  # floored, so rounding noise is never "out of distribution"
