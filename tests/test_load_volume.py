"""``load_volume`` dispatch: DICOM folder / DICOM file / NIfTI (extension sniffed, D2)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medfusion
from medfusion.errors import MedfusionError, NoImagesError
from medfusion.io.volume import load_volume
from medfusion.testing.dicom_factory import write_radiograph, write_series


def _nifti(path: Path, gz_name_plain_bytes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    arr = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    affine[:3, 3] = (-10, 5, 3)
    img = nib.Nifti1Image(arr, affine)
    if gz_name_plain_bytes:  # a .nii.gz name holding an uncompressed file
        plain = path.with_name("plain.nii")
        nib.save(img, str(plain))
        plain.rename(path)
    else:
        nib.save(img, str(path))
    return arr, affine


def test_top_level_api_is_load_volume():
    assert medfusion.load_volume is load_volume


@pytest.mark.parametrize("name,lying", [("ct.nii", False), ("ct.nii.gz", False),
                                        ("ct.nii.gz", True)])
def test_nifti_files(tmp_path: Path, name: str, lying: bool):
    arr, affine = _nifti(tmp_path / name, gz_name_plain_bytes=lying)
    vol = load_volume(tmp_path / name)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)


def test_dicom_folder_file_and_radiograph(tmp_path: Path):
    arr = np.random.default_rng(0).integers(-500, 500, (8, 8, 3)).astype(float)
    paths = write_series(tmp_path / "ct", arr, seed=1)
    folder = load_volume(tmp_path / "ct")
    np.testing.assert_array_equal(folder.array, arr)
    one = load_volume(sorted(paths)[0])
    assert one.shape == (8, 8, 1) and one.modality == "CT"
    xr = load_volume(write_radiograph(tmp_path / "x.dcm", np.ones((6, 7), int)))
    assert xr.shape == (6, 7, 1) and xr.modality == "DX"


def test_missing_path_is_typed_error(tmp_path: Path):
    with pytest.raises(NoImagesError):
        load_volume(tmp_path / "nope")


def test_garbage_file_is_typed_error(tmp_path: Path):
    bad = tmp_path / "junk.bin"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(MedfusionError) as err:
        load_volume(bad)
    assert err.value.code == "NOT_DICOM"
