"""Clinical columns that do not match the model are never used silently, and one bad clinical
cell affects only its own study: ``medfusion score`` / ``medfusion predict`` on the bundled
demo model (whose clinical schema is age, crp, sex, smoker) and the training manifest."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.errors import ClinicalSchemaError, ManifestError
from medfusion.io.clinical import MISSING_TOKENS
from medfusion.training.manifest import read_manifest
from medfusion.training.recipe import load_recipe

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"
MODEL = SAMPLES / "demo_model"
CLINICAL = SAMPLES / "clinical.csv"  # study_id,age,sex,smoker,crp
MANIFEST = SAMPLES / "manifest.csv"
STUDIES = ("study-000", "study-001", "study-002")  # a subset: fewer studies, faster runs

runner = CliRunner()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _renamed(path: Path, out: Path, renames: dict[str, str]) -> Path:
    rows = _rows(path)
    renamed = [{renames.get(k, k): v for k, v in row.items()} for row in rows]
    return _write(out, renamed)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    for sid in STUDIES:
        shutil.copytree(SAMPLES / "studies" / sid, root / sid)
    return root


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo manifest, restricted to STUDIES, with absolute image paths (so variants of it
    can be written anywhere)."""
    rows = [r for r in _rows(MANIFEST) if r["study_id"] in STUDIES]
    for row in rows:
        for role in ("ct", "mr", "xray"):
            row[role] = str(SAMPLES / row[role])
    return _write(tmp_path_factory.mktemp("manifest") / "manifest.csv", rows)


def _score(studies: Path, out: Path, clinical: Path, *extra: str):  # noqa: ANN202 - Result
    return runner.invoke(app, ["score", str(studies), "--model", str(MODEL), "--out", str(out),
                               "--clinical", str(clinical), "--workers", "0", "--no-progress",
                               *extra])


def _predict(manifest: Path, out: Path, *extra: str):  # noqa: ANN202 - Result
    return runner.invoke(app, ["predict", str(MODEL), "--manifest", str(manifest), "--out",
                               str(out), *extra])


# -- columns that differ only in spelling ----------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--allow-missing-clinical",)])
def test_score_refuses_case_renamed_columns(studies: Path, tmp_path: Path,
                                            extra: tuple[str, ...]) -> None:
    clinical = _renamed(CLINICAL, tmp_path / "c.csv", {"age": "Age", "crp": "CRP"})
    out = tmp_path / "out"
    result = _score(studies, out, clinical, *extra)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "CLINICAL_SCHEMA" in text
    assert "`Age` for `age`" in text and "`CRP` for `crp`" in text and "rename" in text
    assert not (out / "scores.csv").exists()  # refused before anything was scored


@pytest.mark.parametrize("extra", [(), ("--allow-missing-clinical",)])
def test_predict_refuses_renamed_manifest_columns(manifest: Path, tmp_path: Path,
                                                  extra: tuple[str, ...]) -> None:
    renamed = _renamed(manifest, tmp_path / "m.csv", {"sex": "Sex", "crp": "crp (mg/L)"})
    out = tmp_path / "pred.csv"
    result = _predict(renamed, out, *extra)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "CLINICAL_SCHEMA" in text and "`Sex` for `sex`" in text
    assert "`crp (mg/L)` for `crp`" in text
    assert not out.exists()


def test_training_manifest_with_renamed_column_is_refused(manifest: Path,
                                                          tmp_path: Path) -> None:
    recipe = _demo_recipe()
    renamed = _renamed(manifest, tmp_path / "m.csv", {"age": "AGE"})
    with pytest.raises(ClinicalSchemaError, match="`AGE` for `age`"):
        read_manifest(renamed, recipe)


# -- columns absent from the file ------------------------------------------------------------


def test_score_absent_column_refused_then_accepted_with_flag(studies: Path,
                                                            tmp_path: Path) -> None:
    rows = _rows(CLINICAL)
    clinical = _write(tmp_path / "c.csv", rows, ["study_id", "age", "crp"])
    result = _score(studies, tmp_path / "refused", clinical)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "CLINICAL_SCHEMA" in text and "`sex`, `smoker`" in text
    assert "--allow-missing-clinical" in text
    assert not (tmp_path / "refused" / "scores.csv").exists()

    out = tmp_path / "accepted"
    result = _score(studies, out, clinical, "--allow-missing-clinical")
    assert result.exit_code == 0, result.output
    scored = _rows(out / "scores.csv")
    assert [r["study_id"] for r in scored] == list(STUDIES)
    for row in scored:
        assert "CLINICAL_COLUMNS_MISSING" in row["flags"].split("|")


def test_predict_absent_column_refused_then_accepted_with_flag(manifest: Path,
                                                              tmp_path: Path) -> None:
    columns = [c for c in _rows(manifest)[0] if c != "smoker"]
    partial = _write(tmp_path / "m.csv", _rows(manifest), columns)
    result = _predict(partial, tmp_path / "refused.csv")
    assert result.exit_code == 1 and "`smoker`" in " ".join(result.output.split())
    assert not (tmp_path / "refused.csv").exists()

    out = tmp_path / "pred.csv"
    result = _predict(partial, out, "--allow-missing-clinical")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == len(STUDIES) and all(r["error"] == "" for r in rows)
    assert all("CLINICAL_COLUMNS_MISSING" in r["flags"].split("|") for r in rows)


def test_complete_file_gets_no_missing_columns_flag(manifest: Path, tmp_path: Path) -> None:
    # The flag says something only when it is not on every row of every run.
    out = tmp_path / "pred.csv"
    result = _predict(manifest, out, "--allow-missing-clinical")
    assert result.exit_code == 0, result.output
    assert all("CLINICAL_COLUMNS_MISSING" not in r["flags"] for r in _rows(out))


# -- one bad cell, one study -----------------------------------------------------------------


def test_score_bad_cell_fails_only_its_study_and_none_is_missing(studies: Path,
                                                                 tmp_path: Path) -> None:
    rows = _rows(CLINICAL)
    by_id = {r["study_id"]: r for r in rows}
    by_id["study-000"].update(age="None", sex="none", smoker="NONE")  # missing, not text
    by_id["study-001"]["age"] = "abc"
    clinical = _write(tmp_path / "c.csv", rows)
    out = tmp_path / "out"
    result = _score(studies, out, clinical)
    assert result.exit_code == 2, result.output
    failures = _rows(out / "failures.csv")
    assert len(failures) == 1
    fail = failures[0]
    assert (fail["study_id"], fail["stage"], fail["code"]) == ("study-001", "clinical",
                                                               "CLINICAL_SCHEMA")
    assert "column `age`" in fail["message"]
    assert "abc" not in fail["message"] and "study-001" not in fail["message"]
    scored = {r["study_id"]: r for r in _rows(out / "scores.csv")}
    assert sorted(scored) == ["study-000", "study-002"]
    # "None" cells are missing values: the study still has a clinical record (crp).
    assert "no_clinical_record" not in scored["study-000"]["flags"]
    assert "clinical" in scored["study-000"]["modalities_used"].split("|")


def test_predict_bad_cell_is_an_error_row_others_scored(manifest: Path, tmp_path: Path) -> None:
    rows = _rows(manifest)
    rows[0].update(age="None", sex="None")
    rows[1]["sex"] = "Q"  # the demo schema has no levels: any text is a category
    rows[1]["crp"] = "abc"
    path = _write(tmp_path / "m.csv", rows)
    out = tmp_path / "pred.csv"
    result = _predict(path, out)
    assert result.exit_code == 0, result.output
    got = {r["study_id"]: r for r in _rows(out)}
    assert got["study-001"]["error"] == "CLINICAL_SCHEMA" and got["study-001"]["predicted"] == ""
    assert got["study-000"]["error"] == "" and got["study-000"]["predicted"]
    assert got["study-002"]["error"] == "" and got["study-002"]["predicted"]


# -- training: the data must be clean, "None" is missing there too --------------------------


def _demo_recipe():  # noqa: ANN202 - Recipe
    import json

    card = json.loads((MODEL / "model.json").read_text(encoding="utf-8"))
    return load_recipe(card["recipe"])


def test_training_manifest_reads_none_as_missing_and_refuses_bad_cells(manifest: Path,
                                                                       tmp_path: Path) -> None:
    recipe = _demo_recipe()
    rows = _rows(manifest)
    rows[0].update(age="None", sex="NONE", smoker=" none ", crp="N/A")
    parsed = read_manifest(_write(tmp_path / "ok.csv", rows), recipe)
    assert parsed[0].clinical == {"age": None, "crp": None, "sex": None, "smoker": None}
    rows[2]["crp"] = "abc"
    with pytest.raises(ManifestError) as err:
        read_manifest(_write(tmp_path / "bad.csv", rows), recipe)
    assert "Line 4, column `crp`" in err.value.message and "abc" not in err.value.message


def test_training_manifest_applies_schema_ranges_and_levels(tmp_path: Path) -> None:
    recipe = load_recipe({
        "labels": ["normal", "abnormal"],
        "clinical": {"age": {"type": "numeric", "range": [0, 120]},
                     "sex": {"type": "categorical", "levels": ["F", "M"]}},
    })
    base = {"study_id": "s1", "label": "normal", "age": "60", "sex": "f"}
    assert read_manifest(_write(tmp_path / "m.csv", [base]), recipe)[0].clinical == {
        "age": 60.0, "sex": "F"}
    for bad, column in (({"age": "150"}, "age"), ({"sex": "X"}, "sex")):
        with pytest.raises(ManifestError, match=rf"Line 2, column `{column}`"):
            read_manifest(_write(tmp_path / "m.csv", [{**base, **bad}]), recipe)
    # Prediction keeps the row and says why it cannot be scored.
    rows = read_manifest(_write(tmp_path / "m.csv", [{**base, "age": "150"}]), recipe,
                         require_labels=False, require_columns=False, bad_clinical="row")
    assert rows[0].clinical_error is not None and "column `age`" in rows[0].clinical_error


def test_one_missing_vocabulary() -> None:
    from medfusion.io import clinical as io_clinical
    from medfusion.io import manifest as io_manifest
    from medfusion.models import clinical as model_clinical
    from medfusion.training import manifest as training_manifest

    assert "none" in MISSING_TOKENS
    # No second copy of the vocabulary anywhere in the paths that read clinical cells (the
    # shared one may be re-exported, as io.clinical does).
    for module in (io_clinical, io_manifest, model_clinical, training_manifest):
        assert not any(isinstance(v, (set, frozenset)) and "n/a" in v
                       and v is not MISSING_TOKENS for v in vars(module).values()), module
