"""Pixel decoding: the pixel module check, stored values read straight from uncompressed
files or decoded by pydicom (compressed syntaxes via the installed plugins), and the
typed errors for truncated, corrupt or undecodable pixel data."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from medfusion.errors import (
    CorruptFileError,
    MedfusionError,
    TruncatedError,
    UnsupportedEncodingError,
    UnsupportedInputError,
)
from medfusion.io.dicom.guard import _TRUNC_FIX, _is_input_failure
from medfusion.io.dicom.headers import _FileHeader, _int, _sniff, _syntax_name

_INSTALL_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"


_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# Where pydicom's own choice among installed plugins is the slow one: left to itself it
# decodes JPEG-LS with libjpeg, while CharLS (pyjpegls, which highdicom needs anyway) reads
# and decodes a 512x512 frame 2.5-3x faster, also faster than SimpleITK
# (pipelines/bench_load.py --codec jpegls). Both are lossless, so the voxels are the same.
_PREFERRED_PLUGIN = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}


def _preferred_plugin(ts: str) -> str:
    """The decoding plugin to ask for, or "" for pydicom's own choice."""
    plugin = _PREFERRED_PLUGIN.get(ts, "")
    try:
        return plugin if plugin and plugin in get_decoder(ts).available_plugins else ""
    except (NotImplementedError, ValueError):
        return ""


_GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


def _check_pixel_module(h: _FileHeader, what: str) -> None:
    """Refuse a pixel description that cannot hold a grayscale image, before any decode.

    The same rules apply whatever the transfer syntax, so one object gets one outcome
    (pydicom unpacks some layouts, e.g. 1-bit, in some syntaxes and not others).
    """
    ds = h.ds
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    if rows < 1 or cols < 1:
        raise CorruptFileError(
            f"{what}: the header declares an empty image (Rows x Columns = {rows} x {cols}). "
            f"{_TRUNC_FIX}",
            code="INVALID_DIMENSIONS",
        )
    spp = _int(ds.get("SamplesPerPixel"), 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if (spp is not None and spp > 1) or photometric == "PALETTE COLOR":
        raise UnsupportedInputError(
            f"{what}: colour images (SamplesPerPixel = {spp}, a colour "
            "PhotometricInterpretation) are not supported; medfusion reads grayscale CT, MR "
            "and X-ray.",
        )
    if photometric and photometric not in _GRAYSCALE:
        # RGB/YBR with one sample, or a string that is no PhotometricInterpretation at all:
        # the header contradicts itself, so the meaning of the pixel values is unknown.
        raise CorruptFileError(
            f"{what}: PhotometricInterpretation is not a grayscale one (MONOCHROME1 or "
            "MONOCHROME2) although the image has one sample per pixel. The header is "
            "corrupt; re-export the image.",
            code="INVALID_PHOTOMETRIC",
        )
    bits = _int(ds.get("BitsAllocated"), 16)
    if bits not in (8, 16, 32):
        raise UnsupportedInputError(
            f"{what}: BitsAllocated = {bits} is not supported (bit-packed or unusual sample "
            "size); expected 8, 16 or 32. Convert the image to a standard grayscale encoding.",
        )
    stored = _int(ds.get("BitsStored"), bits)
    if stored is None or not 1 <= stored <= bits:
        raise CorruptFileError(
            f"{what}: BitsStored = {stored} does not fit BitsAllocated = {bits}; the pixel "
            "values cannot be interpreted. The header is corrupt; re-export the image.",
            code="INVALID_BITS",
        )
    representation = _int(ds.get("PixelRepresentation"), 0)
    if representation not in (0, 1):
        raise CorruptFileError(
            f"{what}: PixelRepresentation = {representation} is neither 0 (unsigned) nor 1 "
            "(signed). The header is corrupt; re-export the image.",
            code="INVALID_BITS",
        )


def _pixel_dtype(ds: Dataset) -> np.dtype:
    bits = _int(ds.get("BitsAllocated"), 16) or 16
    signed = (_int(ds.get("PixelRepresentation"), 0) or 0) == 1
    if bits == 8:
        return np.dtype("i1" if signed else "u1")
    if bits == 16:
        return np.dtype("<i2" if signed else "<u2")
    if bits == 32:
        return np.dtype("<i4" if signed else "<u4")
    raise UnsupportedInputError(
        f"BitsAllocated = {bits} is not supported; expected 8, 16 or 32. "
        "Convert the image to a standard grayscale encoding.",
    )


def _mask_bits(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Honour BitsStored < BitsAllocated: drop overlay bits, sign-extend signed data."""
    bits_alloc = arr.dtype.itemsize * 8
    bits_stored = _int(ds.get("BitsStored"), bits_alloc) or bits_alloc
    if bits_stored >= bits_alloc:
        return arr
    shift = bits_alloc - bits_stored
    if arr.dtype.kind == "i":
        return (arr << shift) >> shift
    return arr & np.array((1 << bits_stored) - 1, dtype=arr.dtype)


def _read_fast(h: _FileHeader, what: str) -> np.ndarray | None:
    """Uncompressed little-endian pixel data read straight from the file with
    ``np.frombuffer`` (no pydicom element objects). None when the fast path does not apply."""
    ds = h.ds
    if h.transfer_syntax not in _UNCOMPRESSED or h.pixel_offset is None:
        return None
    if (_int(ds.get("SamplesPerPixel"), 1) or 1) != 1:
        return None
    dtype = _pixel_dtype(ds)
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    expected = rows * cols * h.n_frames * dtype.itemsize
    implicit = h.transfer_syntax == ImplicitVRLittleEndian
    with open(h.path, "rb") as fp:
        fp.seek(h.pixel_offset)
        head = fp.read(8 if implicit else 12)
        if implicit:
            if len(head) < 8:
                raise TruncatedError(f"{what}: pixel data header is cut off. {_TRUNC_FIX}")
            length = int.from_bytes(head[4:8], "little")
        else:
            if len(head) < 12:
                raise TruncatedError(f"{what}: pixel data header is cut off. {_TRUNC_FIX}")
            if head[4:6] not in (b"OW", b"OB", b"UN"):
                return None
            length = int.from_bytes(head[8:12], "little")
        if length == 0xFFFFFFFF:
            return None  # encapsulated despite the syntax: let pydicom decide
        if length < expected:
            raise TruncatedError(
                f"{what}: pixel data holds {length} bytes, the header declares {expected}. "
                f"{_TRUNC_FIX}",
            )
        _check_excess_pixels(length, expected, what)
        buf = fp.read(expected)
    if len(buf) < expected:
        raise TruncatedError(
            f"{what}: file ends after {len(buf)} of {expected} pixel bytes. {_TRUNC_FIX}",
        )
    arr = np.frombuffer(buf, dtype=dtype).reshape(h.n_frames, rows, cols)
    return _mask_bits(arr, ds)


def _check_excess_pixels(length: int, expected: int, what: str) -> None:
    """Uncompressed pixel data longer than Rows x Columns x frames x bytes (plus the one
    padding byte to an even length) means those tags do not describe the data: reading
    only the declared bytes would return a cropped or sheared image."""
    if length > expected + (expected & 1):
        raise CorruptFileError(
            f"{what}: pixel data holds {length} bytes but Rows x Columns x NumberOfFrames x "
            f"BitsAllocated declare {expected}; the header does not describe the data. "
            "The header is corrupt; re-export the image.",
            code="PIXEL_LENGTH_MISMATCH",
        )


def _is_compressed_syntax(ts: str, what: str) -> bool:
    """Whether a transfer syntax encapsulates compressed frames; a UID that is no known
    transfer syntax (a private one, or a corrupted file meta header) is refused."""
    if ts in _UNCOMPRESSED:
        return False
    uid = UID(ts)
    if not uid.is_transfer_syntax or uid not in pydicom.uid.AllTransferSyntaxes:
        raise UnsupportedEncodingError(
            f"{what}: the file meta header declares a transfer syntax that is not a standard "
            "DICOM one (a private syntax or a corrupted header), so the pixel data cannot "
            "be decoded. Re-export the image with a standard transfer syntax.",
            code="UNKNOWN_TRANSFER_SYNTAX",
        )
    return bool(uid.is_compressed)


def _require_decoder(ts: str, what: str) -> None:
    """Refuse a compressed transfer syntax that no installed plugin can decode, before
    decoding: only then is the answer "install the decoders" (a decoder that is installed
    and fails on the data means corrupt pixel data, see :func:`_decode_failure`)."""
    try:
        available = get_decoder(ts).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        raise UnsupportedEncodingError(
            f"{what}: no decoder available for transfer syntax {_syntax_name(ts)}. "
            f"Install the decoders with: {_INSTALL_HINT}",
        )


def _decode_failure(
    exc: BaseException, what: str, ts: str, *, compressed: bool
) -> MedfusionError:
    """The typed error for pixel data that an available decoder could not decode."""
    text = str(exc).lower()
    if not compressed and any(k in text for k in ("length", "expected", "truncat", "end of")):
        return TruncatedError(
            f"{what}: pixel data is shorter than the header declares. {_TRUNC_FIX}",
        )
    if compressed:
        return CorruptFileError(
            f"{what}: the compressed frame(s) could not be decoded ({_syntax_name(ts)}, "
            f"{type(exc).__name__} in the installed decoder): the pixel data is corrupt or "
            f"does not match Rows/Columns/BitsAllocated. {_TRUNC_FIX}",
        )
    return CorruptFileError(
        f"{what}: pixel data cannot be decoded ({type(exc).__name__}); it does not match "
        f"Rows/Columns/BitsAllocated/SamplesPerPixel. {_TRUNC_FIX}",
    )


def _decode(ds: Dataset, plugin: str) -> np.ndarray:
    """``ds.pixel_array``, first with ``plugin`` when one is preferred. A stream the preferred
    decoder refuses goes to pydicom's own choice before anything is called corrupt: CharLS
    rejects JPEG-LS frames of some encoders (a NEMA WG04 MR) that libjpeg reads exactly."""
    if plugin:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except BaseException as exc:  # noqa: BLE001 - re-raised below unless an input failure
            if not _is_input_failure(exc):
                raise
            ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array


def _read_pydicom(h: _FileHeader, what: str, *, strict: bool) -> tuple[np.ndarray, bool]:
    """Full pydicom read and decode (compressed syntaxes via the pylibjpeg plugins).

    Returns (stored frames as (F, rows, cols), was_compressed). In ``strict`` mode a pydicom
    warning while reading (e.g. "End of file before delimiter") is an error.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(str(h.path), force=h.pixel_offset is not None and
                                 _sniff(h.path) == "raw")
        except BaseException as exc:  # any parse failure is a corrupt file
            if not _is_input_failure(exc):
                raise
            raise CorruptFileError(
                f"{what}: the file cannot be parsed ({type(exc).__name__}). {_TRUNC_FIX}",
            ) from None
        if "PixelData" not in ds:
            raise TruncatedError(f"{what}: pixel data is missing or cut off. {_TRUNC_FIX}")
        ts = h.transfer_syntax
        compressed = _is_compressed_syntax(ts, what)
        if compressed:
            _require_decoder(ts, what)
        try:
            arr = _decode(ds, _preferred_plugin(ts) if compressed else "")
        except BaseException as exc:
            if not _is_input_failure(exc):
                raise
            raise _decode_failure(exc, what, ts, compressed=compressed) from None
    pydicom_warnings = [w for w in caught if "pydicom" in (w.filename or "") or
                        "delimiter" in str(w.message).lower()]
    if any("delimiter" in str(w.message).lower() or "end of file" in str(w.message).lower()
           for w in pydicom_warnings):
        # pydicom only warns when the file ends inside the encapsulated pixel data: the
        # frames may be incomplete. Refuse under strict; otherwise the decode above worked.
        if strict:
            raise TruncatedError(
                f"{what}: the file ends before its pixel data delimiter. {_TRUNC_FIX}",
            )
    elif strict and pydicom_warnings:
        raise CorruptFileError(
            f"{what}: pydicom reported a malformed element while reading "
            f"({len(pydicom_warnings)} warning(s)). Fix the file or load without strict=True.",
        )
    if not compressed:
        bits = _int(ds.get("BitsAllocated"), 16) or 16
        expected = ((_int(ds.get("Rows"), 0) or 0) * (_int(ds.get("Columns"), 0) or 0)
                    * h.n_frames * (_int(ds.get("SamplesPerPixel"), 1) or 1) * bits + 7) // 8
        _check_excess_pixels(len(ds.PixelData), expected, what)
    arr = np.asarray(arr)
    spp = _int(ds.get("SamplesPerPixel"), 1) or 1
    if spp != 1:
        raise UnsupportedInputError(
            f"{what}: colour images (SamplesPerPixel = {spp}) are not supported; "
            "medfusion reads grayscale CT, MR and X-ray.",
        )
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    arr = arr.reshape(-1, rows, cols)
    if arr.shape[0] != h.n_frames:
        raise TruncatedError(
            f"{what}: decoded {arr.shape[0]} frame(s), the header declares {h.n_frames}. "
            f"{_TRUNC_FIX}",
        )
    return arr, compressed


def _read_stored(h: _FileHeader, what: str, *, strict: bool) -> tuple[np.ndarray, bool]:
    """Stored pixel values (F, rows, cols) of one file, plus whether it was compressed."""
    arr = _read_fast(h, what)
    if arr is not None:
        return arr, False
    return _read_pydicom(h, what, strict=strict)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _rescale_bound(max_stored: float, slope: float, intercept: float) -> float:
    """The largest magnitude ``stored * slope + intercept`` can reach (float64)."""
    return abs(slope) * max_stored + abs(intercept)


def _full_dataset(h: _FileHeader, what: str) -> Dataset:
    """The whole file (pixel data included) parsed by pydicom; CORRUPT when unparsable."""
    try:
        return pydicom.dcmread(str(h.path), force=_sniff(h.path) == "raw")
    except BaseException as exc:
        if not _is_input_failure(exc):
            raise
        raise CorruptFileError(
            f"{what}: the file cannot be parsed ({type(exc).__name__}). {_TRUNC_FIX}",
        ) from None


def _max_stored(ds: Any) -> float:
    """An upper bound on the magnitude of a stored value (from BitsAllocated)."""
    return 2.0 ** (_int(ds.get("BitsAllocated"), 16) or 16)
