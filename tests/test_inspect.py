"""inspect_path / render_inspection: files, studies, collections, failures."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

from medfusion.errors import MedfusionError, NoImagesError, TruncatedError
from medfusion.io.inspect import find_study_folders, inspect_path, render_inspection
from medfusion.io.study import load_study
from medfusion.testing.dicom_factory import write_series
from medfusion.testing.synthetic import write_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    paths = write_cohort(tmp_path_factory.mktemp("c"), 2, seed=9, roles=("ct", "mr"))
    broken = paths.studies_dir / "study-broken"
    broken.mkdir()
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    nib.save(img, str(broken / "ct.nii.gz"))
    data = (broken / "ct.nii.gz").read_bytes()
    (broken / "ct.nii.gz").write_bytes(data[:-20])
    return paths


def test_collection_lists_each_study_and_the_failure(cohort) -> None:
    report = inspect_path(cohort.studies_dir)
    json.dumps(report)  # JSON-able
    assert report["kind"] == "collection"
    assert report["n_studies"] == 3 and report["n_failed"] == 1
    good = [s for s in report["studies"] if "error" not in s]
    for entry, sid in zip(good, cohort.study_ids, strict=True):
        assert entry["key"] == load_study(cohort.study_dir(sid)).key
        assert entry["roles"]["ct"]["shape"] == [40, 40, 24]
        assert entry["roles"]["ct"]["source"] == "dicom"
        assert entry["roles"]["mr"]["spacing"] == [1.2, 1.2, 3.0]
    failed = next(s for s in report["studies"] if "error" in s)
    assert failed["error"]["code"] == "TRUNCATED" and failed["folder_key"].startswith("st-")


def test_root_with_one_image_folder_is_looked_into(cohort) -> None:
    assert inspect_path(cohort.root)["n_studies"] == 3  # root -> studies/ -> each study


def test_single_study_and_file(cohort) -> None:
    sid = cohort.study_ids[0]
    report = inspect_path(cohort.study_dir(sid))
    assert report["kind"] == "study" and set(report["studies"][0]["roles"]) == {"ct", "mr"}
    report = inspect_path(cohort.images[sid]["mr"])
    assert report["kind"] == "file"
    assert report["studies"][0]["roles"]["mr"]["shape"] == [32, 32, 20]
    with pytest.raises(TruncatedError):  # a single broken study raises its error
        inspect_path(cohort.studies_dir / "study-broken")
    with pytest.raises(NoImagesError):
        inspect_path(cohort.root / "absent")


def test_series_split_into_subfolders_of_one_study(tmp_path: Path) -> None:
    vol = np.zeros((6, 6, 4))
    write_series(tmp_path / "s1", vol, modality="CT", seed=1, study_uid="1.2.3.9")
    write_series(tmp_path / "s2", vol + 5, modality="MR", seed=2, rescale=(1.0, 0.0),
                 study_uid="1.2.3.9", series_number=2)
    kind, folders = find_study_folders(tmp_path)
    assert kind == "study" and folders == [tmp_path]
    write_series(tmp_path / "s3", vol, modality="CT", seed=3, study_uid="1.2.3.10")
    assert find_study_folders(tmp_path)[0] == "collection"


def test_render_shows_roles_not_used_series_and_errors(cohort, tmp_path: Path) -> None:
    console = Console(record=True, width=140)
    render_inspection(inspect_path(cohort.studies_dir), console)
    text = console.export_text()
    assert "ct" in text and "40x40x24" in text and "TRUNCATED" in text
    vol = np.zeros((6, 6, 4))
    write_series(tmp_path / "a", vol, seed=1, study_uid="1.2.3.11")
    write_series(tmp_path / "b", vol[..., :2], seed=1, study_uid="1.2.3.11", series_number=2)
    console = Console(record=True, width=140)
    render_inspection(inspect_path(tmp_path), console)
    assert "not used" in console.export_text()


def test_symlink_loops_reported_never_raised(cohort, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "batch"
    shutil.copytree(cohort.studies_dir, root, symlinks=True,
                    ignore=shutil.ignore_patterns("study-broken"))
    sid = cohort.study_ids[0]
    (root / sid / "loop").symlink_to("loop")  # inside one study
    (root / "cycle").symlink_to("cycle")  # in the batch root
    report = inspect_path(root)
    json.dumps(report)
    assert report["kind"] == "collection" and report["n_failed"] == 0
    assert report["n_studies"] == len(cohort.study_ids)
    assert report["skipped"] == {"SYMLINK_LOOP": 2}
    looped = [s for s in report["studies"]
              if any(i["code"] == "SYMLINK_LOOP" for i in s["issues"])]
    assert len(looped) == 1 and looped[0]["roles"]
    console = Console(record=True, width=140)
    render_inspection(report, console)
    assert "2 SYMLINK_LOOP" in console.export_text()
    with pytest.raises(MedfusionError) as err:
        inspect_path(root / "cycle")
    assert err.value.code == "SYMLINK_LOOP"
