"""``medfusion score|predict --explain --dicom`` as a user runs them on the bundled samples:
the DICOM objects pass dciodvfy, the SR holds the scores.csv row, the maps lie on the source
CT slices, a NIfTI-only study gets none (run.json says why), the PHI-free outputs stay free
of identifiers, and ``--dicom-deidentified`` carries the study key instead. A real CT series
from the shared data checks the references to the source instances."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_dicom_results import dciodvfy_errors
from test_scoring_support import all_output_text, assert_no_sentinel
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.explain.dicom import NO_DICOM_SOURCE
from medfusion.testing.dicom_factory import SENTINELS

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"
MODEL = SAMPLES / "demo_model"


def _score(*args: str | Path) -> None:
    result = CliRunner().invoke(app, ["score", *map(str, args), "--workers", "0",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output[-2000:]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    shutil.copytree(SAMPLES / "studies" / "study-000", root / "study-000")
    (root / "nifti-only").mkdir()
    shutil.copy(SAMPLES / "studies" / "study-000" / "mr.nii.gz", root / "nifti-only")
    return root


@pytest.fixture(scope="module")
def scored(studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    _score(studies, "--model", MODEL, "--out", out, "--clinical", SAMPLES / "clinical.csv",
           "--explain", "--dicom", "--cam-method", "gradcam++")
    return out


def _sr_values(path: Path) -> tuple[dict[str, float], dict[str, list[str]]]:
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    numbers = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    coded: dict[str, list[str]] = {}
    for q in group.get_qualitative_evaluations():
        coded.setdefault(q.name.meaning, []).append(q.value.meaning)
    return numbers, coded


def test_objects_validate_and_sr_equals_the_scores_row(scored: Path):
    folder = scored / "dicom" / "study-000"
    assert sorted(p.name for p in folder.iterdir()) == ["ct_map.dcm", "sr.dcm",
                                                         "xray_map.dcm"]
    for path in folder.iterdir():
        assert dciodvfy_errors(path) == [], path.name
    with open(scored / "scores.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["study_id"] == "study-000")
    numbers, coded = _sr_values(folder / "sr.dcm")
    compared = 0
    for column, value in row.items():
        for prefix, meaning in (("prob_", "Calibrated probability of "),
                                ("weight_", "Modality weight of "),
                                ("shapley_", "Shapley value of ")):
            if column.startswith(prefix) and value:
                assert numbers[meaning + column[len(prefix):]] == pytest.approx(
                    float(value), abs=5e-7), column
                compared += 1
    assert compared >= 2 + 3 + 3  # two labels, three weights, three Shapley values (+ clinical)
    assert coded["Predicted label"] == [row["predicted"]]
    assert coded.get("Conformal prediction set member", []) == \
        [x for x in row["prediction_set"].split("|") if x]
    assert coded["Abstain"] == ["Yes" if row["abstain"] == "true" else "No"]
    assert sorted(coded.get("Flag", [])) == sorted(x for x in row["flags"].split("|") if x)
    assert "gradcampp" in pydicom.dcmread(folder / "ct_map.dcm").ContentDescription


def test_ct_map_frames_are_the_source_slices(scored: Path, studies: Path):
    sources = {}
    for path in (studies / "study-000" / "ct").iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = np.array([float(v) for v in ds.ImagePositionPatient])
        frame_of_reference = ds.FrameOfReferenceUID
    pm = pydicom.dcmread(scored / "dicom" / "study-000" / "ct_map.dcm")
    assert pm.FrameOfReferenceUID == frame_of_reference
    assert int(pm.NumberOfFrames) == len(sources)
    refs = set()
    for item in pm.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        assert np.abs(pos - sources[ref]).max() < 0.01
        refs.add(ref)
    assert refs == set(sources)
    assert pm.pixel_array.dtype == np.float32 and 0.0 <= pm.pixel_array.min()
    assert pm.pixel_array.max() == pytest.approx(1.0, abs=1e-6)


def test_identity_only_in_the_dicom_folder_and_nifti_study_gets_none(scored: Path):
    sr = pydicom.dcmread(scored / "dicom" / "study-000" / "sr.dcm")
    assert sr.PatientID == SENTINELS["PatientID"]  # files into the patient's study
    run = json.loads((scored / "run.json").read_text())
    entries = {v["dicom"]["folder"]: v for v in run["studies"].values()
               if v.get("dicom", {}).get("folder")}
    assert list(entries) == ["dicom/study-000"]
    nifti = [v for v in run["studies"].values() if v["dicom"]["folder"] is None]
    assert len(nifti) == 1 and nifti[0]["status"] == "scored"
    assert nifti[0]["dicom"]["skipped"]["study"] == NO_DICOM_SOURCE
    assert run["options"]["dicom"] == "identified"
    assert run["options"]["cam_method"] == "gradcam++"
    assert not (scored / "dicom" / "nifti-only").exists()
    assert (scored / "failures.csv").read_text().count("\n") == 1  # header only
    phi_free = scored.parent / "phi_free"
    shutil.copytree(scored, phi_free, ignore=shutil.ignore_patterns("dicom"))
    assert_no_sentinel(all_output_text(phi_free))


def test_deidentified_run_carries_the_study_key(studies: Path, tmp_path: Path):
    out = tmp_path / "out"
    _score(studies, "--model", MODEL, "--out", out, "--explain", "--dicom-deidentified",
           "--cam-method", "gradcam")
    run = json.loads((out / "run.json").read_text())
    key = next(k for k, v in run["studies"].items() if v["dicom"]["folder"])
    assert run["studies"][key]["dicom"]["deidentified"] is True
    for path in (out / "dicom" / "study-000").iterdir():
        assert dciodvfy_errors(path) == [], path.name
        ds = pydicom.dcmread(path)
        assert str(ds.PatientID) == key and str(ds.PatientName).rstrip("^") == key
    assert_no_sentinel(all_output_text(out))


def test_dicom_needs_explain(studies: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["score", str(studies), "--model", str(MODEL),
                                      "--out", str(tmp_path / "o"), "--dicom"])
    assert result.exit_code == 1 and "--explain" in result.output
    assert "PATIENT'S NAME" in CliRunner().invoke(app, ["score", "--help"]).output


def test_predict_writes_objects_next_to_the_csv(tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    with open(SAMPLES / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    fields = list(rows[0])
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in rows[:1]:
            writer.writerow({k: (str(SAMPLES / v) if k in ("ct", "mr", "xray") and v else v)
                             for k, v in r.items()})
    out = tmp_path / "pred" / "predictions.csv"
    result = CliRunner().invoke(app, ["predict", str(MODEL), "--manifest", str(manifest),
                                      "--out", str(out), "--explain", "--dicom",
                                      "--cam-method", "gradcam"])
    assert result.exit_code == 0, result.output[-2000:]
    folder = tmp_path / "pred" / "dicom" / rows[0]["study_id"]
    assert sorted(p.name for p in folder.iterdir()) == ["ct_map.dcm", "sr.dcm",
                                                         "xray_map.dcm"]
    with open(out, newline="") as handle:
        row = next(csv.DictReader(handle))
    numbers, _ = _sr_values(folder / "sr.dcm")
    label = next(c for c in row if c.startswith("prob_"))
    assert numbers["Calibrated probability of " + label[5:]] == pytest.approx(
        float(row[label]), abs=5e-7)


@pytest.mark.shared_data
def test_real_ct_series_references_its_instances(shared_data: Path, tmp_path: Path):
    """The GE head CT (18.5 degree tilt, uneven spacing: the loader resamples it): the map
    keeps one frame per source slice, at each slice's own position, and the SR lists every
    source instance."""
    series = shared_data / "dicom/dcm_qa_ct_ge/In/GE"
    study = tmp_path / "studies" / "ge-head"
    shutil.copytree(series, study / "ct")
    out = tmp_path / "out"
    _score(study.parent, "--model", MODEL, "--out", out, "--explain", "--dicom",
           "--cam-method", "gradcam")
    sources = {}
    for path in series.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = np.array([float(v) for v in ds.ImagePositionPatient])
    folder = out / "dicom" / "ge-head"
    pm = pydicom.dcmread(folder / "ct_map.dcm")
    assert int(pm.NumberOfFrames) == len(sources) == 28
    for item in pm.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        assert np.abs(pos - sources[ref]).max() < 0.01
    sr = pydicom.dcmread(folder / "sr.dcm")
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert evidence == set(sources)
    for path in folder.iterdir():
        assert dciodvfy_errors(path) == [], path.name
