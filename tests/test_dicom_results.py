"""DICOM result objects (medfusion.explain.dicom): a TID 1500 Comprehensive 3D SR and
parametric maps on the source series' own grid, written for tiny synthetic series, checked
with dciodvfy (dicom3tools) and read back with highdicom."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medfusion.explain.dicom import (
    NO_DICOM_SOURCE,
    DicomResults,
    ModelIdentity,
    write_dicom_results,
)
from medfusion.io.volume import load_volume
from medfusion.testing.dicom_factory import SENTINELS, write_radiograph, write_series
from medfusion.types import Explanation, Prediction, Volume

MODEL = ModelIdentity(name="demo_model", version="0.1.0", card_sha256="ab" * 32)


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy reports for one file (warnings are not errors)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; "
                    "apt-get install dicom3tools to validate DICOM objects")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines()
            if line.startswith("Error")]


def _prediction(flags: tuple[str, ...] = ("ROLE_NOT_USED:mr",)) -> Prediction:
    return Prediction(
        study_key="st-0123456789ab", labels=("normal", "abnormal"),
        probabilities={"normal": 0.312345, "abnormal": 0.687655},
        raw_probabilities={"normal": 0.3, "abnormal": 0.7}, predicted="abnormal",
        modalities_used=("ct", "xray"), modality_weights={"ct": 0.6, "xray": 0.4},
        prediction_set=("abnormal",), abstain=False, shapley={"ct": 0.11, "xray": -0.02},
        flags=flags)


def _map_on(volume: Volume, seed: int = 1) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(array=rng.random(volume.spatial_shape).astype(np.float32),
                  affine=volume.affine)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Volume]:
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    write_series(root / "ct", rng.normal(0, 100, (16, 12, 5)), seed=3)
    write_radiograph(root / "xray.dcm", rng.integers(0, 4000, (20, 24)))
    return {"ct": load_volume(root / "ct"), "xray": load_volume(root / "xray.dcm")}


def _write(study: dict[str, Volume], out: Path, *, deidentify: bool = False,
           pred: Prediction | None = None) -> tuple[DicomResults, Explanation]:
    explanation = Explanation(saliency={r: _map_on(v) for r, v in study.items()})
    results = write_dicom_results(pred or _prediction(), explanation, study, out,
                                  model=MODEL, study_key="st-0123456789ab", alpha=0.1,
                                  deidentify=deidentify)
    return results, explanation


@pytest.mark.parametrize("deidentify", [False, True])
def test_every_object_passes_dciodvfy(study: dict[str, Volume], tmp_path: Path,
                                      deidentify: bool):
    results, _ = _write(study, tmp_path, deidentify=deidentify)
    assert results.sr is not None and set(results.maps) == {"ct", "xray"}
    for path in [results.sr, *results.maps.values()]:
        assert dciodvfy_errors(path) == [], path.name


def test_map_frames_lie_on_the_source_slices(study: dict[str, Volume], tmp_path: Path):
    results, explanation = _write(study, tmp_path)
    source = study["ct"].dicom
    assert source is not None
    ds = pydicom.dcmread(results.maps["ct"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert ds.SOPInstanceUID not in {i.sop_instance_uid for i in source.instances}
    assert ds.SeriesInstanceUID != source.series_instance_uid
    assert ds.StudyInstanceUID == source.study_instance_uid
    assert ds.FrameOfReferenceUID == source.frame_of_reference_uid
    assert int(ds.NumberOfFrames) == len(source.instances) == 5
    assert (int(ds.Rows), int(ds.Columns)) == (source.rows, source.columns)
    by_uid = {i.sop_instance_uid: i.position for i in source.instances}
    frames = ds.pixel_array
    sal = np.asarray(explanation.saliency["ct"].array)
    seen = set()
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.abs(pos - np.array(by_uid[ref])).max() < 0.01
        k = [i.sop_instance_uid for i in source.instances].index(ref)
        seen.add(ref)
        # the loader's grid is the series' own: frame n is slice k of the map, exactly
        np.testing.assert_allclose(frames[n], sal[:, :, k].T, atol=1e-6)
    assert seen == set(by_uid)
    iop = [float(v) for v in ds.SharedFunctionalGroupsSequence[0]
           .PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(iop, source.orientation, atol=1e-6)


def test_tilted_series_map_keeps_the_source_planes(tmp_path: Path):
    """A tilted, resampled series: the map is sampled back onto each original plane."""
    write_series(tmp_path / "ct", np.random.default_rng(2).normal(0, 50, (12, 10, 6)),
                 tilt_deg=12.0, seed=5)
    volume = load_volume(tmp_path / "ct")
    assert volume.meta.get("resampled")
    source = volume.dicom
    assert source is not None
    flat = Volume(array=np.full(volume.spatial_shape, 0.5, np.float32), affine=volume.affine)
    results = write_dicom_results(_prediction(), Explanation(saliency={"ct": flat}),
                                  {"ct": volume}, tmp_path / "out", model=MODEL,
                                  study_key="st-x")
    ds = pydicom.dcmread(results.maps["ct"])
    assert int(ds.NumberOfFrames) == len(source.instances) == 6
    want = sorted(tuple(i.position) for i in source.instances)
    got = sorted(tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                 for f in ds.PerFrameFunctionalGroupsSequence)
    assert np.abs(np.array(want) - np.array(got)).max() < 0.01
    assert float(ds.pixel_array.max()) == pytest.approx(0.5)


def test_radiograph_map_is_one_frame_over_the_image(study: dict[str, Volume], tmp_path: Path):
    results, explanation = _write(study, tmp_path)
    ds = pydicom.dcmread(results.maps["xray"])
    assert int(ds.NumberOfFrames) == 1
    source = study["xray"].dicom
    assert source is not None
    ref = (ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
           .SourceImageSequence[0].ReferencedSOPInstanceUID)
    assert ref == source.instances[0].sop_instance_uid
    np.testing.assert_allclose(ds.pixel_array,
                               np.asarray(explanation.saliency["xray"].array)[:, :, 0].T,
                               atol=1e-6)


def _evidence(ds: pydicom.Dataset) -> set[str]:
    """SOP instances an SR lists as evidence (this study's and other studies')."""
    return {r.ReferencedSOPInstanceUID
            for name in ("CurrentRequestedProcedureEvidenceSequence",
                         "PertinentOtherEvidenceSequence")
            for s in ds.get(name, []) for se in s.ReferencedSeriesSequence
            for r in se.ReferencedSOPSequence}


def _sr_values(path: Path) -> tuple[dict[str, float], dict[str, list[str]]]:
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    numbers = {m.name.meaning: float(m.value) for m in groups[0].get_measurements()}
    coded: dict[str, list[str]] = {}
    for q in groups[0].get_qualitative_evaluations():
        coded.setdefault(q.name.meaning, []).append(q.value.meaning)
    return numbers, coded


def test_report_holds_the_prediction_and_references(study: dict[str, Volume], tmp_path: Path):
    pred = _prediction()
    results, _ = _write(study, tmp_path, pred=pred)
    assert results.sr is not None
    numbers, coded = _sr_values(results.sr)
    assert numbers["Calibrated probability of normal"] == pytest.approx(0.312345, abs=1e-9)
    assert numbers["Calibrated probability of abnormal"] == pytest.approx(0.687655, abs=1e-9)
    assert numbers["Modality weight of ct"] == pytest.approx(0.6)
    assert numbers["Shapley value of xray"] == pytest.approx(-0.02)
    assert numbers["Conformal error rate"] == pytest.approx(0.1)
    assert coded["Predicted label"] == ["abnormal"]
    assert coded["Conformal prediction set member"] == ["abnormal"]
    assert coded["Abstain"] == ["No"]
    assert coded["Flag"] == ["ROLE_NOT_USED:mr"]
    ds = pydicom.dcmread(results.sr)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.PatientID == SENTINELS["PatientID"]  # belongs to the patient's study
    text = " ".join(str(e.value) for e in ds.iterall() if e.VR in ("UT", "LO", "SH", "UC"))
    assert MODEL.card_sha256 in text and MODEL.name in text and MODEL.version in text
    evidence = _evidence(ds)
    want = {i.sop_instance_uid for v in study.values() if v.dicom
            for i in v.dicom.instances}
    assert evidence == want


def test_deidentified_objects_carry_the_key_not_the_patient(study: dict[str, Volume],
                                                            tmp_path: Path):
    results, _ = _write(study, tmp_path, deidentify=True)
    source_uids = {study["ct"].dicom.study_instance_uid}  # type: ignore[union-attr]
    source_uids |= {i.sop_instance_uid for v in study.values() if v.dicom
                    for i in v.dicom.instances}
    for path in [results.sr, *results.maps.values()]:
        assert path is not None
        raw = path.read_bytes()
        for value in [*SENTINELS.values(), "ZZTEST"]:
            assert value.encode() not in raw, (path.name, value)
        for uid in source_uids:
            assert uid.encode() not in raw, path.name
        ds = pydicom.dcmread(path)
        assert str(ds.PatientID) == "st-0123456789ab"
        assert str(ds.PatientName).rstrip("^") == "st-0123456789ab"
        assert not ds.get("PatientBirthDate") and not ds.get("StudyDate")
    # the map and the report still point at the same (replaced) source instances
    sr = pydicom.dcmread(results.sr)  # type: ignore[arg-type]
    pm = pydicom.dcmread(results.maps["ct"])
    assert sr.StudyInstanceUID == pm.StudyInstanceUID
    refs = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in pm.PerFrameFunctionalGroupsSequence}
    evidence = _evidence(sr)
    assert refs <= evidence


def test_nifti_study_gets_no_object(tmp_path: Path):
    volume = Volume(array=np.zeros((4, 4, 3), np.float32), affine=np.eye(4))
    results = write_dicom_results(_prediction(), Explanation(saliency={"ct": volume}),
                                  {"ct": volume}, tmp_path / "out", model=MODEL,
                                  study_key="st-x")
    assert results.sr is None and not results.maps
    assert results.skipped["study"] == NO_DICOM_SOURCE
    assert not (tmp_path / "out").exists()


def test_loaded_volume_keeps_headers_not_pixels(study: dict[str, Volume]):
    source = study["ct"].dicom
    assert source is not None
    assert "ZZTEST" not in repr(study["ct"]) and "ZZTEST" not in repr(source)
    assert source.identity["PatientID"] == SENTINELS["PatientID"]
    assert len(source.instances) == 5 and all(i.position for i in source.instances)
    assert not any(isinstance(v, np.ndarray) for v in vars(source).values())
