"""Malformed DICOM inputs end in a valid volume or a specific typed error (never a silently
wrong volume, a huge allocation, or an exception that escapes the loaders)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from medfusion.errors import MedfusionError
from medfusion.io.dicom import _guarded, iter_files, scan_dicom
from medfusion.io.volume import load_volume
from medfusion.testing.dicom_factory import (
    write_enhanced_multiframe,
    write_mosaic,
    write_radiograph,
    write_series,
)

RNG = np.random.default_rng(7)


def _ct(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(-1000, 1000, shape).astype(np.float64)


def _code(path: Path) -> str:
    with pytest.raises(MedfusionError) as err:
        load_volume(path)
    return err.value.code


def _assert_valid(vol) -> None:
    assert vol.array.size > 0
    assert np.all(np.isfinite(vol.array))
    assert np.all(np.isfinite(vol.affine)) and abs(np.linalg.det(vol.affine[:3, :3])) > 1e-6


def _fragment_offset(path: Path, marker: bytes) -> int:
    data = path.read_bytes()
    pos = data.rfind(marker)
    assert pos > 0, "encapsulated frame not found"
    return pos


# --- 1. a panic in a Rust decoder --------------------------------------------------------
def _rle_file_with_segment_offset(folder: Path, offset: int) -> Path:
    """A 16-bit RLE slice whose second segment offset (RLE header bytes 8..12 of the frame
    fragment) is replaced: the segment boundaries no longer match the data."""
    path = write_series(folder, _ct((32, 32, 1)), transfer_syntax=RLELossless, seed=3,
                        identifiers=False)[0]
    data = bytearray(path.read_bytes())
    header = _fragment_offset(path, b"\xfe\xff\x00\xe0") + 8  # last item: the frame
    assert int.from_bytes(data[header : header + 4], "little") == 2  # two byte segments
    data[header + 8 : header + 12] = offset.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def test_rle_decoder_panic_becomes_typed_corrupt_error(tmp_path: Path):
    _rle_file_with_segment_offset(tmp_path, 100)  # inside the first segment
    with pytest.raises(MedfusionError) as err:
        load_volume(tmp_path)
    assert err.value.code == "CORRUPT"
    assert "could not be decoded" in err.value.message
    # the decoder really panicked (pyo3's PanicException derives from BaseException)
    assert type(err.value.__context__).__name__ == "PanicException"


# --- 2. corrupt compressed data is CORRUPT; a missing decoder is UNSUPPORTED_ENCODING -----
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_undecodable_compressed_frame_is_corrupt_not_missing_decoder(tmp_path: Path, syntax):
    if syntax == RLELossless:
        _rle_file_with_segment_offset(tmp_path, 0xFFFF)  # past the end of the fragment
    else:
        path = write_series(tmp_path, _ct((32, 32, 1)), transfer_syntax=syntax, seed=4,
                            identifiers=False)[0]
        data = bytearray(path.read_bytes())
        pos = _fragment_offset(path, b"\xff\x4f\xff\x51")  # J2K SOC + SIZ markers
        data[pos : pos + 64] = bytes(64)
        path.write_bytes(bytes(data))
    with pytest.raises(MedfusionError) as err:
        load_volume(tmp_path)
    assert err.value.code == "CORRUPT"
    assert "could not be decoded" in err.value.message
    assert "pip install" not in err.value.message


def test_syntax_without_decoder_is_unsupported_encoding(tmp_path: Path):
    path = write_series(tmp_path, _ct((32, 32, 1)), transfer_syntax=RLELossless, seed=4)[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # encapsulated video: no decoder exists
    ds.save_as(path)
    assert _code(tmp_path) == "UNSUPPORTED_ENCODING"


def test_corrupted_transfer_syntax_uid_is_typed(tmp_path: Path):
    path = write_series(tmp_path, _ct((8, 8, 1)), seed=4)[0]
    data = path.read_bytes()
    # pydicom refuses to write it: damage the file meta header in place (same length)
    assert data.count(b"1.2.840.10008.1.2.1\0") == 1
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.9\0"))
    assert _code(tmp_path) == "UNKNOWN_TRANSFER_SYNTAX"


# --- 3. memory: the tilt/uneven resampler is sized before it allocates --------------------
def test_resampled_grid_checked_against_limit_before_allocation(tmp_path: Path):
    # 3 slices of 16 x 16 (6 kB of pixels) whose last one drifts 7 m along both in-plane
    # axes: the tilt correction would need a 14016 x 14016 x 3 float32 grid (2.4 GB)
    write_series(tmp_path, _ct((16, 16, 3)), spacing=(0.5, 0.5, 2.0), seed=5,
                 per_slice_tags={2: {"ImagePositionPatient": ["7000", "7000", "4"]}})
    tracemalloc.start()
    try:
        with pytest.raises(MedfusionError) as err:
            load_volume(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code == "LIMIT_EXCEEDED"
    assert "resampled" in err.value.message
    assert peak < 64 * 1024**2


def test_slice_steps_beyond_ten_metres_refused(tmp_path: Path):
    write_series(tmp_path, _ct((8, 8, 4)), seed=5, slice_positions=[0.0, 1e4, 2e4, 3e4])
    assert _code(tmp_path) == "IMPLAUSIBLE_GEOMETRY"
    write_series(tmp_path / "far", _ct((8, 8, 3)), seed=5, slice_positions=[0.0, 1e15, 2e15])
    assert _code(tmp_path / "far") == "IMPLAUSIBLE_GEOMETRY"


# --- 4. silently wrong volumes --------------------------------------------------------
@pytest.mark.parametrize("tags", [
    {"RescaleSlope": "1e38"},  # finite in float64, inf once stored values are scaled
    {"RescaleIntercept": "-1e39"},  # beyond float32
    {"RescaleSlope": "0"},  # every voxel the intercept
])
def test_rescale_that_breaks_float32_is_invalid_values(tmp_path: Path, tags):
    write_series(tmp_path, _ct((8, 8, 2)), seed=6, **tags)
    assert _code(tmp_path) == "INVALID_VALUES"


def test_enhanced_and_radiograph_rescale_overflow_is_invalid_values(tmp_path: Path):
    path = write_enhanced_multiframe(tmp_path / "e.dcm", _ct((8, 8, 2)) + 1000)
    ds = pydicom.dcmread(path)
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = "1e38"
    ds.save_as(path)
    assert _code(path) == "INVALID_VALUES"
    xray = write_radiograph(tmp_path / "x.dcm", RNG.integers(1, 4096, (8, 8)),
                            rescale=(1e38, 0.0))
    assert _code(xray) == "INVALID_VALUES"


@pytest.mark.parametrize("spacing", [["0", "0"], ["1e-300", "1e-300"], ["inf", "1"],
                                     ["nan", "1"], ["-0.5", "0.5"]])
def test_invalid_pixel_spacing_is_geometry_error(tmp_path: Path, spacing):
    write_series(tmp_path, _ct((8, 8, 2)), seed=6, PixelSpacing=spacing)
    assert _code(tmp_path) == "INVALID_PIXEL_SPACING"


def test_radiograph_negative_or_nan_pixel_spacing_refused(tmp_path: Path):
    for n, spacing in enumerate((["-0.2", "0.2"], ["nan", "0.2"], ["inf", "inf"])):
        path = write_radiograph(tmp_path / f"x{n}.dcm", RNG.integers(0, 4096, (8, 8)),
                                PixelSpacing=spacing)
        assert _code(path) == "INVALID_PIXEL_SPACING"


@pytest.mark.parametrize("iop", [["1e308", "0", "0", "0", "1", "0"],
                                 ["2", "0", "0", "0", "2", "0"],
                                 ["nan", "0", "0", "0", "1", "0"]])
def test_non_unit_or_non_finite_orientation_refused(tmp_path: Path, iop):
    write_series(tmp_path, _ct((8, 8, 2)), seed=6, ImageOrientationPatient=iop)
    assert _code(tmp_path) == "INVALID_ORIENTATION"


@pytest.mark.parametrize("width", ["1e-300", "0.5"])
def test_unusable_voi_window_ignored_with_finding(tmp_path: Path, width):
    stored = RNG.integers(0, 4096, (8, 8))
    stored[0, 0] = 2000  # exactly at the center: 0/0 in float32 before the fix
    path = write_radiograph(tmp_path / "x.dcm", stored, window=(2000.0, 1.0))
    ds = pydicom.dcmread(path)
    ds.WindowWidth = width
    ds.save_as(path)
    vol = load_volume(path)
    _assert_valid(vol)
    assert "VOI_IGNORED" in [f.code for f in vol.issues]
    assert vol.meta["voi"] == "none (full stored range)"


def test_linear_window_of_width_one_is_a_step(tmp_path: Path):
    stored = np.array([[1999, 2000], [2001, 0]])
    vol = load_volume(write_radiograph(tmp_path / "x.dcm", stored, window=(2000.0, 1.0)))
    _assert_valid(vol)
    np.testing.assert_array_equal(vol.array[..., 0], [[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize("tag", ["Rows", "Columns"])
def test_zero_rows_or_columns_refused_before_decode(tmp_path: Path, tag):
    write_series(tmp_path / "ct", _ct((8, 8, 2)), seed=6, **{tag: 0})
    assert _code(tmp_path / "ct") == "INVALID_DIMENSIONS"
    xray = write_radiograph(tmp_path / "x.dcm", RNG.integers(0, 4096, (8, 8)), **{tag: 0})
    assert _code(xray) == "INVALID_DIMENSIONS"


def test_rows_smaller_than_pixel_data_is_not_a_cropped_image(tmp_path: Path):
    xray = write_radiograph(tmp_path / "x.dcm", RNG.integers(0, 4096, (16, 16)), Rows=8)
    assert _code(xray) == "PIXEL_LENGTH_MISMATCH"


# --- 5. accepted without a finding before -----------------------------------------------
@pytest.mark.parametrize("value,code", [("RGB", "INVALID_PHOTOMETRIC"),
                                        ("NOT GRAYSCALE", "INVALID_PHOTOMETRIC"),
                                        ("YBR_FULL", "INVALID_PHOTOMETRIC"),
                                        ("PALETTE COLOR", "UNSUPPORTED_INPUT")])
def test_bogus_photometric_on_ct_refused(tmp_path: Path, value, code):
    write_series(tmp_path, _ct((8, 8, 2)), seed=6, PhotometricInterpretation=value)
    assert _code(tmp_path) == code


def test_monochrome1_ct_still_loads(tmp_path: Path):
    arr = _ct((8, 8, 2))
    write_series(tmp_path, arr, seed=6, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(load_volume(tmp_path).array, arr)


@pytest.mark.parametrize("tags", [{"BitsStored": 17}, {"BitsStored": 0},
                                  {"PixelRepresentation": 2}])
def test_bits_that_do_not_fit_are_corrupt(tmp_path: Path, tags):
    write_series(tmp_path, _ct((8, 8, 2)), seed=6, **tags)
    assert _code(tmp_path) == "INVALID_BITS"


# --- 6. the catch-all is accurate and rare ------------------------------------------------
def test_catch_all_message_is_accurate_and_control_flow_passes():
    @_guarded
    def broken() -> None:
        raise ValueError("internal detail")

    with pytest.raises(MedfusionError) as err:
        broken()
    assert err.value.code == "MALFORMED_DICOM"
    assert err.value.message.startswith("malformed DICOM input (ValueError)")
    assert "bug" not in err.value.message and "internal detail" not in err.value.message

    @_guarded
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()


def test_corrupt_value_representation_is_an_unreadable_header(tmp_path: Path):
    path = write_radiograph(tmp_path / "x.dcm", RNG.integers(0, 4096, (8, 8)))
    data = path.read_bytes()
    tag = b"\x28\x00\x04\x00CS"  # PhotometricInterpretation, explicit VR
    path.write_bytes(data.replace(tag, b"\x28\x00\x04\x00\xf7\x43", 1))
    assert _code(path) == "NOT_DICOM"


# --- 7a. a preamble that starts with the bytes of 348 is still DICOM ----------------------
@pytest.mark.parametrize("name", ["image.dcm", "IM0001", "image.nii"])
def test_dicom_with_nifti_like_preamble_loads_as_dicom(tmp_path: Path, name):
    arr = RNG.integers(0, 4096, (8, 8))
    path = write_radiograph(tmp_path / name, arr)
    data = bytearray(path.read_bytes())
    data[:4] = (348).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    vol = load_volume(path)
    assert vol.modality == "DX" and vol.shape == (8, 8, 1)


# --- 7b. an enhanced series split over files: one 4D volume --------------------------------
def _enhanced_time_points(folder: Path, n: int, *, times: list[str]) -> np.ndarray:
    frames = []
    for t in range(n):
        arr = _ct((8, 8, 3)) + 1000
        frames.append(arr)
        # written in reverse time order and file names: the order must come from the times
        write_enhanced_multiframe(folder / f"f{n - t}.dcm", arr, seed=9,
                                  SeriesInstanceUID="1.2.826.0.1.3680043.8.498.77",
                                  AcquisitionDateTime=times[t], InstanceNumber=n - t)
    return np.stack(frames, axis=-1)


def test_enhanced_files_of_one_series_stack_in_acquisition_order(tmp_path: Path):
    expected = _enhanced_time_points(tmp_path, 3, times=["20200101120000.5", "20200101120001",
                                                         "20200101120002.25"])
    scan = scan_dicom(iter_files(tmp_path))
    assert len(scan.series) == 1 and scan.series[0].n_instances == 3
    vol = load_volume(tmp_path)
    assert vol.shape == (8, 8, 3, 3)
    np.testing.assert_array_equal(vol.array, expected)
    finding = next(f for f in vol.issues if f.code == "MULTIPLE_TIME_POINTS")
    assert finding.details["separated_by"] == "files ordered by AcquisitionDateTime"


def test_enhanced_files_with_different_geometry_stay_separate(tmp_path: Path):
    uid = "1.2.826.0.1.3680043.8.498.78"
    write_enhanced_multiframe(tmp_path / "a.dcm", _ct((8, 8, 3)) + 1000, SeriesInstanceUID=uid)
    write_enhanced_multiframe(tmp_path / "b.dcm", _ct((8, 8, 3)) + 1000, SeriesInstanceUID=uid,
                              spacing=(1.0, 1.0, 5.0))
    assert len(scan_dicom(iter_files(tmp_path)).series) == 2
    assert _code(tmp_path) == "MIXED_SERIES"


@pytest.mark.shared_data
def test_siemens_xa10_four_files_equal_dcm2niix_4d(shared_data: Path):
    folder = shared_data / "dicom/dcm_qa_enh/In/Siemens/XA10"
    vol = load_volume(folder)
    assert vol.shape == (64, 64, 6, 4)
    assert vol.meta["t_axis"] == "files ordered by FrameAcquisitionDateTime"
    ref = nib.load(str(shared_data / "dicom/dcm_qa_enh/Ref/Siemens_REST1_w_SMS_PF7-8_6.nii"))
    ref_img = nib.as_closest_canonical(ref)
    ours = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(vol.array), vol.affine))
    np.testing.assert_allclose(ours.affine, ref_img.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(ours.dataobj),
                                  ref_img.get_fdata(dtype=np.float64))


# --- 7c. one outcome per 1-bit object, whatever the byte order ----------------------------
def test_one_bit_object_same_outcome_little_and_big_endian(tmp_path: Path):
    codes = set()
    for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian):
        path = write_radiograph(tmp_path / f"{syntax.name[:12]}.dcm",
                                RNG.integers(0, 2, (16, 16)), bits_stored=1)
        ds = pydicom.dcmread(path)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PixelData = np.packbits(RNG.integers(0, 2, 256).astype(np.uint8),
                                   bitorder="little").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(path, ds, implicit_vr=False,
                         little_endian=syntax == ExplicitVRLittleEndian,
                         enforce_file_format=True)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
        codes.add(_code(path))
    assert codes == {"UNSUPPORTED_INPUT"}


# --- 7d. mosaic tiles that do not fit the matrix ------------------------------------------
def test_mosaic_unpacked_exactly_and_bad_layout_named(tmp_path: Path):
    arr = np.arange(8 * 8 * 4, dtype=np.float64).reshape(8, 8, 4)
    write_mosaic(tmp_path / "ok", arr)
    vol = load_volume(tmp_path / "ok")
    np.testing.assert_array_equal(vol.array, arr)
    write_mosaic(tmp_path / "bad", arr, matrix=(17, 16))  # 2 x 2 tiles cannot divide 17
    with pytest.raises(MedfusionError) as err:
        load_volume(tmp_path / "bad")
    assert err.value.code == "INVALID_MOSAIC" and "CSA header cannot" not in err.value.message
    write_mosaic(tmp_path / "count", arr, n_images=5)  # 3 x 3 tiles cannot divide 16
    assert _code(tmp_path / "count") == "INVALID_MOSAIC"

