"""Conformance against real scanner data and dcm2niix references (../shared/data).

Both sides are compared in world space: reoriented to the closest canonical RAS with
nibabel, affines allclose, voxels equal (or highly correlated where the reference was
interpolated or scaled differently).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfusion.io.dicom import iter_files, load_dicom_file, scan_dicom
from medfusion.io.volume import load_volume

pytestmark = pytest.mark.shared_data


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asarray(img.dataobj), img.affine


def _ref(path: Path, t: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    data = img.get_fdata(dtype=np.float64)
    if t is not None:
        data = data[..., t]
    return _canonical(data, img.affine)


@pytest.mark.parametrize("series", [4])
def test_ge_mr_time_points_equal_dcm2niix(shared_data: Path, series: int):
    """GE EPI: 150 single-slice files = 15 positions x 10 time points (no temporal tag; the
    count equals NumberOfTemporalPositions, so each position is ranked by acquisition)."""
    folder = shared_data / f"dicom/dcm_qa_nih/In/20180918GE/mr_000{series}"
    vol = load_volume(folder)  # README-Series.txt is skipped
    assert vol.shape == (64, 64, 15, 10)
    assert "MULTIPLE_TIME_POINTS" in [f.code for f in vol.issues]
    assert "SKIPPED_FILES" in [f.code for f in vol.issues]
    ref_path = shared_data / f"dicom/dcm_qa_nih/Ref/DCM2NIIX_regression_test_{series}.nii"
    for t in (0, 9):
        ours, ours_aff = _canonical(vol.array[..., t], vol.affine)
        ref, ref_aff = _ref(ref_path, t)
        np.testing.assert_allclose(ours_aff, ref_aff, atol=1e-3)
        np.testing.assert_array_equal(ours, ref)


def test_ge_tilted_ct_matches_dcm2niix_tilt_eq(shared_data: Path):
    vol = load_volume(shared_data / "dicom/dcm_qa_ct_ge/In/GE")
    codes = [f.code for f in vol.issues]
    assert "GANTRY_TILT_RESAMPLED" in codes and "UNEVEN_SPACING_RESAMPLED" in codes
    tilt = next(f for f in vol.issues if f.code == "GANTRY_TILT_RESAMPLED")
    assert tilt.details["tilt_deg"] == pytest.approx(18.5, abs=0.05)
    ours, ours_aff = _canonical(vol.array, vol.affine)
    ref, ref_aff = _ref(shared_data / "dicom/dcm_qa_ct_ge/Ref/_2_Tilt_Eq_1.nii.gz")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours_aff, ref_aff, atol=0.05)
    corr = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert corr > 0.999
    assert float(np.median(np.abs(ours - ref))) <= 1.0  # HU; dcm2niix rounds to integers


def test_ge_tilted_ct_strict_refuses(shared_data: Path):
    from medfusion.errors import GeometryError

    with pytest.raises(GeometryError) as err:
        load_volume(shared_data / "dicom/dcm_qa_ct_ge/In/GE", strict=True)
    assert err.value.code in ("UNEVEN_SPACING", "GANTRY_TILT")


def test_siemens_enhanced_multiframe_equal_reference(shared_data: Path):
    ref_path = shared_data / "dicom/dcm_qa_enh/Ref/Siemens_REST1_w_SMS_PF7-8_6.nii"
    folder = shared_data / "dicom/dcm_qa_enh/In/Siemens/XA10"
    scan = scan_dicom(iter_files(folder))
    # four time points of one series: one 4D entry (tests/test_dicom_hardening.py)
    assert len(scan.series) == 1 and scan.series[0].is_enhanced
    assert scan.series[0].n_instances == 4
    for t in range(4):
        vol = load_dicom_file(folder / f"6_{t + 1}.dcm")
        assert vol.shape == (64, 64, 6)
        ours, ours_aff = _canonical(vol.array, vol.affine)
        ref, ref_aff = _ref(ref_path, t)
        np.testing.assert_allclose(ours_aff, ref_aff, atol=1e-3)
        np.testing.assert_array_equal(ours, ref)


def test_philips_enhanced_fieldmap_two_stacks(shared_data: Path):
    """Magnitude and field map share positions: separated (by echo time) into T = 2."""
    vol = load_dicom_file(shared_data / "dicom/dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm")
    assert vol.shape == (64, 64, 32, 2)
    ref_dir = shared_data / "dicom/dcm_qa_enh/Ref"
    fmap, fmap_aff = _ref(ref_dir / "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii")
    ours, ours_aff = _canonical(vol.array[..., 0], vol.affine)
    np.testing.assert_allclose(ours_aff, fmap_aff, atol=1e-3)
    np.testing.assert_allclose(ours, fmap, atol=0.02)  # Hz
    # magnitude: dcm2niix writes Philips "precise" values (a constant factor away)
    mag, _ = _ref(ref_dir / "Philips_WIP_B0_NS_801_e1.nii")
    ours_mag, _ = _canonical(vol.array[..., 1], vol.affine)
    assert np.corrcoef(ours_mag.ravel(), mag.ravel())[0, 1] > 0.99999


@pytest.mark.parametrize("image", ["CT1", "MR1", "RG2"])
def test_wg04_codecs_bit_identical(shared_data: Path, image: str):
    wg04 = shared_data / "dicom/wg04"
    ref = load_dicom_file(wg04 / f"REF/{image}_UNC.dcm")
    for codec in ("RLE", "JPLL", "JLSL", "J2KR"):
        vol = load_dicom_file(wg04 / f"{codec}/{image}_{codec}")
        np.testing.assert_array_equal(vol.array, ref.array, err_msg=codec)
        np.testing.assert_array_equal(vol.affine, ref.affine)
    lossy = load_dicom_file(wg04 / f"J2KI/{image}_J2KI")
    assert lossy.shape == ref.shape
    assert np.corrcoef(lossy.array.ravel(), ref.array.ravel())[0, 1] > 0.99
    assert not np.array_equal(lossy.array, ref.array)


def test_wg04_cr_radiograph_conventions(shared_data: Path):
    vol = load_dicom_file(shared_data / "dicom/wg04/REF/RG2_UNC.dcm")
    assert vol.modality == "CR"
    assert vol.shape == (1760, 2140, 1)
    assert vol.spacing[:2] == pytest.approx((0.2, 0.2))
    assert vol.meta["voi"] == "window"
    assert 0.0 <= float(vol.array.min()) and float(vol.array.max()) <= 1.0


@pytest.mark.parametrize("series,ref", [("mr_0003", "EPI_PE=AP_3"), ("mr_0005", "EPI_PE=RL_5")])
def test_siemens_mosaic_equals_dcm2niix(shared_data: Path, series: str, ref: str):
    """Mosaic EPI: 5 tiled slices per file, 2 files = 2 time points."""
    vol = load_volume(shared_data / f"dicom/dcm_qa_nih/In/20180918Si/{series}")
    assert vol.shape == (72, 72, 5, 2)
    assert "MOSAIC_UNPACKED" in [f.code for f in vol.issues]
    ref_path = shared_data / f"dicom/dcm_qa_nih/Ref/{ref}.nii"
    for t in range(2):
        ours, ours_aff = _canonical(vol.array[..., t], vol.affine)
        theirs, theirs_aff = _ref(ref_path, t)
        np.testing.assert_allclose(ours_aff, theirs_aff, atol=1e-3)
        np.testing.assert_array_equal(ours, theirs)


def test_fast_header_matches_pydicom_on_real_files(shared_data: Path):
    import pydicom

    from medfusion.io.dicom import _FAST_REFUSE, _FAST_WANTED
    from medfusion.io.dicom_fast import read_fast_header

    files = [
        *sorted((shared_data / "dicom/dcm_qa_ct_ge/In/GE").glob("*.dcm"))[:3],
        *sorted((shared_data / "dicom/dcm_qa_nih/In/20180918GE/mr_0004").glob("*.dcm"))[:3],
        *sorted((shared_data / "dicom/wg04/REF").glob("*.dcm")),
        shared_data / "dicom/wg04/JPLL/CT1_JPLL",
    ]
    checked = 0
    for path in files:
        fast = read_fast_header(str(path), _FAST_WANTED, _FAST_REFUSE)
        if fast is None:
            continue
        header = fast[0]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in _FAST_WANTED.values():
            if keyword not in ds or ds[keyword].VR == "SQ" or ds[keyword].value in ("", None):
                continue
            ours = header.get(keyword)
            theirs = ds[keyword].value
            if ds[keyword].VM > 1:
                theirs = [v if isinstance(v, str) else float(v) for v in theirs]
                ours = [v if isinstance(v, str) else float(v) for v in ours]
            elif isinstance(theirs, (int, float)):
                theirs, ours = float(theirs), float(ours)
            else:
                theirs = str(theirs).strip()
            assert ours == theirs, (path.name, keyword)
        checked += 1
    assert checked >= 8
