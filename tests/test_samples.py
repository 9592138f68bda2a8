"""Bundled samples and the synthetic cohort generator behind them."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfusion.testing.dicom_factory import SENTINELS
from medfusion.testing.synthetic import CLINICAL_SCHEMA, make_subject, write_cohort

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"


def _make_samples_module():
    spec = importlib.util.spec_from_file_location("make_samples", REPO / "pipelines" /
                                                  "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    """Files made by make_samples.py (the demo model beside them is trained separately)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "demo_model" not in p.relative_to(root).parts
    }


def test_samples_regenerate_byte_identical_and_small(tmp_path: Path) -> None:
    _make_samples_module().make_samples(tmp_path / "s")
    fresh, committed = _files(tmp_path / "s"), _files(SAMPLES)
    assert sorted(fresh) == sorted(committed)
    changed = [name for name in fresh if fresh[name] != committed[name]]
    assert changed == [], "data_samples/ is stale: run pipelines/make_samples.py"
    assert sum(len(b) for b in committed.values()) < 5 * 1024 * 1024


def test_samples_hold_every_promised_input() -> None:
    rows = list(csv.DictReader((SAMPLES / "manifest.csv").open()))
    assert len(rows) >= 3 and {r["label"] for r in rows} == {"normal", "abnormal"}
    for row in rows:
        ct = SAMPLES / row["ct"]
        assert len(list(ct.iterdir())) == 24
        assert pydicom.dcmread(next(ct.iterdir())).Modality == "CT"
        assert pydicom.dcmread(SAMPLES / row["xray"]).Modality == "DX"
        assert nib.load(SAMPLES / row["mr"]).shape == (32, 32, 20)
    clinical = list(csv.DictReader((SAMPLES / "clinical.csv").open()))
    assert list(clinical[0]) == ["study_id", *CLINICAL_SCHEMA]
    assert (SAMPLES / "README.md").read_text().count("make_samples.py") >= 1


def test_make_subject_is_deterministic_and_plants_the_lesion() -> None:
    a, b = make_subject(5, 1), make_subject(5, 1)
    for role in ("ct", "mr", "xray"):
        np.testing.assert_array_equal(a.arrays[role], b.arrays[role])
        assert a.arrays[role].dtype == np.float32
    assert not np.array_equal(make_subject(6, 1).arrays["ct"], a.arrays["ct"])
    world = np.array(a.lesion_world["ct"])
    for role in ("ct", "mr"):
        vox = np.linalg.inv(a.affines[role]) @ np.append(world, 1.0)
        np.testing.assert_allclose(vox[:3], a.lesion_voxel[role], atol=1e-9)
        idx = tuple(int(round(v)) for v in vox[:3])
        assert a.arrays[role][idx] > np.median(a.arrays[role][a.arrays[role] > 0]) * 1.2
    ct = a.arrays["ct"]
    idx = tuple(int(round(v)) for v in a.lesion_voxel["ct"])
    assert ct[idx] > 200  # soft tissue is ~40 HU
    assert ct.min() >= -1024 and np.median(ct[:2, :2]) < -900  # air in the corners
    xi = tuple(int(round(v)) for v in a.lesion_voxel["xray"])
    assert a.arrays["xray"][xi] > np.percentile(a.arrays["xray"], 95)


def test_normal_subject_has_no_lesion() -> None:
    normal = make_subject(5, 0)
    assert normal.lesion_world["ct"] is None and normal.lesion_radius_mm is None
    ct = normal.arrays["ct"]
    soft = (ct > -500) & (ct < 400)
    assert np.percentile(ct[soft], 99.9) < 120  # no bright blob outside the spine


def test_write_cohort_layout_splits_and_sentinels(tmp_path: Path) -> None:
    paths = write_cohort(tmp_path / "c", 12, seed=3, missing_rate=0.3,
                         formats={"ct": "nifti"})
    rows = list(csv.DictReader(paths.manifest.open()))
    assert [r["study_id"] for r in rows] == [f"study-{i:03d}" for i in range(12)]
    assert sorted(r["label"] for r in rows).count("abnormal") == 6
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
        present = [r[role] for role in ("ct", "mr", "xray") if r[role]]
        assert present, "every study keeps at least one image"
        for rel in present:
            assert (paths.root / rel).exists()
        if r["ct"]:
            assert r["ct"].endswith("ct.nii.gz")
    assert all(len(s) == 1 for s in by_patient.values()), "a patient spans two splits"
    assert {s for v in by_patient.values() for s in v} == {"train", "val", "test"}
    assert any(r[c] == "" for r in rows for c in CLINICAL_SCHEMA)  # some values missing
    truth = json.loads(paths.truth.read_text())
    assert set(truth) == {r["study_id"] for r in rows}
    xray_rows = [r for r in rows if r["xray"]]
    ds = pydicom.dcmread(paths.root / xray_rows[0]["xray"])
    assert str(ds.PatientName) == SENTINELS["PatientName"]


def test_write_cohort_refuses_unknown_role(tmp_path: Path) -> None:
    from medfusion.errors import UnsupportedInputError

    with pytest.raises(UnsupportedInputError):
        write_cohort(tmp_path, 2, roles=("pet",))
    with pytest.raises(UnsupportedInputError):
        write_cohort(tmp_path, 2, formats={"mr": "analyze"})


def test_demo_inspects_every_sample_and_leaks_nothing(tmp_path: Path) -> None:
    from rich.console import Console

    from medfusion.demo import run_demo

    console = Console(record=True, width=120)
    assert run_demo(tmp_path / "out", console=console) == 0
    report = json.loads((tmp_path / "out" / "inspection.json").read_text())
    assert report["n_studies"] == 4 and report["n_failed"] == 0
    assert all(set(s["roles"]) == {"ct", "mr", "xray"} for s in report["studies"])
    text = console.export_text() + json.dumps(report)
    assert "ZZTEST" not in text and SENTINELS["PatientID"] not in text
