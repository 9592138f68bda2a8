"""load_study: discovery, role rules, the choice among several series, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfusion.errors import MedfusionError, NoImagesError
from medfusion.io.study import discover_study_files, load_study
from medfusion.keys import pseudonym
from medfusion.testing.dicom_factory import write_series
from medfusion.testing.synthetic import write_cohort


def _codes(study) -> list[str]:
    return [f.code for f in study.issues]


def _not_used(study) -> list[dict]:
    return [dict(f.details) for f in study.issues if f.code == "SERIES_NOT_USED"]


def _nifti(path: Path, shape=(6, 5, 4), descrip: bytes = b"", value: float = 1.0) -> Path:
    img = nib.Nifti1Image(np.full(shape, value, dtype=np.float32), np.diag([2.0, 2.0, 3.0, 1]))
    img.header["descrip"] = descrip
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), 2, seed=4)


def test_synthetic_study_loads_every_role_exactly(cohort) -> None:
    for sid in cohort.study_ids:
        study = load_study(cohort.study_dir(sid), clinical={"age": 50, "sex": "F"})
        subject = cohort.subject(sid)
        assert study.roles == ("ct", "mr", "xray")
        assert study.volumes["ct"].modality == "CT" and study.volumes["xray"].modality == "DX"
        assert study.volumes["mr"].modality == "MR"  # from the NIfTI header / file name
        for role in ("ct", "mr"):
            vol = study.volumes[role]
            np.testing.assert_array_equal(vol.array, subject.arrays[role])
            np.testing.assert_allclose(vol.affine, subject.affines[role], atol=1e-5)
        np.testing.assert_allclose(study.volumes["xray"].array * 4095, subject.arrays["xray"],
                                   atol=1e-2)
        np.testing.assert_allclose(study.volumes["xray"].affine, subject.affines["xray"])
        uid = pydicom.dcmread(cohort.images[sid]["xray"]).StudyInstanceUID
        assert study.key == pseudonym(str(uid), prefix="st-")
        assert study.clinical == {"age": 50, "sex": "F"}
        assert study.issues == ()


def test_choice_rule_original_then_axial_then_most_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 10, (8, 8, 6))
    common = {"seed": 11, "study_uid": "1.2.3.4.5"}
    write_series(tmp_path / "a", vol[..., :3], series_number=1, **common)  # original axial 3
    write_series(tmp_path / "b", vol, series_number=2, **common)  # original axial 6: chosen
    write_series(tmp_path / "c", np.concatenate([vol, vol], 2), series_number=3,
                 image_type=("DERIVED", "SECONDARY", "MPR"), **common)  # more slices, derived
    sagittal = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1.0]])
    write_series(tmp_path / "d", np.concatenate([vol, vol], 2), series_number=4,
                 affine=sagittal, **common)  # original but sagittal
    write_series(tmp_path / "e", vol[..., :1], series_number=5,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), **common)  # scout
    study = load_study(tmp_path)
    assert study.roles == ("ct",)
    assert study.volumes["ct"].shape == (8, 8, 6)
    unused = _not_used(study)
    assert len(unused) == 4
    # rule order: a (original axial, fewer), d (original sagittal), c (derived), e (scout)
    assert [u["n_slices"] for u in unused] == [3, 12, 12, 1]
    assert [u["orientation"] for u in unused] == ["axial", "sagittal", "axial", "axial"]
    assert all(u["key"].startswith("se-") and u["role"] == "ct" for u in unused)


def test_nifti_roles_by_file_name_and_custom_roles(tmp_path: Path) -> None:
    _nifti(tmp_path / "ct.nii.gz", value=-5.0)
    _nifti(tmp_path / "MR.nii", value=7.0)
    _nifti(tmp_path / "t1.nii.gz", value=3.0)
    study = load_study(tmp_path)
    assert study.roles == ("ct", "mr")
    assert study.volumes["ct"].modality == "CT" and float(study.volumes["ct"].array[0, 0, 0]) == -5
    assert [u["reason"] for u in _not_used(study)] == ["no role in its name"]
    assert study.key == pseudonym(os.path.realpath(tmp_path), prefix="st-")
    custom = load_study(tmp_path, roles={"t1": "MR", "ct": "CT"})
    assert custom.roles == ("ct", "t1")
    assert float(custom.volumes["t1"].array[0, 0, 0]) == 3.0


def test_unnamed_nifti_takes_role_from_header_modality(tmp_path: Path) -> None:
    _nifti(tmp_path / "scan_0001.nii.gz", descrip=b"MR T2 axial")
    study = load_study(tmp_path)
    assert study.roles == ("mr",)


def test_named_nifti_wins_over_dicom_series(tmp_path: Path) -> None:
    write_series(tmp_path / "series", np.zeros((6, 6, 10)), seed=2)
    _nifti(tmp_path / "ct.nii.gz", value=42.0)
    study = load_study(tmp_path)
    assert float(study.volumes["ct"].array[0, 0, 0]) == 42.0
    assert [u["source"] for u in _not_used(study)] == ["dicom"]


def test_links_outside_not_followed_and_junk_skipped(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _nifti(outside / "mr.nii.gz")
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    _nifti(study_dir / "ct.nii.gz")
    (study_dir / "mr.nii.gz").symlink_to(outside / "mr.nii.gz")
    (study_dir / "elsewhere").symlink_to(outside, target_is_directory=True)
    (study_dir / "notes.txt").write_text("report")
    (study_dir / "blob.bin").write_bytes(os.urandom(300))
    (study_dir / "inner").mkdir()
    (study_dir / "inner" / "again").symlink_to(study_dir, target_is_directory=True)  # loop
    (study_dir / "blob-link.bin").symlink_to(study_dir / "blob.bin")  # same file twice
    dicom, nifti, skipped = discover_study_files(study_dir)
    assert [p.name for p in nifti] == ["ct.nii.gz"]
    assert sorted(r for _, r in skipped) == [
        "DUPLICATE_LINK", "LINK_OUTSIDE", "LINK_OUTSIDE", "NOT_IMAGE"]
    assert [p.name for p in dicom] == ["blob.bin"]
    study = load_study(study_dir)
    assert study.roles == ("ct",)
    counts = next(f.details["counts"] for f in study.issues if f.code == "FILES_SKIPPED")
    assert counts["LINK_OUTSIDE"] == 2 and sum(counts.values()) == 5


def test_empty_and_imageless_folders_refused(tmp_path: Path) -> None:
    with pytest.raises(NoImagesError):
        load_study(tmp_path)
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(NoImagesError):
        load_study(tmp_path)
    with pytest.raises(NoImagesError):
        load_study(tmp_path / "absent")


def test_failing_chosen_series_raises_its_typed_error(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", np.zeros((6, 6, 5)), seed=3)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) - 30])  # pixel data cut short
    with pytest.raises(MedfusionError) as err:
        load_study(tmp_path)
    assert err.value.code in {"TRUNCATED", "CORRUPT", "MISSING_SLICES"}


def test_volume_findings_are_copied_with_their_role(tmp_path: Path) -> None:
    sheared = np.array([[1.0, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), sheared), str(tmp_path / "ct.nii"))
    study = load_study(tmp_path)
    finding = next(f for f in study.issues if f.code == "SHEARED_AFFINE")
    assert finding.details["role"] == "ct"
    with pytest.raises(MedfusionError):
        load_study(tmp_path, strict=True)


def test_symlink_loops_are_skipped_and_reported(tmp_path: Path) -> None:
    """A link to itself or a two-link cycle raises ELOOP on stat: skipped, never a crash."""
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    _nifti(study_dir / "ct.nii.gz")
    (study_dir / "self").symlink_to("self")
    (study_dir / "a").symlink_to("b")
    (study_dir / "b").symlink_to("a")
    (study_dir / "sub").mkdir()
    (study_dir / "sub" / "mr.nii.gz").symlink_to("mr.nii.gz")  # a loop named like an image
    (study_dir / "gone.dcm").symlink_to("nowhere.dcm")  # dangling: not a loop
    dicom, nifti, skipped = discover_study_files(study_dir)
    assert dicom == [] and [p.name for p in nifti] == ["ct.nii.gz"]
    assert sorted(r for _, r in skipped) == ["NOT_REGULAR"] + ["SYMLINK_LOOP"] * 4
    study = load_study(study_dir)
    assert study.roles == ("ct",)
    loop = next(f for f in study.issues if f.code == "SYMLINK_LOOP")
    assert loop.details == {"count": 4}
    counts = next(f.details["counts"] for f in study.issues if f.code == "FILES_SKIPPED")
    assert counts == {"NOT_REGULAR": 1}  # a loop is reported once, on its own
    folder_loop = tmp_path / "loop"
    folder_loop.symlink_to("loop")
    with pytest.raises(MedfusionError) as err:
        load_study(folder_loop)
    assert err.value.code == "SYMLINK_LOOP"
