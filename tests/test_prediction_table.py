"""One predictions table: ``medfusion predict`` and ``medfusion score`` write the same values
in every shared column (Shapley values included), and the model card's format is checked."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.errors import ModelPackageError
from medfusion.inference import FusionModel, prediction_columns
from medfusion.models.card import CARD_FORMAT, ModelCard, check_format
from medfusion.scoring.outputs import score_columns

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"
MODEL = SAMPLES / "demo_model"


def _rows(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = {r["study_id"]: r for r in reader}
        return list(reader.fieldnames or []), rows


def test_predict_and_score_write_the_same_values(tmp_path: Path) -> None:
    runner = CliRunner()
    scored = runner.invoke(app, ["score", str(SAMPLES / "studies"), "--model", str(MODEL),
                                 "--out", str(tmp_path / "score"), "--clinical",
                                 str(SAMPLES / "clinical.csv"), "--explain",
                                 "--cam-method", "gradcam", "--workers", "0",
                                 "--no-progress"])
    assert scored.exit_code == 0, scored.output
    predicted = runner.invoke(app, ["predict", str(MODEL), "--manifest",
                                    str(SAMPLES / "manifest.csv"), "--out",
                                    str(tmp_path / "pred.csv"), "--explain",
                                    "--cam-method", "gradcam"])
    assert predicted.exit_code == 0, predicted.output
    score_cols, score_rows = _rows(tmp_path / "score" / "scores.csv")
    pred_cols, pred_rows = _rows(tmp_path / "pred.csv")
    model = FusionModel.load(MODEL)
    shared = prediction_columns(model.labels, model.modalities, shapley=True)
    # each command adds only its own bookkeeping columns to the shared table
    assert [c for c in score_cols if c in shared] == shared
    assert [c for c in pred_cols if c in shared] == shared
    assert set(score_cols) - set(shared) == {"status", *[f"saliency_{r}" for r in model.roles]}
    assert set(pred_cols) - set(shared) == {"error"}
    assert any(c.startswith("shapley_") for c in shared)
    assert sorted(score_rows) == sorted(pred_rows) and len(score_rows) == 4
    for study_id, row in score_rows.items():
        other = pred_rows[study_id]
        assert {c: row[c] for c in shared} == {c: other[c] for c in shared}, study_id
        assert row["shapley_ct"] != ""  # values, not two empty columns


def test_score_columns_put_status_second_and_saliency_last() -> None:
    cols = score_columns(["a", "b"], ["ct"], True, modalities=["ct", "clinical"])
    assert cols[:3] == ["study_id", "status", "predicted"]
    assert cols[-1] == "saliency_ct" and "shapley_clinical" in cols
    assert "shapley_ct" not in score_columns(["a", "b"], ["ct"], False)


def test_card_format_is_checked(tmp_path: Path) -> None:
    assert check_format(CARD_FORMAT) == 1
    with pytest.raises(ModelPackageError, match="version 2"):
        check_format("medfusion-model/2")
    with pytest.raises(ModelPackageError, match="not a medfusion model package"):
        check_format("other-model/1")
    with pytest.raises(ModelPackageError, match="no format version"):
        ModelCard.from_dict({"labels": ["a", "b"]})


def test_a_newer_package_is_refused_by_name(tmp_path: Path) -> None:
    newer = tmp_path / "model"
    shutil.copytree(MODEL, newer)
    card = json.loads((newer / "model.json").read_text(encoding="utf-8"))
    card["format"] = "medfusion-model/7"
    (newer / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelPackageError, match="format version 7"):
        FusionModel.load(newer)
    loaded = FusionModel.load(MODEL)
    assert loaded.card.format_version == 1 and loaded.card["format"] == CARD_FORMAT


def test_floats_keep_confident_probabilities_apart() -> None:
    # Fixed 6 decimals made every p below 5e-7 the same "0.000000": a report reading the
    # CSV then ranked a confident model's studies as ties.
    from medfusion.inference.table import fmt_float

    cells = [fmt_float(p) for p in (1e-9, 2e-8, 3e-7, 1 - 1e-7, 1 - 1e-8)]
    assert len(set(cells)) == 5
    assert [float(c) for c in cells] == sorted(float(c) for c in cells)
    assert fmt_float(-0.0) == "0" and fmt_float(float("nan")) == "" and fmt_float(None) == ""
