"""Train a tiny fusion model end to end, then check the package and predictions.

One 16-study synthetic cohort (NIfTI CT + MR + radiograph + clinical, some modalities
missing) is trained once per session at tiny grids; the tests use its package.
"""

from __future__ import annotations

import csv
import itertools
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from medfusion.errors import ModalityMismatchError, ModelPackageError, UntrustedCheckpointError
from medfusion.inference import FusionModel, predict_manifest
from medfusion.testing.synthetic import write_cohort
from medfusion.training.dataset import load_input_volume
from medfusion.training.trainer import train
from medfusion.types import Study

RECIPE = {
    "labels": ["normal", "abnormal"],
    "modalities": {"ct": {"grid": [16, 16, 16]}, "mr": {"grid": [16, 16, 16]},
                   "xray": {"grid": [32, 32, 1]}},
    # Not in alphabetical order on purpose: model.json sorts keys, loading must not care.
    "clinical": {"crp": {"type": "numeric"}, "sex": {"type": "categorical"},
                 "age": {"type": "numeric"}},
    "fusion": "attention",
    "epochs": 3,
    "batch_size": 8,
}
NIFTI = {"ct": "nifti", "mr": "nifti", "xray": "nifti"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, 16, seed=3, formats=NIFTI, missing_rate=0.15)
    # One training study's MR file is damaged: training must skip it, not die.
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    bad = next(r for r in rows if r["split"] == "train" and r["mr"])
    (root / bad["mr"]).write_bytes(b"\x1f\x8b garbage, not a NIfTI")
    return root


@pytest.fixture(scope="module")
def model_dir(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(RECIPE, cohort / "manifest.csv", tmp_path_factory.mktemp("m") / "model",
                 seed=0, progress=False)


def _study(cohort: Path, study_id: str) -> Study:
    row = next(r for r in csv.DictReader((cohort / "manifest.csv").open())
               if r["study_id"] == study_id)
    volumes = {r: load_input_volume(cohort / row[r]) for r in ("ct", "mr", "xray") if row[r]}
    clinical = {k: (row[k] or None) for k in ("age", "sex", "crp")}
    return Study(key=f"st-{study_id}", volumes=volumes, clinical=clinical)


def _complete_study_id(cohort: Path) -> str:
    for row in csv.DictReader((cohort / "manifest.csv").open()):
        if row["ct"] and row["mr"] and row["xray"] and row["split"] != "train":
            return row["study_id"]
    raise AssertionError("the cohort has no complete held-out study")


def test_package_holds_card_and_safetensors_only_ids_free(model_dir: Path) -> None:
    assert (model_dir / "model.json").is_file()
    assert (model_dir / "weights.safetensors").is_file()
    assert (model_dir / "metrics.jsonl").is_file()
    card = json.loads((model_dir / "model.json").read_text())
    for key in ("recipe", "labels", "roles", "net", "role_specs", "clinical", "training",
                "metrics", "calibration", "weights_sha256", "medfusion_version"):
        assert key in card
    assert card["role_specs"]["ct"]["grid"] == [16, 16, 16]
    assert card["clinical"]["preprocessor"]
    assert card["training"]["skipped"] == {"CORRUPT": 1} or sum(
        card["training"]["skipped"].values()) == 1
    assert "temperature" in card["calibration"]["temperature"]
    text = (model_dir / "model.json").read_text() + (model_dir / "metrics.jsonl").read_text()
    assert "study-0" not in text and "patient-0" not in text  # no identifiers in the card
    log = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    # staged training: unimodal encoders first (a validation AUROC per modality), then the
    # fusion head on their frozen embeddings (the fused validation AUROC)
    assert log[0]["epoch"] == 1 and log[0]["stage"] == "unimodal"
    assert {"val_auroc_ct", "val_auroc_mr", "val_auroc_clinical"} <= set(log[0])
    head = [r for r in log if r.get("stage") == "fusion_head"]
    assert head and "val_auroc" in head[0]
    # 2 validation studies: too few to fit a temperature or a feature-shift reference
    assert card["calibration"]["n"] < 10 and card["calibration"]["shift"] is None


def test_round_trip_gives_identical_predictions(model_dir: Path, cohort: Path,
                                                tmp_path: Path) -> None:
    from medfusion.models.package import load_package, save_package

    model = FusionModel.load(model_dir)
    study = _study(cohort, _complete_study_id(cohort))
    first = model.predict(study)
    card, tensors = load_package(model_dir)
    save_package(tmp_path / "copy", card=card, tensors=tensors)
    again = FusionModel.load(tmp_path / "copy").predict(study)
    assert again.probabilities == first.probabilities
    assert again.modality_weights == first.modality_weights
    # The test metrics measured at training time are reproduced by the loaded package.
    rows = [r for r in csv.DictReader((cohort / "manifest.csv").open()) if r["split"] == "test"]
    preds = [model.predict(_study(cohort, r["study_id"])) for r in rows]
    y = np.array([RECIPE["labels"].index(r["label"]) for r in rows])
    probs = np.array([[p.probabilities[lab] for lab in RECIPE["labels"]] for p in preds])
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1))))
    assert nll == pytest.approx(card["metrics"]["test"]["nll"], abs=1e-6)


def test_same_seed_same_model(model_dir: Path, cohort: Path, tmp_path: Path) -> None:
    again = train(RECIPE, cohort / "manifest.csv", tmp_path / "again", seed=0, progress=False)
    first = json.loads((model_dir / "model.json").read_text())["weights_sha256"]
    second = json.loads((again / "model.json").read_text())["weights_sha256"]
    assert first == second
    a = predict_manifest(model_dir, cohort / "manifest.csv", tmp_path / "a.csv")
    b = predict_manifest(again, cohort / "manifest.csv", tmp_path / "b.csv")
    assert a.read_bytes() == b.read_bytes()


def test_every_modality_subset_predicts(model_dir: Path, cohort: Path) -> None:
    model = FusionModel.load(model_dir)
    full = _study(cohort, _complete_study_id(cohort))
    parts = ["ct", "mr", "xray", "clinical"]
    for k in range(1, 5):
        for subset in itertools.combinations(parts, k):
            study = Study(key=full.key,
                          volumes={r: v for r, v in full.volumes.items() if r in subset},
                          clinical=full.clinical if "clinical" in subset else None)
            pred = model.predict(study)
            assert pred.modalities_used == tuple(subset)
            assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
            assert set(pred.modality_weights) == set(subset)
            assert sum(pred.modality_weights.values()) == pytest.approx(1.0, abs=1e-5)
            assert pred.predicted in model.labels
            assert pred.prediction_set is not None and pred.abstain == (
                len(pred.prediction_set) != 1)
    with pytest.raises(ModalityMismatchError):
        model.predict(Study(key=full.key, volumes={}, clinical=None))


def test_planted_pickle_never_runs(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - the classic pickle exploit
            return (open, (str(marker), "w"))

    planted = tmp_path / "planted"
    shutil.copytree(model_dir, planted)
    (planted / "weights.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UntrustedCheckpointError):
        FusionModel.load(planted)
    assert not marker.exists()


def test_tampered_weights_are_refused(model_dir: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    data = bytearray((tampered / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelPackageError):
        FusionModel.load(tampered)


def test_predict_manifest_rows(model_dir: Path, cohort: Path, tmp_path: Path) -> None:
    out = predict_manifest(model_dir, cohort / "manifest.csv", tmp_path / "p.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16
    columns = list(rows[0])
    # the predictions table (medfusion.inference.table), then predict's own error column;
    # Shapley values only when explanations are asked for
    assert columns == ["study_id", "predicted", "prob_normal", "prob_abnormal",
                       "raw_prob_normal", "raw_prob_abnormal", "entropy", "mutual_info",
                       "feature_shift", "shift_pvalue", "prediction_set", "abstain",
                       "modalities_used", "weight_ct", "weight_mr", "weight_xray",
                       "weight_clinical", "flags", "error"]
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and failed[0]["predicted"] == ""  # the damaged study
    for r in rows:
        if not r["error"]:
            assert float(r["prob_normal"]) + float(r["prob_abnormal"]) == pytest.approx(1, 1e-5)
            assert float(r["raw_prob_normal"]) + float(r["raw_prob_abnormal"]) == \
                pytest.approx(1, 1e-5)
            assert float(r["entropy"]) >= 0
            labels = r["prediction_set"].split("|") if r["prediction_set"] else []
            assert set(labels) <= {"normal", "abnormal"}
            assert r["abstain"] == ("false" if len(labels) == 1 else "true")


def test_kernel_fusion_round_trip(cohort: Path, tmp_path: Path) -> None:
    # Without flip TTA: Shapley values and attributions explain the un-flipped input, so
    # their exact totals are checked against the un-flipped prediction (docs/trust.md).
    recipe = {**RECIPE, "fusion": "kernel", "modalities": {"ct": {"grid": [16, 16, 16]}},
              "tta": False}
    path = train(recipe, cohort / "manifest.csv", tmp_path / "k", seed=1, progress=False)
    card = json.loads((path / "model.json").read_text())
    assert card["members"][0]["kernel"]["kind"] == "kernel_svm"
    study = _study(cohort, _complete_study_id(cohort))
    a = FusionModel.load(path).predict(study)
    b = FusionModel.load(path).predict(study)
    assert a.probabilities == b.probabilities
    assert a.modality_weights is None
    # Shapley values explain the SVM the model predicts with (not the network head): they
    # add up to its calibrated p(positive) minus the training base rate
    from medfusion.models.protocol import base_rate

    model = FusionModel.load(path)
    raw = np.array([[a.raw_probabilities[lab] for lab in model.labels]])
    p_pos = model.calibrated(raw)[0, 1]
    assert set(a.shapley) == {"ct", "clinical"}
    assert sum(a.shapley.values()) == pytest.approx(p_pos - base_rate(model, 1), abs=1e-6)


def test_half_precision_package_with_tta(cohort: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    recipe = {**RECIPE, "modalities": {"ct": {"grid": [16, 16, 16]}},
              "weights_dtype": "float16", "tta": True}
    path = train(recipe, cohort / "manifest.csv", tmp_path / "h", seed=0, progress=False)
    arrays = load_file(path / "weights.safetensors")
    floats = [a.dtype for a in arrays.values() if a.dtype.kind == "f"]
    assert floats and all(d == np.float16 for d in floats)
    card = json.loads((path / "model.json").read_text())
    model = FusionModel.load(path)
    rows = [r for r in csv.DictReader((cohort / "manifest.csv").open()) if r["split"] == "test"]
    y = np.array([RECIPE["labels"].index(r["label"]) for r in rows])
    preds = [model.predict(_study(cohort, r["study_id"])) for r in rows]
    probs = np.array([[p.probabilities[lab] for lab in RECIPE["labels"]] for p in preds])
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1))))
    # Training measured the rounded weights, with the same test-time flips.
    assert nll == pytest.approx(card["metrics"]["test"]["nll"], abs=1e-6)


def test_kernel_clinical_attributions_explain_the_svm(cohort: Path, tmp_path: Path) -> None:
    import dataclasses

    # Without flip TTA: Shapley values and attributions explain the un-flipped input, so
    # their exact totals are checked against the un-flipped prediction (docs/trust.md).
    recipe = {**RECIPE, "fusion": "kernel", "modalities": {"ct": {"grid": [16, 16, 16]}},
              "tta": False}
    path = train(recipe, cohort / "manifest.csv", tmp_path / "k", seed=1, progress=False)
    model = FusionModel.load(path)
    study = _study(cohort, _complete_study_id(cohort))
    prepared = model.prepare(study, keep_sources=True)
    pred = model.predict_prepared([prepared], explain=True)[0]
    attributions = pred.explanation.clinical_attributions
    assert set(attributions) == {"age", "sex", "crp"}
    # Shapley value sampling is exact in total: the values add up to the SVM's calibrated
    # p(target) with the record minus with the all-zero (training-mean) feature baseline
    baseline = dataclasses.replace(prepared, clinical=np.zeros_like(prepared.clinical))

    def p_target(prep) -> float:  # noqa: ANN001
        raw = model.raw_probabilities_arrays(*fm_stack(prep))
        return float(model.calibrated(raw)[0, model.labels.index(pred.predicted)])

    assert sum(attributions.values()) == pytest.approx(
        p_target(prepared) - p_target(baseline), abs=1e-6)


def fm_stack(prepared):  # noqa: ANN001, ANN201
    from medfusion.inference import stack_prepared

    return stack_prepared([prepared], ("ct",))
