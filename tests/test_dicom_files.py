"""Single files, encodings, malformed inputs, radiographs, enhanced multi-frame, identifiers
(reliability cases A1-A6, B8, C4, G1-G3)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from medfusion.errors import (
    LimitExceededError,
    MedfusionError,
    MixedSeriesError,
    NotDicomError,
    TruncatedError,
    UnsupportedEncodingError,
)
from medfusion.io.dicom import iter_files, load_dicom_file, load_series, scan_dicom
from medfusion.io.limits import check_declared_size
from medfusion.io.volume import load_volume
from medfusion.testing.dicom_factory import (
    SENTINEL_FILE_STEM,
    SENTINEL_FREE_TEXT,
    SENTINEL_PRIVATE,
    SENTINELS,
    truncate_file,
    write_enhanced_multiframe,
    write_huge_header,
    write_non_dicom_files,
    write_radiograph,
    write_series,
)

RNG = np.random.default_rng(99)


def _ct(shape=(32, 32, 4)) -> np.ndarray:
    return RNG.integers(-1000, 1500, shape).astype(np.float64)


# --- A1 ----------------------------------------------------------------------------------
def test_non_dicom_files_skipped_and_listed(tmp_path: Path):
    arr = _ct((8, 8, 4))
    write_series(tmp_path, arr, seed=1)
    write_non_dicom_files(tmp_path)
    vol = load_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, arr)
    skipped = next(f for f in vol.issues if f.code == "SKIPPED_FILES")
    assert skipped.details["count"] == 5
    assert skipped.details["reasons"]["DICOMDIR"] == 1
    scan = scan_dicom(iter_files(tmp_path))
    assert {p.name for p, _ in scan.skipped} == {
        "notes.txt", "report.pdf", ".DS_Store", "empty.dcm", "DICOMDIR"
    }


def test_single_non_dicom_file_is_not_dicom(tmp_path: Path):
    (paths := write_non_dicom_files(tmp_path))
    for p in paths:
        with pytest.raises(NotDicomError) as err:
            load_volume(p)
        assert err.value.code == "NOT_DICOM"


# --- A2 / A3 -----------------------------------------------------------------------------
def test_truncated_uncompressed_pixel_data(tmp_path: Path):
    paths = write_series(tmp_path, _ct((16, 16, 3)), seed=1)
    truncate_file(paths[1], remove_bytes=100)
    with pytest.raises(TruncatedError) as err:
        load_volume(tmp_path)
    assert err.value.code == "TRUNCATED"


@pytest.mark.parametrize("strict", [False, True])
def test_truncated_encapsulated_file_never_zero_padded(tmp_path: Path, strict: bool):
    path = write_series(tmp_path, _ct((32, 32, 1)), transfer_syntax=RLELossless, seed=1)[0]
    truncate_file(path, remove_bytes=30)
    with pytest.raises(MedfusionError) as err:
        load_dicom_file(path, strict=strict)
    assert err.value.code in ("TRUNCATED", "CORRUPT")


# --- A4 / A5 -----------------------------------------------------------------------------
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_decode_identical(tmp_path: Path, syntax):
    arr = _ct((32, 32, 3))
    write_series(tmp_path / "raw", arr, seed=2)
    write_series(tmp_path / "enc", arr, seed=2, transfer_syntax=syntax)
    raw = load_volume(tmp_path / "raw")
    enc = load_volume(tmp_path / "enc")
    np.testing.assert_array_equal(enc.array, raw.array)
    np.testing.assert_array_equal(enc.affine, raw.affine)


def test_no_decoder_names_syntax_and_install(tmp_path: Path):
    path = write_series(tmp_path, _ct((32, 32, 1)), transfer_syntax=RLELossless, seed=1)[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here
    ds.save_as(path)
    with pytest.raises(UnsupportedEncodingError) as err:
        load_dicom_file(path)
    assert "1.2.840.10008.1.2.4.100" in str(err.value)
    assert "pip install pylibjpeg" in str(err.value)


def test_all_zero_decoded_frame_flagged(tmp_path: Path):
    arr = np.full((32, 32, 2), -1024.0)  # stored 0 with intercept -1024
    write_series(tmp_path, arr, transfer_syntax=RLELossless, seed=1)
    vol = load_volume(tmp_path)
    zero = next(f for f in vol.issues if f.code == "ZERO_FRAME")
    assert zero.details["count"] == 2


# --- A6 ----------------------------------------------------------------------------------
def test_huge_declared_header_refused_fast(tmp_path: Path):
    path = write_huge_header(tmp_path / "huge.dcm", rows=60000, columns=60000, frames=1000)
    start = time.perf_counter()
    with pytest.raises(LimitExceededError) as err:
        load_volume(path)
    assert time.perf_counter() - start < 1.0
    assert err.value.code == "LIMIT_EXCEEDED"
    with pytest.raises(LimitExceededError):
        scan_dicom([path])  # refused from the header pass alone
    with pytest.raises(LimitExceededError):
        load_volume(tmp_path)


def test_limit_env_override(monkeypatch: pytest.MonkeyPatch):
    assert check_declared_size((512, 512, 200), 2, "x") == 512 * 512 * 200
    monkeypatch.setenv("MEDFUSION_MAX_BYTES", str(1024 * 1024))
    with pytest.raises(LimitExceededError) as err:
        check_declared_size((512, 512, 2), 2, "test image")
    assert "MEDFUSION_MAX_BYTES" in str(err.value)


# --- C4 X-ray ----------------------------------------------------------------------------
def test_monochrome1_inverted_after_window(tmp_path: Path):
    stored = RNG.integers(0, 4096, (20, 30))
    m2 = load_volume(write_radiograph(tmp_path / "m2.dcm", stored, window=(2048, 4096)))
    m1 = load_volume(write_radiograph(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1",
                                      window=(2048, 4096)))
    assert m2.shape == (20, 30, 1) and m2.array.dtype == np.float32
    np.testing.assert_allclose(m1.array, 1.0 - m2.array, atol=1e-6)
    assert m1.meta["inverted"] is True and m1.meta["voi"] == "window"
    assert "MONOCHROME1_INVERTED" in [f.code for f in m1.issues]
    # brighter stored value = denser in MONOCHROME2 -> higher output; opposite stored in M1
    hi = np.unravel_index(np.argmax(stored), stored.shape)
    assert m2.array[hi][0] == pytest.approx(m2.array.max())
    assert m1.array[hi][0] == pytest.approx(m1.array.min())


def test_window_narrow_clips(tmp_path: Path):
    stored = np.tile(np.arange(0, 1000, 10), (5, 1)).astype(int)  # (5, 100)
    vol = load_volume(write_radiograph(tmp_path / "w.dcm", stored, window=(500, 200)))
    assert vol.array.min() == 0.0 and vol.array.max() == 1.0
    row = vol.array[0, :, 0]
    assert row[30] == 0.0 and row[70] == 1.0 and 0.0 < row[50] < 1.0


def test_voi_lut_preferred_over_window(tmp_path: Path):
    stored = RNG.integers(0, 4096, (10, 12))
    lut = (np.arange(4096) // 16).astype(np.uint16)  # 8-bit output
    vol = load_volume(write_radiograph(tmp_path / "l.dcm", stored, window=(10, 20),
                                       voi_lut={"lut": lut, "first_mapped": 0, "bits": 8}))
    assert vol.meta["voi"] == "lut"
    np.testing.assert_allclose(vol.array[..., 0], (stored // 16) / 255.0, atol=1e-6)


def test_imager_pixel_spacing_fallback(tmp_path: Path):
    stored = RNG.integers(0, 4096, (10, 12))
    vol = load_volume(write_radiograph(tmp_path / "i.dcm", stored, pixel_spacing=None,
                                       imager_pixel_spacing=(0.15, 0.1)))
    assert vol.spacing[:2] == pytest.approx((0.1, 0.15))
    assert "IMAGER_PIXEL_SPACING" in [f.code for f in vol.issues]
    vol2 = load_volume(write_radiograph(tmp_path / "p.dcm", stored, pixel_spacing=(0.2, 0.3)))
    assert vol2.spacing[:2] == pytest.approx((0.3, 0.2))
    assert vol2.meta["spacing_source"] == "PixelSpacing"


def test_multiframe_radiograph(tmp_path: Path):
    stored = RNG.integers(0, 4096, (10, 12, 3))
    vol = load_volume(write_radiograph(tmp_path / "mf.dcm", stored, window=(2048, 4096)))
    assert vol.shape == (10, 12, 1, 3)


# --- B8 enhanced multi-frame -------------------------------------------------------------
def test_enhanced_multiframe_shuffled_frames_and_per_frame_rescale(tmp_path: Path):
    arr = RNG.integers(0, 800, (10, 8, 5)).astype(np.float64)
    rescales = [(1.0, float(k)) for k in range(5)]
    path = write_enhanced_multiframe(tmp_path / "e.dcm", arr + np.arange(5), modality="CT",
                                     rescale=rescales, shuffle_frames=True, seed=3)
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, arr + np.arange(5))
    assert vol.meta["enhanced"] is True
    info = scan_dicom([path]).series[0]
    assert info.is_enhanced and info.n_frames == 5 and info.n_instances == 1


def test_enhanced_multiframe_time_points(tmp_path: Path):
    arr = RNG.integers(0, 800, (8, 8, 3, 2)).astype(np.float64)
    vol = load_volume(write_enhanced_multiframe(tmp_path / "t.dcm", arr, shuffle_frames=True))
    assert vol.shape == (8, 8, 3, 2)
    np.testing.assert_array_equal(vol.array, arr)


# --- G1-G3 identifiers -------------------------------------------------------------------
_FORBIDDEN = [*SENTINELS.values(), "ZZTEST", SENTINEL_FREE_TEXT, SENTINEL_PRIVATE,
              SENTINEL_FILE_STEM, "19010101"]


def _assert_clean(text: str) -> None:
    for token in _FORBIDDEN:
        assert token.lower() not in text.lower(), f"identifier {token!r} leaked"


def test_no_identifier_in_meta_issues_summaries_or_errors(tmp_path: Path):
    study = tmp_path / f"{SENTINEL_FILE_STEM}_study"
    arr = _ct((8, 8, 6))
    write_series(study / "ct", arr, file_names="sentinel", missing_indices=(3,), seed=1,
                 series_description="ZZTEST^SENTINEL head", n_private_tags=5)
    write_non_dicom_files(study / "ct")
    vol = load_volume(study / "ct")
    assert "SeriesDescription" not in vol.meta  # free text stays out of meta (G3)
    _assert_clean(json.dumps(dict(vol.meta), default=str))
    _assert_clean(json.dumps(vol.summary(), default=str))
    _assert_clean(repr(vol.issues))
    assert not any(str(k).startswith(("0x", "(")) for k in vol.meta)  # no private tags
    scan = scan_dicom(iter_files(study))
    assert scan.series[0].description == "[removed] head"  # listed for MIXED_SERIES
    _assert_clean(json.dumps([s.summary() for s in scan.series]))
    _assert_clean(repr(scan.series))  # files are kept out of repr
    # errors: mixed series, strict gap, truncated file
    write_series(study / "ct" / "more", arr, series_number=5, file_names="sentinel", seed=2,
                 series_description="ZZTEST-ID-0001 bone")
    with pytest.raises(MixedSeriesError) as err:
        load_volume(study / "ct")
    _assert_clean(str(err.value))
    with pytest.raises(MedfusionError) as err2:
        load_volume(study / "ct", series=0, strict=True)
    _assert_clean(str(err2.value))
    bad = study / "x" / f"{SENTINEL_FILE_STEM}.dcm"
    bad.parent.mkdir()
    shutil.copy(iter_files(study / "ct" / "more")[0], bad)
    truncate_file(bad, remove_bytes=64)
    with pytest.raises(MedfusionError) as err3:
        load_volume(bad)
    _assert_clean(str(err3.value))


def test_radiograph_and_enhanced_meta_clean(tmp_path: Path):
    xr = load_volume(write_radiograph(tmp_path / f"{SENTINEL_FILE_STEM}.dcm",
                                      RNG.integers(0, 4096, (8, 8)), photometric="MONOCHROME1"))
    en = load_volume(write_enhanced_multiframe(tmp_path / "e.dcm", _ct((8, 8, 2)) + 1024))
    for vol in (xr, en):
        _assert_clean(json.dumps(dict(vol.meta), default=str) + repr(vol.issues))
        assert vol.meta["series_key"].startswith("se-")
        assert vol.meta["study_key"].startswith("st-")


def test_load_series_matches_load_volume(tmp_path: Path):
    arr = _ct((8, 8, 4))
    write_series(tmp_path, arr, seed=4)
    info = scan_dicom(iter_files(tmp_path)).series[0]
    assert info.n_instances == 4 and info.orientation == "axial" and info.modality == "CT"
    assert info.key.startswith("se-") and info.study_key.startswith("st-")
    assert "files" not in info.summary()
    np.testing.assert_array_equal(load_series(info).array, arr)


# --- fast header walker agrees with pydicom ----------------------------------------------
def _pydicom_value(ds: pydicom.Dataset, keyword: str):
    elem = ds[keyword]
    value = elem.value
    if elem.VM > 1:
        return [v if isinstance(v, str) else float(v) for v in value]
    if isinstance(value, (int, float)):
        return float(value)
    return str(value).strip()


def _norm(value):
    if isinstance(value, list):
        return [v if isinstance(v, str) else float(v) for v in value]
    return value if isinstance(value, str) else float(value)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", RLELossless])
def test_fast_header_matches_pydicom(tmp_path: Path, syntax: str):
    from medfusion.io.dicom import _FAST_REFUSE, _FAST_WANTED
    from medfusion.io.dicom_fast import read_fast_header

    paths = write_series(tmp_path, _ct((32, 32, 2)), transfer_syntax=syntax, seed=1,
                         n_private_tags=100, per_slice_tags={0: {"ImageType": "DERIVED"}})
    for path in paths:
        fast = read_fast_header(str(path), _FAST_WANTED, _FAST_REFUSE)
        assert fast is not None
        header, offset, ts = fast
        assert ts == syntax
        ds = pydicom.dcmread(path)
        assert offset is not None
        with open(path, "rb") as fp:
            fp.seek(offset)
            assert fp.read(4) == b"\xe0\x7f\x10\x00"
        for keyword in _FAST_WANTED.values():
            if keyword in ds and ds[keyword].VR != "SQ" and ds[keyword].value not in ("", None):
                assert _norm(header.get(keyword)) == _pydicom_value(ds, keyword), keyword


# --- other encodings: bare datasets (no preamble), deflate ---------------------------------
@pytest.mark.parametrize("implicit", [True, False])
def test_bare_dataset_without_preamble(tmp_path: Path, implicit: bool):
    """Old exports without the 128-byte preamble and file meta are read (sniffed by their
    first element), while other files are never force-read."""
    arr = _ct((8, 8, 3))
    for p in write_series(tmp_path / "src", arr, seed=1):
        ds = pydicom.dcmread(p)
        ds.preamble = None
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        (tmp_path / "raw").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "raw" / p.name, implicit_vr=implicit, little_endian=True,
                   enforce_file_format=False)
    np.testing.assert_array_equal(load_volume(tmp_path / "raw").array, arr)


def test_deflated_series(tmp_path: Path):
    arr = _ct((8, 8, 3))
    for p in write_series(tmp_path / "src", arr, seed=1):
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        (tmp_path / "defl").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "defl" / p.name)
    np.testing.assert_array_equal(load_volume(tmp_path / "defl").array, arr)


# --- malformed values: typed errors only, nothing identifying printed ---------------------
def test_malformed_voi_lut_is_ignored_with_finding(tmp_path: Path):
    stored = RNG.integers(0, 4096, (8, 8))
    path = write_radiograph(tmp_path / "v.dcm", stored,
                            voi_lut={"lut": np.arange(4096) // 16, "first_mapped": 0, "bits": 8})
    ds = pydicom.dcmread(path)
    del ds.VOILUTSequence[0].LUTDescriptor
    ds.save_as(path)
    vol = load_volume(path)
    assert "VOI_IGNORED" in [f.code for f in vol.issues]
    assert vol.meta["voi"] == "none (full stored range)"
    np.testing.assert_allclose(vol.array[..., 0], stored / 4095.0, atol=1e-6)


def test_invalid_value_holding_identifier_not_printed(tmp_path: Path, capsys, caplog):
    arr = _ct((8, 8, 3))
    for p in write_series(tmp_path, arr, seed=1, SliceThickness="999999", KVP="888888"):
        # invalid DS values quoting an identifier (pydicom's warnings quote the value)
        p.write_bytes(p.read_bytes().replace(b"999999", b"ZZTEST").replace(b"888888", b"ZZTEST"))
    try:
        vol = load_volume(tmp_path)
        text = json.dumps(dict(vol.meta), default=str) + repr(vol.issues)
    except MedfusionError as exc:
        text = str(exc)
    captured = capsys.readouterr()
    _assert_clean(text + captured.out + captured.err + caplog.text)


def test_mosaic_without_csa_header_refused(tmp_path: Path):
    from medfusion.errors import UnsupportedInputError

    write_series(tmp_path, _ct((16, 16, 1)), modality="MR", seed=1,
                 image_type=("ORIGINAL", "PRIMARY", "M", "MOSAIC"))
    with pytest.raises(UnsupportedInputError) as err:
        load_volume(tmp_path)
    assert "dcm2niix" in str(err.value)
