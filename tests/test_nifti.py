"""NIfTI reader: geometry policy and refusal of broken files (cases D1-D8, C5).

Files are written with nibabel, then broken with byte surgery on disk.
"""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfusion.errors import (
    CorruptFileError,
    GeometryError,
    InvalidValuesError,
    LimitExceededError,
    MedfusionError,
    NoImagesError,
    TruncatedError,
    UnsupportedInputError,
)
from medfusion.io.nifti import load_nifti

OBLIQUE = np.array(
    [
        [0.0, -0.9, 0.1, 12.5],
        [0.95, 0.0, 0.0, -30.0],
        [0.0, 0.05, 2.4, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _oblique_affine() -> np.ndarray:
    """An oblique but orthogonal affine (a rotation times spacing) plus translation."""
    theta = np.deg2rad(20.0)
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    aff[:3, 3] = [-10.0, 20.0, 35.5]
    return aff


def _save(path: Path, array: np.ndarray, affine: np.ndarray, **kw) -> Path:
    img = nib.Nifti1Image(array, affine)
    for key, value in kw.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def _codes(vol) -> list[str]:
    return [f.code for f in vol.issues]


@pytest.fixture()
def arr() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, (12, 10, 6)).astype(np.float32)


def test_round_trip_exact_array_affine_and_modality(tmp_path: Path, arr: np.ndarray) -> None:
    aff = _oblique_affine()
    path = _save(tmp_path / "ct.nii.gz", arr, aff, descrip=b"CT abdomen")
    vol = load_nifti(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.9, 2.5), atol=1e-5)
    assert vol.modality == "CT"
    assert vol.issues == ()
    assert vol.meta["affine_source"] == "sform" and vol.meta["compressed"] is True


def test_modality_unknown_when_header_is_silent(tmp_path: Path, arr: np.ndarray) -> None:
    vol = load_nifti(_save(tmp_path / "x.nii", arr, np.eye(4)))
    assert vol.modality == "unknown"
    vol = load_nifti(_save(tmp_path / "y.nii", arr, np.eye(4), descrip=b"T2 MRI brain"))
    assert vol.modality == "MR"


def test_same_image_as_simpleitk_in_world_space(tmp_path: Path, arr: np.ndarray) -> None:
    """D8-style cross-check: another library reads the same voxels at the same places."""
    import SimpleITK as sitk

    path = _save(tmp_path / "img.nii.gz", arr, _oblique_affine())
    vol = load_nifti(path)
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), vol.array)
    direction = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(lps @ direction, vol.affine[:3, :3], atol=1e-4)
    np.testing.assert_allclose(lps @ np.array(img.GetOrigin()), vol.affine[:3, 3], atol=1e-4)


def test_scaling_applied_as_float(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.25, -3.0)
    path = tmp_path / "s.nii"
    nib.save(img, str(path))
    vol = load_nifti(path)
    np.testing.assert_allclose(vol.array, data * 0.25 - 3.0)


# --- D2: sniff, do not trust the extension ------------------------------------------------
def test_extension_lies_about_gzip(tmp_path: Path, arr: np.ndarray) -> None:
    plain = _save(tmp_path / "a.nii", arr, np.eye(4))
    fake_gz = tmp_path / "b.nii.gz"
    fake_gz.write_bytes(plain.read_bytes())  # not compressed despite the name
    real_gz = tmp_path / "c.nii"
    real_gz.write_bytes(gzip.compress(plain.read_bytes()))  # compressed despite the name
    for path in (fake_gz, real_gz):
        np.testing.assert_array_equal(load_nifti(path).array, arr)
    assert load_nifti(real_gz).meta["compressed"] is True


# --- D1: tail corruption found at load time ----------------------------------------------
def test_gz_cut_at_tail_is_truncated(tmp_path: Path, arr: np.ndarray) -> None:
    path = _save(tmp_path / "t.nii.gz", arr, np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[:-12])
    with pytest.raises(TruncatedError) as err:
        load_nifti(path)
    assert err.value.code == "TRUNCATED"


@pytest.mark.parametrize("offset", [-6, -40])  # the CRC field; the last deflate block
def test_gz_corrupt_at_tail_is_refused(tmp_path: Path, arr: np.ndarray, offset: int) -> None:
    path = _save(tmp_path / "c.nii.gz", arr, np.eye(4))
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises((CorruptFileError, TruncatedError)):
        load_nifti(path)


def test_uncompressed_shorter_than_declared(tmp_path: Path, arr: np.ndarray) -> None:
    path = _save(tmp_path / "u.nii", arr, np.eye(4))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TruncatedError):
        load_nifti(path)


# --- D3: qform / sform policy ------------------------------------------------------------
def test_sform_wins_and_mismatch_reported(tmp_path: Path, arr: np.ndarray) -> None:
    img = nib.Nifti1Image(arr, None)
    qform = np.diag([1.0, 1.0, 2.0, 1.0])
    sform = _oblique_affine()
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    path = tmp_path / "qs.nii"
    nib.save(img, str(path))
    vol = load_nifti(path)
    np.testing.assert_allclose(vol.affine, sform, atol=1e-5)
    assert "QFORM_SFORM_MISMATCH" in _codes(vol)


def test_qform_used_when_sform_code_zero(tmp_path: Path, arr: np.ndarray) -> None:
    img = nib.Nifti1Image(arr, None)
    qform = _oblique_affine()
    img.set_qform(qform, code=1)
    img.set_sform(np.diag([5.0, 5.0, 5.0, 1.0]), code=0)
    path = tmp_path / "q.nii"
    nib.save(img, str(path))
    vol = load_nifti(path)
    np.testing.assert_allclose(vol.affine, qform, atol=1e-4)
    assert vol.meta["affine_source"] == "qform" and vol.issues == ()


def test_no_transform_reported_and_strict_refuses(tmp_path: Path, arr: np.ndarray) -> None:
    img = nib.Nifti1Image(arr, None)
    img.header.set_zooms((0.5, 0.5, 3.0))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    path = tmp_path / "n.nii"
    nib.save(img, str(path))
    vol = load_nifti(path)
    assert "NO_SPATIAL_TRANSFORM" in _codes(vol)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.5, 3.0))
    with pytest.raises(GeometryError):
        load_nifti(path, strict=True)


# --- D4: shear ---------------------------------------------------------------------------
def test_sheared_affine_kept_then_refused_when_strict(tmp_path: Path, arr: np.ndarray) -> None:
    path = _save(tmp_path / "sh.nii", arr, OBLIQUE)
    vol = load_nifti(path)
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-5)
    assert "SHEARED_AFFINE" in _codes(vol)
    with pytest.raises(GeometryError) as err:
        load_nifti(path, strict=True)
    assert err.value.code == "SHEARED_AFFINE"


# --- D5: implausible dims refused before allocation --------------------------------------
def _patch_dims(path: Path, dims: list[int], endian: str = "<") -> None:
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack(f"{endian}8h", *dims)
    path.write_bytes(bytes(raw))


def test_negative_dim_refused(tmp_path: Path, arr: np.ndarray) -> None:
    path = _save(tmp_path / "neg.nii", arr, np.eye(4))
    _patch_dims(path, [3, 12, -10, 6, 1, 1, 1, 1])
    with pytest.raises(CorruptFileError):
        load_nifti(path)


def test_byte_swapped_huge_dims_refused_fast(tmp_path: Path, arr: np.ndarray) -> None:
    path = _save(tmp_path / "big.nii", arr, np.eye(4))
    # little-endian header, dims written big-endian: 12 -> 3072 etc.; 4D 3072^3 x 1536
    _patch_dims(path, [4, 3072, 2560, 1536, 1536, 1, 1, 1])
    tracemalloc.start()
    with pytest.raises(LimitExceededError):
        load_nifti(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_dims_bigger_than_file_refused(tmp_path: Path, arr: np.ndarray) -> None:
    path = _save(tmp_path / "incons.nii", arr, np.eye(4))
    _patch_dims(path, [3, 120, 100, 60, 1, 1, 1, 1])
    with pytest.raises(TruncatedError):
        load_nifti(path)


# --- D6: gzip bomb capped at the header-implied size -------------------------------------
def test_gzip_bomb_is_capped(tmp_path: Path) -> None:
    small = np.ones((8, 8, 8), dtype=np.uint8)
    plain = _save(tmp_path / "p.nii", small, np.eye(4)).read_bytes()
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip container
    body = comp.compress(plain)
    zeros = bytes(1 << 20)
    for _ in range(64):  # 64 MiB of hidden payload after the declared image
        body += comp.compress(zeros)
    body += comp.flush()
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(body)
    tracemalloc.start()
    vol = load_nifti(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # never decompressed the 64 MiB
    assert "TRAILING_DATA" in _codes(vol)
    np.testing.assert_array_equal(vol.array, small)
    with pytest.raises(CorruptFileError):
        load_nifti(bomb, strict=True)


# --- D7: 4D kept, 5D refused -------------------------------------------------------------
def test_4d_kept_and_5d_refused(tmp_path: Path) -> None:
    four = np.random.default_rng(1).normal(size=(6, 5, 4, 3)).astype(np.float32)
    vol = load_nifti(_save(tmp_path / "f.nii", four, np.eye(4)))
    assert vol.shape == (6, 5, 4, 3) and vol.meta["n_timepoints"] == 3
    np.testing.assert_array_equal(vol.array, four)
    singleton = load_nifti(_save(tmp_path / "s.nii", four[..., :1, None], np.eye(4)))
    assert singleton.shape == (6, 5, 4)
    five = np.zeros((6, 5, 4, 1, 3), dtype=np.float32)
    with pytest.raises(UnsupportedInputError) as err:
        load_nifti(_save(tmp_path / "v.nii", five, np.eye(4)))
    assert err.value.code == "UNSUPPORTED_DIMENSIONS"


def test_2d_image_gets_k_of_one(tmp_path: Path) -> None:
    vol = load_nifti(_save(tmp_path / "xray.nii", np.ones((7, 9), np.float32), np.eye(4)))
    assert vol.shape == (7, 9, 1)


# --- C5 and not-a-NIfTI ------------------------------------------------------------------
def test_nan_refused(tmp_path: Path, arr: np.ndarray) -> None:
    bad = arr.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InvalidValuesError):
        load_nifti(_save(tmp_path / "nan.nii.gz", bad, np.eye(4)))
    bad[3, 3, 3] = np.inf
    with pytest.raises(InvalidValuesError):
        load_nifti(_save(tmp_path / "inf.nii.gz", bad, np.eye(4)))


def test_not_nifti_and_missing(tmp_path: Path) -> None:
    txt = tmp_path / "notes.nii"
    txt.write_text("this is not an image " * 40)
    with pytest.raises(UnsupportedInputError) as err:
        load_nifti(txt)
    assert err.value.code == "NOT_NIFTI"
    with pytest.raises(NoImagesError):
        load_nifti(tmp_path / "absent.nii.gz")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(MedfusionError):
        load_nifti(empty)


def test_error_messages_never_hold_the_file_name(tmp_path: Path, arr: np.ndarray) -> None:
    path = _save(tmp_path / "ZZTEST_SENTINEL_Doe.nii.gz", arr, np.eye(4))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(MedfusionError) as err:
        load_nifti(path)
    assert "ZZTEST" not in str(err.value) and "Doe" not in str(err.value)
    assert "file-" in str(err.value)  # a pseudonym the user can match with inspect


# --- real files: dcm2niix outputs from ../shared/data ------------------------------------
@pytest.mark.shared_data
def test_real_dcm2niix_outputs_match_nibabel(shared_data: Path) -> None:
    """Every reference NIfTI written by dcm2niix loads with the same voxels and affine as
    nibabel gives (sform/qform policy identical to nibabel's)."""
    paths = sorted((shared_data / "dicom").glob("*/Ref/*.nii*"))
    assert paths, "no reference NIfTI files found"
    for path in paths:
        if path.stat().st_size > 8_000_000:
            continue  # keep the test fast; the gz path is covered by _2.nii.gz
        ref = nib.load(str(path))
        vol = load_nifti(path)
        expected = np.asarray(ref.dataobj, dtype=np.float32)
        assert vol.array.shape == expected.squeeze().shape or vol.array.shape == expected.shape
        np.testing.assert_array_equal(vol.array.reshape(expected.shape), expected)
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)


def test_big_endian_and_nifti2_files(tmp_path: Path, arr: np.ndarray) -> None:
    aff = _oblique_affine()
    hdr = nib.Nifti1Header(endianness=">")
    big = nib.Nifti1Image(arr.astype(">f4"), aff, header=hdr)
    nib.save(big, str(tmp_path / "be.nii"))
    assert (tmp_path / "be.nii").read_bytes()[:4] == (348).to_bytes(4, "big")
    vol = load_nifti(tmp_path / "be.nii")
    np.testing.assert_array_equal(vol.array, arr)
    nib.save(nib.Nifti2Image(arr, aff), str(tmp_path / "two.nii.gz"))
    vol2 = load_nifti(tmp_path / "two.nii.gz")
    np.testing.assert_array_equal(vol2.array, arr)
    np.testing.assert_allclose(vol2.affine, aff, atol=1e-6)
    assert vol2.meta["format"] == "NIfTI-2"


# --- header values readers disagree on (qfac, negative pixdim, quaternion, scaling) ------
_QFORM_AFFINE = np.diag([0.8, 0.9, 2.5, 1.0])


def _qform_only(path: Path, data: np.ndarray) -> Path:
    """A qform-only file (sform_code 0) whose header fields the tests then patch raw."""
    img = nib.Nifti1Image(data, _QFORM_AFFINE)
    img.set_qform(_QFORM_AFFINE, code=1)
    img.set_sform(None, code=0)
    nib.save(img, str(path))
    return path


def _patch(path: Path, offset: int, fmt: str, *values: float) -> Path:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))
    return path


def _nibabel_view(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What nibabel gives for the file, as (I, J, K[, T]) float32 and affine."""
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(), dtype=np.float32), img.affine


def test_qfac_zero_read_as_one_like_nibabel(tmp_path: Path, arr: np.ndarray) -> None:
    path = _patch(_qform_only(tmp_path / "q0.nii", arr), 76, "<f", 0.0)  # pixdim[0]
    vol = load_nifti(path)
    data, affine = _nibabel_view(path)
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    np.testing.assert_allclose(vol.affine, _QFORM_AFFINE, atol=1e-6)
    assert vol.meta["affine_source"] == "qform"
    flipped = _patch(_qform_only(tmp_path / "qm.nii", arr), 76, "<f", -1.0)
    assert np.linalg.det(load_nifti(flipped).affine[:3, :3]) < 0  # qfac -1 is kept
    odd = _patch(_qform_only(tmp_path / "qodd.nii", arr), 76, "<f", -0.5)
    with pytest.raises(GeometryError) as err:  # nibabel reads 1, niftilib -1
        load_nifti(odd)
    assert "qfac" in err.value.message


@pytest.mark.parametrize("axis", [1, 3])
def test_negative_pixdim_refused_when_the_qform_needs_it(
    tmp_path: Path, arr: np.ndarray, axis: int
) -> None:
    """nibabel takes abs(pixdim), ITK flips the axis: the orientation is ambiguous."""
    path = _patch(_qform_only(tmp_path / "neg.nii", arr), 76 + 4 * axis, "<f", -0.8)
    with pytest.raises(GeometryError) as err:
        load_nifti(path)
    assert err.value.code == "GEOMETRY" and "negative" in err.value.message
    # With an sform the qform's voxel sizes are not used: loaded like nibabel loads it.
    both = nib.Nifti1Image(arr, _oblique_affine())
    both.set_qform(_oblique_affine(), code=1)
    nib.save(both, str(tmp_path / "both.nii"))
    path = _patch(tmp_path / "both.nii", 76 + 4 * axis, "<f", -0.8)
    vol = load_nifti(path)
    data, affine = _nibabel_view(path)
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert "QFORM_INVALID" in _codes(vol)


def test_quaternion_longer_than_one(tmp_path: Path, arr: np.ndarray) -> None:
    path = _patch(_qform_only(tmp_path / "q.nii", arr), 256, "<3f", 0.9, 0.9, 0.0)
    with pytest.raises(ValueError):  # nibabel refuses it too (not a rotation)
        nib.load(str(path)).header.get_qform()
    with pytest.raises(GeometryError) as err:
        load_nifti(path)
    assert "quaternion" in err.value.message
    # The sform (sform_code > 0) still defines the grid: loaded, the qform reported.
    img = nib.Nifti1Image(arr, _oblique_affine())
    img.set_qform(_oblique_affine(), code=1)
    nib.save(img, str(tmp_path / "qs.nii"))
    path = _patch(tmp_path / "qs.nii", 256, "<3f", 0.9, 0.9, 0.0)
    vol = load_nifti(path)
    np.testing.assert_allclose(vol.affine, nib.load(str(path)).affine, atol=1e-6)
    assert "QFORM_INVALID" in _codes(vol)


@pytest.mark.parametrize("inter", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_intercept_with_a_slope_refused(tmp_path: Path, inter: float) -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = _patch(_qform_only(tmp_path / "i.nii", data), 112, "<2f", 2.0, inter)
    with pytest.raises(Exception, match="intercept"):  # nibabel refuses it as well
        nib.load(str(path)).get_fdata()
    with pytest.raises(InvalidValuesError):
        load_nifti(path)


@pytest.mark.parametrize("slope", [0.0, float("nan"), float("inf")])
def test_unusable_slope_means_no_scaling_like_nibabel(tmp_path: Path, slope: float) -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = _patch(_qform_only(tmp_path / "s.nii", data), 112, "<2f", slope, 5.0)
    vol = load_nifti(path)
    np.testing.assert_array_equal(vol.array, _nibabel_view(path)[0])
    np.testing.assert_array_equal(vol.array, data)
    assert _codes(vol) == ["SCALING_IGNORED"]  # ITK would add the intercept


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10.0])
def test_implausible_vox_offset_is_corrupt(tmp_path: Path, arr: np.ndarray, value: float) -> None:
    path = _patch(_save(tmp_path / "v.nii", arr, np.eye(4)), 108, "<f", value)
    with pytest.raises(CorruptFileError) as err:
        load_nifti(path)
    assert "vox_offset" in err.value.message


def test_link_loop_is_a_typed_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop.name)
    with pytest.raises(MedfusionError) as err:
        load_nifti(loop)
    assert err.value.code == "SYMLINK_LOOP"


# --- sniffing: magic strings, not the first four bytes -----------------------------------
def test_dicom_whose_preamble_starts_with_348_is_dicom(tmp_path: Path) -> None:
    from medfusion.io.nifti import sniff_format
    from medfusion.io.volume import load_volume

    sample = Path(__file__).resolve().parents[1] / "data_samples/studies/study-000/xray.dcm"
    raw = bytearray(sample.read_bytes())
    assert raw[128:132] == b"DICM"
    raw[:4] = (348).to_bytes(4, "little")  # the preamble is free-form
    path = tmp_path / "image"
    path.write_bytes(bytes(raw))
    assert sniff_format(path) == "dicom"
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, load_volume(sample).array)
    for name, klass in (("a.nii", nib.Nifti1Image), ("b.nii.gz", nib.Nifti2Image)):
        nib.save(klass(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(tmp_path / name))
        assert sniff_format(tmp_path / name) == "nifti"
    (tmp_path / "text.nii").write_text("not an image " * 50)
    assert sniff_format(tmp_path / "text.nii") == "unknown"
