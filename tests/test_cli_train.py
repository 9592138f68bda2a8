"""`medfusion train` and `medfusion predict` through typer's CliRunner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.testing.synthetic import write_cohort

RECIPE = """\
labels: [normal, abnormal]
modalities:
  ct: {grid: [16, 16, 16]}
clinical:
  age: {type: numeric}
  sex: {type: categorical}
fusion: concat
epochs: 2
batch_size: 8
"""


def test_train_then_predict(tmp_path: Path) -> None:
    # CT as a DICOM series folder: the manifest path is a folder.
    write_cohort(tmp_path / "c", 12, seed=5, roles=("ct",))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--manifest",
                                 str(tmp_path / "c" / "manifest.csv"), "--out",
                                 str(tmp_path / "model"), "--seed", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "model.json").is_file()
    # The network standardises its CT input with the training split's statistics: the
    # windowed volumes are far from zero mean and unit variance, the stored values are not
    # the identity.
    role = json.loads((tmp_path / "model" / "model.json").read_text())["net"]["roles"]["ct"]
    assert 0.0 < role["input_shift"] < 1.0 and 0.0 < role["input_scale"] < 0.5
    result = runner.invoke(app, ["predict", str(tmp_path / "model"), "--manifest",
                                 str(tmp_path / "c" / "manifest.csv"), "--out",
                                 str(tmp_path / "pred.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 12
    assert {"study_id", "predicted", "prob_normal", "prob_abnormal"} <= set(rows[0])
    assert all(r["predicted"] in ("normal", "abnormal") for r in rows)

    # Training again into the same folder is refused before any work, the model untouched;
    # --overwrite replaces the package files and keeps the user's own files.
    card = (tmp_path / "model" / "model.json").read_bytes()
    (tmp_path / "model" / "my_notes.txt").write_text("keep me")
    args = ["train", str(tmp_path / "recipe.yaml"), "--manifest",
            str(tmp_path / "c" / "manifest.csv"), "--out", str(tmp_path / "model"), "--quiet"]
    refused = runner.invoke(app, [*args, "--seed", "3"])
    assert refused.exit_code == 1 and "OUTPUT_EXISTS" in refused.output
    assert "--overwrite" in refused.output
    assert (tmp_path / "model" / "model.json").read_bytes() == card
    replaced = runner.invoke(app, [*args, "--seed", "3", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (tmp_path / "model" / "model.json").read_bytes() != card
    assert (tmp_path / "model" / "my_notes.txt").read_text() == "keep me"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x\n")
    refused = runner.invoke(app, [*args[:-3], "--out", str(other), "--quiet"])
    assert refused.exit_code == 1 and "OUTPUT_EXISTS" in refused.output


def test_bad_recipe_is_one_clean_error_line(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text("labels: [a, b]\nmodalities: {ct: {}}\nlr: 3\n")
    (tmp_path / "m.csv").write_text("study_id,label,ct\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--manifest",
                                      str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "[RECIPE]" in result.output
    assert "Traceback" not in result.output


def test_predict_refuses_a_missing_model(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("study_id\ns1\n")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nope"), "--manifest",
                                      str(tmp_path / "m.csv"), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 1
    assert "[MODEL_PACKAGE]" in result.output


def test_unwritable_model_folder_fails_before_training(tmp_path: Path) -> None:
    write_cohort(tmp_path / "c", 4, seed=5, roles=("ct",), formats={"ct": "nifti"})
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "taken").write_text("a file, not a folder")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--manifest",
                                      str(tmp_path / "c" / "manifest.csv"), "--out",
                                      str(tmp_path / "taken"), "--quiet"])
    assert result.exit_code == 1
    assert "[OUTPUT]" in result.output


def test_train_says_how_many_studies_moved_to_validation(tmp_path: Path) -> None:
    write_cohort(tmp_path / "c", 24, seed=5, roles=("ct",), formats={"ct": "nifti"})
    (tmp_path / "recipe.yaml").write_text(
        "labels: [normal, abnormal]\nmodalities:\n  ct: {grid: [16, 16, 16]}\n"
        "fusion: concat\nepochs: 1\nbatch_size: 8\nensemble: 1\nvalidation_from_train: 0.3\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--manifest",
                                      str(tmp_path / "c" / "manifest.csv"), "--out",
                                      str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    moved = card["training"]["validation_from_train"]
    assert moved["setting"] == "fixed" and moved["moved"] > 0
    assert (f"validation split: {moved['moved']} studies moved from the training split"
            in " ".join(result.output.split()))
