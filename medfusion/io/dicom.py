"""DICOM ingestion: header-only discovery, series grouping and exact geometry.

Reader contract (what :func:`load_series` / :func:`load_dicom_file` return):

* ``Volume.array`` is float32, shape (I, J, K) or (I, J, K, T): I runs along a DICOM row
  (column index), J along a column (row index), K along the slice normal
  (``cross(row_dir, col_dir)``). Real units: stored values times RescaleSlope plus
  RescaleIntercept, applied per slice (CT in HU).
* ``Volume.affine`` maps (i, j, k, 1) to RAS+ mm: DICOM LPS
  ``[row_dir*col_spacing, col_dir*row_spacing, slice_step, IPP_first]`` with its first two
  rows negated.
* Slices are ordered by ImagePositionPatient projected on the normal, never by
  InstanceNumber or file name. The rules for duplicates, time points, gaps, uneven spacing
  and gantry tilt are in ``docs/dicom.md`` and in :func:`_assemble_stack`.
* Nothing identifying leaves this module: series and studies are named by pseudonymous
  keys, metadata is an allow-list, messages carry no paths or UIDs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medfusion.errors import (
    CorruptFileError,
    GeometryError,
    InvalidValuesError,
    LimitExceededError,
    MedfusionError,
    MissingSlicesError,
    NotDicomError,
    TruncatedError,
    UnsupportedEncodingError,
    UnsupportedInputError,
)
from medfusion.io.dicom_fast import read_fast_header, wanted_tags
from medfusion.io.keys import pseudonym
from medfusion.io.limits import check_declared_size
from medfusion.types import Finding, Volume

__all__ = [
    "DicomScan",
    "SeriesInfo",
    "load_dicom_file",
    "load_series",
    "scan_dicom",
]

#: Modalities that are projections (one image per file, K = 1), never stacked.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "MG", "RF", "XA", "PX", "IO", "RG", "DF"})

#: Acquisition tags copied into ``Volume.meta`` (an allow-list: nothing identifying,
#: nothing private, no free text).
META_ALLOW_LIST = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "SliceThickness",
    "SpacingBetweenSlices",
    "KVP",
    "ConvolutionKernel",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "PhotometricInterpretation",
    "BodyPartExamined",
    "ViewPosition",
    "PatientPosition",
    "ImageType",
    "RescaleType",
    "PresentationIntentType",
    "BitsStored",
)

# Identifiers read only to scrub them out of SeriesDescription; never output.
_IDENTIFIER_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "OtherPatientIDs",
)

_TIME_TAGS = (
    "TemporalPositionIdentifier",
    "AcquisitionNumber",
    "TriggerTime",
    "EchoTime",
    "EchoNumbers",
    "DiffusionBValue",
    "NumberOfTemporalPositions",
    "AcquisitionTime",
    "ContentTime",
)

_HEADER_TAGS = sorted(
    {
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "SeriesNumber",
        "SeriesDescription",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
        "ModalityLUTSequence",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DirectoryRecordSequence",
        "AcquisitionDateTime",
        "ContentDate",
        *META_ALLOW_LIST,
        *_IDENTIFIER_TAGS,
        *_TIME_TAGS,
    }
)

_INSTALL_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# ======================================================================================
# public types
# ======================================================================================
@dataclass(frozen=True)
class _FileHeader:
    """What the header pass learnt about one file (kept out of repr: it holds a path)."""

    path: Path
    ds: Any  # header-only pydicom Dataset, or a FastHeader (same get/in interface)
    transfer_syntax: str
    pixel_offset: int | None  # file offset of the PixelData element tag
    n_frames: int


@dataclass(frozen=True)
class SeriesInfo:
    """One loadable image set found by :func:`scan_dicom` (PHI-free except ``files``).

    A cross-sectional series is every single-frame file of one SeriesInstanceUID; an
    enhanced multi-frame file and a projection radiograph are one entry per file.
    """

    key: str
    study_key: str
    modality: str
    description: str
    n_instances: int
    n_frames: int
    files: tuple[Path, ...] = field(repr=False)
    image_type: tuple[str, ...]
    orientation: str
    is_enhanced: bool
    rows: int
    columns: int
    series_number: int | None = None
    _headers: tuple[_FileHeader, ...] = field(default=(), repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """PHI-free description (no files, paths or UIDs)."""
        return {
            "key": self.key,
            "study_key": self.study_key,
            "modality": self.modality,
            "description": self.description,
            "n_instances": self.n_instances,
            "n_frames": self.n_frames,
            "image_type": list(self.image_type),
            "orientation": self.orientation,
            "is_enhanced": self.is_enhanced,
            "rows": self.rows,
            "columns": self.columns,
        }


@dataclass
class DicomScan:
    """Result of :func:`scan_dicom`: the series found (stable order) and the files skipped
    with a short reason (``"not DICOM"``, ``"DICOMDIR"``, ``"no pixel data"`` ...)."""

    series: list[SeriesInfo] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


# ======================================================================================
# small helpers
# ======================================================================================
def _floats(value: Any, n: int | None = None) -> tuple[float, ...] | None:
    """A DICOM multi-value as floats; None when absent or unparsable."""
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            out = (float(value),)
        else:
            out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out


def _float(value: Any, default: float | None = None) -> float | None:
    v = _floats(value)
    if v is None or len(v) == 0:
        return default
    return v[0]


def _int(value: Any, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return default


def _json_value(value: Any) -> Any:
    """A pydicom value as a JSON-safe Python value."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        f = float(value)
        return int(f) if f.is_integer() and isinstance(value, int) else f
    return str(value)


def _identifier_strings(ds: Dataset) -> list[str]:
    out: list[str] = []
    for tag in _IDENTIFIER_TAGS:
        value = ds.get(tag)
        if value is None:
            continue
        text = str(value).strip()
        if len(text) >= 3:
            out.append(text)
        for part in text.replace("^", " ").split():
            if len(part) >= 3:
                out.append(part)
    return out


def _scrub(text: str, ds: Dataset) -> str:
    """Remove the header's own patient identifiers from a free-text label."""
    lowered = text
    for ident in sorted(_identifier_strings(ds), key=len, reverse=True):
        idx = lowered.lower().find(ident.lower())
        while idx >= 0:
            lowered = lowered[:idx] + "[removed]" + lowered[idx + len(ident) :]
            idx = lowered.lower().find(ident.lower())
    return lowered


def _syntax_name(uid: str) -> str:
    try:
        name = UID(uid).name
    except Exception:  # pragma: no cover - pydicom always names a UID string
        name = ""
    return f"{name} ({uid})" if name and name != uid else uid


def _orientation_label(iop: tuple[float, ...] | None) -> str:
    if iop is None:
        return "unknown"
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return "unknown"
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if normal[axis] < math.cos(math.radians(30)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


# ======================================================================================
# header pass
# ======================================================================================
def _sniff(path: Path) -> str:
    """``"dicom"`` (DICM marker), ``"raw"`` (a bare dataset without preamble: starts with a
    group 0x0002 or 0x0008 element), ``"empty"`` or ``"other"``. Never force-reads junk."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return "other"
    if not head:
        return "empty"
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 8:
        group = int.from_bytes(head[0:2], "little")
        element = int.from_bytes(head[2:4], "little")
        if group in (0x0002, 0x0008) and element < 0x0100:
            vr = head[4:6]
            if vr.isalpha() and vr.isupper():
                return "raw"
            length = int.from_bytes(head[4:8], "little")
            if length < 1024:
                return "raw"
    return "other"


_FAST_WANTED = wanted_tags(_HEADER_TAGS)
_FAST_REFUSE = {
    int(tag_for_keyword(k))
    for k in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
              "VOILUTSequence", "ModalityLUTSequence", "DirectoryRecordSequence")
}


def _read_header(path: Path) -> tuple[_FileHeader | None, str | None]:
    """Header-only parse of one file; ``(header, None)`` or ``(None, skip reason)``.

    The fast walker (:mod:`medfusion.io.dicom_fast`) handles plain little-endian Part 10
    files; everything else goes through pydicom with ``stop_before_pixels``.
    """
    kind = _sniff(path)
    if kind == "empty":
        return None, "empty file"
    if kind == "other":
        return None, "not DICOM"
    fast = read_fast_header(str(path), _FAST_WANTED, _FAST_REFUSE) if kind == "dicom" else None
    if fast is not None:
        ds: Any = fast[0]
        offset = fast[1]
        ts = fast[2]
        has_pixels = offset is not None
    else:
        try:
            with open(path, "rb") as fp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(
                    fp,
                    stop_before_pixels=True,
                    specific_tags=_HEADER_TAGS,
                    force=(kind == "raw"),
                )
                offset = fp.tell()
                tail = fp.read(8)
                # pydicom converts values lazily: convert every element now, so that a
                # corrupt VR or value makes the header unreadable here (a skip with its
                # reason) instead of failing later inside a loader
                for _elem in ds.iterall():
                    pass
        except BaseException as exc:  # pydicom raises many types on junk; all mean skip
            if not _is_input_failure(exc):
                raise
            return None, "unreadable DICOM header"
        has_pixels = len(tail) >= 4 and tail[:4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
        fm = getattr(ds, "file_meta", None)
        ts = str(fm.get("TransferSyntaxUID", "")) if fm is not None else ""
        if not ts:  # a bare dataset: take the encoding pydicom detected
            implicit, little = getattr(ds, "original_encoding", (True, True))
            ts = str(ImplicitVRLittleEndian if implicit else
                     ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if ts == DeflatedExplicitVRLittleEndian:
            has_pixels = True  # the file position says nothing inside a deflated stream
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
        return None, "DICOMDIR"
    if not has_pixels or ds.get("Rows") is None or ds.get("Columns") is None:
        return None, "no pixel data"
    n_frames = _int(ds.get("NumberOfFrames"), 1) or 1
    return _FileHeader(path=path, ds=ds, transfer_syntax=ts, pixel_offset=offset,
                       n_frames=max(1, n_frames)), None


def _check_header_size(h: _FileHeader, what: str) -> None:
    ds = h.ds
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    spp = _int(ds.get("SamplesPerPixel"), 1) or 1
    bits = _int(ds.get("BitsAllocated"), 16) or 16
    check_declared_size((cols, rows, h.n_frames * spp), max(bits, 8) / 8.0, what)


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


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def _first_fg(ds: Dataset, seq_name: str, frame: int | None = 0) -> Dataset | None:
    """The functional-group item ``seq_name`` for a frame (per-frame first, then shared)."""
    if frame is not None:
        pf = ds.get("PerFrameFunctionalGroupsSequence")
        if pf is not None and frame < len(pf):
            seq = pf[frame].get(seq_name)
            if seq:
                return seq[0]
    sh = ds.get("SharedFunctionalGroupsSequence")
    if sh:
        seq = sh[0].get(seq_name)
        if seq:
            return seq[0]
    return None


def _header_iop(ds: Dataset) -> tuple[float, ...] | None:
    if _is_enhanced(ds):
        item = _first_fg(ds, "PlaneOrientationSequence")
        return _floats(item.get("ImageOrientationPatient"), 6) if item is not None else None
    return _floats(ds.get("ImageOrientationPatient"), 6)


def _is_decoder_panic(exc: BaseException) -> bool:
    """A panic inside a Rust extension (pylibjpeg-rle and other pyo3 decoders raise
    ``pyo3_runtime.PanicException``, which derives from BaseException, not Exception)."""
    kind = type(exc)
    return kind.__name__ == "PanicException" or kind.__module__ == "pyo3_runtime"


def _is_input_failure(exc: BaseException) -> bool:
    """Whether a failure inside a parser or decoder is the input's fault: any Exception or
    a decoder panic. KeyboardInterrupt, SystemExit, GeneratorExit and other control-flow
    BaseExceptions are never swallowed."""
    return isinstance(exc, Exception) or _is_decoder_panic(exc)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a public loader quietly and keep its contract on bad input.

    pydicom warns and logs about malformed values, sometimes quoting them (a patient name
    included), so its warnings and its logger are silenced for the call. Any exception that
    is not a :class:`MedfusionError` (a decoder panic included) becomes
    ``CorruptFileError`` with code ``MALFORMED_DICOM`` (no other type escapes a loader on
    bad input); the message names the exception type, never a value or path.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logger = logging.getLogger("pydicom")
        was_disabled = logger.disabled
        logger.disabled = True
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except MedfusionError:
            raise
        except MemoryError:
            raise LimitExceededError(
                "not enough memory to load the image; free memory or lower the input size.",
            ) from None
        except BaseException as exc:
            if not _is_input_failure(exc):
                raise
            raise CorruptFileError(
                f"malformed DICOM input ({type(exc).__name__}): a header value or the pixel "
                "data is inconsistent in a way medfusion has no specific check for. Check "
                "the files with a DICOM validator (e.g. dciodvfy) or re-export them.",
                code="MALFORMED_DICOM",
            ) from None
        finally:
            logger.disabled = was_disabled

    return wrapper


@_guarded
def scan_dicom(paths: Iterable[str | Path]) -> DicomScan:
    """Header-only pass over files: group them into series, skip what is not an image.

    ``paths`` are files (use :func:`iter_files` to walk a folder). Nothing is decoded; only
    the tags medfusion needs are parsed. Each file's declared size is checked against the
    limits here (a header declaring gigabytes raises ``LimitExceededError`` at once).
    Series come back in a stable order (series number, then description, then key).
    """
    skipped: list[tuple[Path, str]] = []
    headers: list[_FileHeader] = []
    for n, p in enumerate(sorted((Path(p) for p in paths), key=lambda q: str(q))):
        header, reason = _read_header(p)
        if header is None:
            skipped.append((p, reason or "skipped"))
            continue
        _check_header_size(header, f"DICOM file #{n + 1}")
        headers.append(header)

    groups: dict[str, list[_FileHeader]] = {}
    per_file: list[tuple[str, _FileHeader]] = []
    for h in headers:
        ds = h.ds
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            series_uid = "no-series-uid:" + str(h.path.parent)
        modality = str(ds.get("Modality", "") or "").upper()
        if _is_enhanced(ds) or modality in PROJECTION_MODALITIES:
            per_file.append((series_uid, h))
        else:
            groups.setdefault(series_uid, []).append(h)

    infos: list[SeriesInfo] = []
    for series_uid, hs in groups.items():
        infos.append(_make_info(series_uid, hs, key_source=series_uid))
    by_uid: dict[str, list[_FileHeader]] = {}
    for series_uid, h in per_file:
        by_uid.setdefault(series_uid, []).append(h)
    for series_uid, hs in by_uid.items():
        if len(hs) > 1 and all(_is_enhanced(h.ds) for h in hs) and \
                _enhanced_time_series(hs) is not None:
            # time points of one acquisition written as one enhanced file each: one 4D entry
            source = series_uid if series_uid not in groups else series_uid + "/enhanced"
            infos.append(_make_info(series_uid, hs, key_source=source))
            continue
        for h in hs:
            source = series_uid
            if len(hs) > 1 or series_uid in groups:
                source = series_uid + "/" + str(h.ds.get("SOPInstanceUID", h.path.name))
            infos.append(_make_info(series_uid, [h], key_source=source))

    infos.sort(
        key=lambda s: (
            s.series_number if s.series_number is not None else 10**9,
            s.description,
            s.key,
        )
    )
    return DicomScan(series=infos, skipped=skipped)


def _make_info(series_uid: str, hs: list[_FileHeader], *, key_source: str) -> SeriesInfo:
    ds0 = hs[0].ds
    modality = str(ds0.get("Modality", "") or "unknown").upper() or "unknown"
    study_uid = str(ds0.get("StudyInstanceUID", "") or "no-study-uid")
    enhanced = _is_enhanced(ds0)
    if modality in PROJECTION_MODALITIES and not enhanced:
        orientation = "projection"
    else:
        orientation = _orientation_label(_header_iop(ds0))
    image_type = ds0.get("ImageType")
    image_type_t = tuple(str(v) for v in image_type) if image_type is not None else ()
    if isinstance(image_type, str):
        image_type_t = (image_type,)
    description = _scrub(str(ds0.get("SeriesDescription", "") or ""), ds0)
    return SeriesInfo(
        key=pseudonym(key_source, prefix="se-"),
        study_key=pseudonym(study_uid, prefix="st-"),
        modality=modality,
        description=description,
        n_instances=len(hs),
        n_frames=sum(h.n_frames for h in hs),
        files=tuple(h.path for h in hs),
        image_type=image_type_t,
        orientation=orientation,
        is_enhanced=enhanced,
        rows=_int(ds0.get("Rows"), 0) or 0,
        columns=_int(ds0.get("Columns"), 0) or 0,
        series_number=_int(ds0.get("SeriesNumber")),
        _headers=tuple(hs),
    )


def iter_files(folder: str | Path) -> list[Path]:
    """Every regular file under ``folder`` (any nesting), symlinks not followed, sorted."""
    out: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return out


# ======================================================================================
# pixel reading
# ======================================================================================
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


_TRUNC_FIX = "The file is truncated or corrupt: copy it again from the source (PACS export)."


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
    from pydicom.pixels import get_decoder

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
            arr = ds.pixel_array
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


# ======================================================================================
# geometry assembly
# ======================================================================================
@dataclass
class _Slice:
    """One 2D image (a single-frame file or one frame of a multi-frame file)."""

    file_index: int
    frame: int
    ipp: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rows: int
    cols: int
    slope: float
    intercept: float
    thickness: float | None
    instance_number: int | None
    time_keys: dict[str, Any]
    n_temporal: int | None = None


_POS_TOL_MM = 0.01  # two slices closer than this along the normal share a position
_SPACING_REL_TOL = 0.01  # |gap - median| / median under this is float jitter (B3)
# ... or under this many mm: positions written with 2 decimals jitter gaps by up to 0.01 mm
_SPACING_ABS_TOL_MM = 0.015
_TILT_MIN_DEG = 0.1


def _slices_from_header(h: _FileHeader, file_index: int) -> list[_Slice]:
    ds = h.ds
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    slope = _float(ds.get("RescaleSlope"), 1.0)
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    keys: dict[str, Any] = {}
    for tag in ("TemporalPositionIdentifier", "AcquisitionNumber", "TriggerTime", "EchoTime",
                "EchoNumbers", "DiffusionBValue"):
        value = ds.get(tag)
        if value is not None and value != "":
            keys[tag] = _json_value(value)
    for tag in ("AcquisitionTime", "ContentTime"):
        value = ds.get(tag)
        if value:
            keys["_" + tag] = str(value)
    return [
        _Slice(
            file_index=file_index,
            frame=f,
            ipp=_floats(ds.get("ImagePositionPatient"), 3),
            iop=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
            rows=rows,
            cols=cols,
            slope=1.0 if slope is None else slope,
            intercept=0.0 if intercept is None else intercept,
            thickness=_float(ds.get("SliceThickness")),
            instance_number=_int(ds.get("InstanceNumber")),
            time_keys=keys,
            n_temporal=_int(ds.get("NumberOfTemporalPositions")),
        )
        for f in range(h.n_frames)
    ]


def _slices_from_enhanced(ds: Dataset, what: str) -> list[_Slice]:
    n_frames = _int(ds.get("NumberOfFrames"), 1) or 1
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    pf = ds.get("PerFrameFunctionalGroupsSequence")
    if pf is None or len(pf) != n_frames:
        raise CorruptFileError(
            f"{what}: enhanced multi-frame file lists {0 if pf is None else len(pf)} per-frame "
            f"groups for {n_frames} frames. Re-export the series.",
        )
    top_slope = _float(ds.get("RescaleSlope"), 1.0)
    top_inter = _float(ds.get("RescaleIntercept"), 0.0)
    out = []
    for f in range(n_frames):
        pos = _first_fg(ds, "PlanePositionSequence", f)
        ori = _first_fg(ds, "PlaneOrientationSequence", f)
        meas = _first_fg(ds, "PixelMeasuresSequence", f)
        pvt = _first_fg(ds, "PixelValueTransformationSequence", f)
        content = _first_fg(ds, "FrameContentSequence", f)
        ftype = _first_fg(ds, "MRImageFrameTypeSequence", f) or _first_fg(
            ds, "CTImageFrameTypeSequence", f
        )
        echo = _first_fg(ds, "MREchoSequence", f)
        cardiac = _first_fg(ds, "CardiacSynchronizationSequence", f)
        keys: dict[str, Any] = {}
        if content is not None:
            for tag in ("TemporalPositionIndex", "StackID"):
                value = content.get(tag)
                if value is not None and value != "":
                    keys[tag] = _json_value(value)
        if ftype is not None and ftype.get("FrameType") is not None:
            keys["FrameType"] = "\\".join(str(v) for v in ftype.get("FrameType"))
        if echo is not None and echo.get("EffectiveEchoTime") is not None:
            keys["EffectiveEchoTime"] = _float(echo.get("EffectiveEchoTime"))
        if cardiac is not None and cardiac.get("NominalCardiacTriggerDelayTime") is not None:
            keys["NominalCardiacTriggerDelayTime"] = _float(
                cardiac.get("NominalCardiacTriggerDelayTime")
            )
        slope = _float(pvt.get("RescaleSlope"), None) if pvt is not None else None
        inter = _float(pvt.get("RescaleIntercept"), None) if pvt is not None else None
        out.append(
            _Slice(
                file_index=0,
                frame=f,
                ipp=_floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None,
                iop=_floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None,
                pixel_spacing=(
                    _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
                ),
                rows=rows,
                cols=cols,
                slope=slope if slope is not None else (top_slope or 1.0),
                intercept=inter if inter is not None else (top_inter or 0.0),
                thickness=_float(meas.get("SliceThickness")) if meas is not None else None,
                instance_number=f + 1,
                time_keys=keys,
            )
        )
    return out


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _rescale_bound(max_stored: float, slope: float, intercept: float) -> float:
    """The largest magnitude ``stored * slope + intercept`` can reach (float64)."""
    return abs(slope) * max_stored + abs(intercept)


def _finite_rescale(slices: Sequence[_Slice], what: str, max_stored: float) -> None:
    """Refuse a rescale that makes voxels invalid: NaN/inf, a zero slope (every voxel the
    intercept), or values past float32's range (finite in float64, inf once converted).
    ``max_stored`` bounds the magnitude of a stored value (2 ** BitsAllocated)."""
    for s in slices:
        if not (math.isfinite(s.slope) and math.isfinite(s.intercept)):
            raise InvalidValuesError(
                f"{what}: RescaleSlope/RescaleIntercept is NaN or infinite, so every voxel "
                "would be invalid. Fix the header or exclude the series.",
            )
        if s.slope == 0.0:
            raise InvalidValuesError(
                f"{what}: RescaleSlope is 0, so every voxel would equal the intercept. Fix "
                "the header or exclude the series.",
            )
        if _rescale_bound(max_stored, s.slope, s.intercept) > _FLOAT32_MAX / 2:
            raise InvalidValuesError(
                f"{what}: RescaleSlope/RescaleIntercept scale stored values beyond the float32 "
                "range (voxels would be infinite). Fix the header or exclude the series.",
            )


def _separate_time(
    groups: list[list[int]], slices: Sequence[_Slice], what: str
) -> tuple[list[list[int]], str]:
    """Order the members of each position group into time points.

    Returns the groups re-ordered (member t = time point t) and the rule used. The
    separating attribute must take the same set of values at every position and distinct
    values within a position; otherwise, when NumberOfTemporalPositions equals the count,
    members are ranked by acquisition time then InstanceNumber within each position.
    """
    count = len(groups[0])
    candidates = ("TemporalPositionIdentifier", "TemporalPositionIndex", "AcquisitionNumber",
                  "TriggerTime", "NominalCardiacTriggerDelayTime", "EchoNumbers", "EchoTime",
                  "EffectiveEchoTime", "DiffusionBValue", "StackID", "FrameType")

    def sort_value(v: Any) -> tuple[int, Any]:
        try:
            return (0, float(v))
        except (TypeError, ValueError):
            return (1, str(v))

    for tag in candidates:
        values = [[slices[i].time_keys.get(tag) for i in g] for g in groups]
        if any(v is None for vs in values for v in vs):
            continue
        reference = sorted({sort_value(v) for v in values[0]})
        if len(reference) != count:
            continue
        if all(sorted(sort_value(v) for v in vs) == reference for vs in values):
            ordered = [
                [i for _, i in sorted(zip([sort_value(v) for v in vs], g, strict=True))]
                for vs, g in zip(values, groups, strict=True)
            ]
            return ordered, tag
    n_temporal = {slices[i].n_temporal for g in groups for i in g}
    if n_temporal == {count}:
        for tag in ("_AcquisitionTime", "_ContentTime", "InstanceNumber"):
            if tag == "InstanceNumber":
                values = [[slices[i].instance_number for i in g] for g in groups]
            else:
                values = [[slices[i].time_keys.get(tag) for i in g] for g in groups]
            if any(v is None for vs in values for v in vs):
                continue
            if all(len(set(vs)) == count for vs in values):
                ordered = [
                    [i for _, i in sorted(zip([sort_value(v) for v in vs], g, strict=True))]
                    for vs, g in zip(values, groups, strict=True)
                ]
                return ordered, tag.lstrip("_") + " rank (NumberOfTemporalPositions)"
    raise GeometryError(
        f"{what}: {count} different images share each slice position and no attribute "
        "(TemporalPositionIdentifier, AcquisitionNumber, TriggerTime, EchoTime, ...) separates "
        "them into time points or phases. Split the series (e.g. by phase) before loading.",
        code="DUPLICATE_POSITIONS",
    )


def _equalized_positions(d: np.ndarray) -> tuple[np.ndarray, float]:
    """dcm2niix's equalisation: the smallest gap, at most twice as many slices as input."""
    gaps = np.diff(d)
    step = float(gaps[gaps > 0].min())
    n = int(math.ceil((d[-1] - d[0] - 0.5 * (d[-1] - d[-2])) / step)) + 1
    n = max(n, 2)
    if n > 2 * len(d):
        n = 2 * len(d)
    step = float(d[-1] - d[0]) / (n - 1)
    return d[0] + step * np.arange(n), step


def _resample_stack(
    planes: np.ndarray,
    offsets_px: np.ndarray,
    d: np.ndarray,
    targets: np.ndarray,
    fill: float,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resample a stack of parallel planes onto an orthogonal grid, linearly, in world space.

    ``planes`` (K, rows, cols): the source slices; ``offsets_px`` (K, 2): in-plane offset of
    each slice origin relative to slice 0, in (row, col) pixels; ``d`` (K,): slice
    distances along the normal (ascending); ``targets``: output distances along the normal.
    The output grid's in-plane lattice is slice 0's, extended to cover every slice (as
    dcm2niix's tilt correction does). Returns (out (S, rows', cols'), (row0, col0)) where
    (row0, col0) is the output origin in slice-0 pixel units.
    """
    k, rows, cols = planes.shape
    r_lo, c_lo, out_rows, out_cols = _resample_grid(offsets_px, rows, cols)
    cache: dict[int, np.ndarray] = {}

    def placed(idx: int) -> np.ndarray:
        if idx in cache:
            return cache[idx]
        canvas = np.full((out_rows, out_cols), fill, dtype=np.float32)
        orow = offsets_px[idx, 0] - r_lo
        ocol = offsets_px[idx, 1] - c_lo
        irow, icol = int(math.floor(orow + 1e-6)), int(math.floor(ocol + 1e-6))
        canvas[irow : irow + rows, icol : icol + cols] = planes[idx]
        frac = (orow - irow, ocol - icol)
        canvas = _shift_linear(canvas, frac[0], frac[1])
        for old in [c for c in cache if c < idx - 1]:
            del cache[old]
        cache[idx] = canvas
        return canvas

    out = np.empty((len(targets), out_rows, out_cols), dtype=np.float32)
    for s, t in enumerate(targets):
        hi = int(np.searchsorted(d, t - 1e-6))
        if hi <= 0:
            out[s] = placed(0)
            continue
        if hi >= k:
            out[s] = placed(k - 1)
            continue
        lo = hi - 1
        span = float(d[hi] - d[lo])
        w = 0.0 if span <= 0 else float(t - d[lo]) / span
        if w <= 1e-6:
            out[s] = placed(lo)
        elif w >= 1 - 1e-6:
            out[s] = placed(hi)
        else:
            np.multiply(placed(lo), np.float32(1.0 - w), out=out[s])
            out[s] += np.float32(w) * placed(hi)
    return out, (r_lo, c_lo)


def _shift_linear(a: np.ndarray, fr: float, fc: float) -> np.ndarray:
    """``out[x] = a[x - f]`` for sub-pixel shifts 0 <= f < 1 along rows and columns, by
    linear interpolation (edges repeat). Equivalent to ``scipy.ndimage.shift(order=1,
    mode="nearest")`` for these shifts, without importing scipy on the load path."""
    if fr > 1e-6:
        prev = np.empty_like(a)
        prev[1:] = a[:-1]
        prev[0] = a[0]
        a = a * np.float32(1.0 - fr) + prev * np.float32(fr)
    if fc > 1e-6:
        prev = np.empty_like(a)
        prev[:, 1:] = a[:, :-1]
        prev[:, 0] = a[:, 0]
        a = a * np.float32(1.0 - fc) + prev * np.float32(fc)
    return a


def _lps_to_ras(m: np.ndarray) -> np.ndarray:
    out = np.array(m, dtype=np.float64, copy=True)
    out[:2, :] *= -1.0
    return out


#: Largest plausible extent of an image along any axis, and largest plausible distance
#: of a position from the scanner origin. Human anatomy and scanner bores are under
#: 2 m; beyond these the header is corrupt (and float precision and memory suffer).
_MAX_EXTENT_MM = 10_000.0
_MAX_POSITION_MM = 100_000.0
#: Smallest plausible pixel spacing (1 micrometre: below any CT, MR or X-ray detector).
_MIN_SPACING_MM = 1e-3
#: Direction cosines written with few decimals are unit length to well within this.
_IOP_UNIT_TOL = 0.01


def _check_pixel_spacing(spacings: np.ndarray, what: str) -> None:
    """Refuse PixelSpacing that would give a mirrored, singular or non-finite affine."""
    if not np.all(np.isfinite(spacings)):
        raise GeometryError(
            f"{what}: PixelSpacing holds NaN or infinite values. The header is corrupt; "
            "re-export the series.",
            code="INVALID_PIXEL_SPACING",
        )
    if np.any(spacings <= 0):
        raise GeometryError(
            f"{what}: PixelSpacing is zero or negative (a negative spacing would mirror the "
            "image, a zero one collapses it). The header is corrupt; re-export the series.",
            code="INVALID_PIXEL_SPACING",
        )
    if np.any(spacings < _MIN_SPACING_MM):
        raise GeometryError(
            f"{what}: PixelSpacing of {float(spacings.min()):.3g} mm is below "
            f"{_MIN_SPACING_MM} mm, not a physical pixel size. The header is corrupt; "
            "re-export the series.",
            code="INVALID_PIXEL_SPACING",
        )


def _check_positions(
    ipps: np.ndarray, normal: np.ndarray, plane_mm: tuple[float, float], what: str
) -> None:
    """Refuse slice positions and image extents that no scanner produces (a corrupt
    ImagePositionPatient or PixelSpacing would otherwise give a huge or non-finite grid)."""
    if not np.all(np.isfinite(ipps)):
        raise GeometryError(
            f"{what}: ImagePositionPatient holds NaN or infinite values. The header is "
            "corrupt; re-export the series.",
            code="INVALID_POSITION",
        )
    if float(np.abs(ipps).max()) > _MAX_POSITION_MM:
        raise GeometryError(
            f"{what}: ImagePositionPatient lies {float(np.abs(ipps).max()):.3g} mm from the "
            f"scanner origin (over {_MAX_POSITION_MM / 1000:.0f} m), not a physical position. "
            "The header is corrupt; re-export the series.",
            code="IMPLAUSIBLE_GEOMETRY",
        )
    span = float(np.linalg.norm(ipps.max(axis=0) - ipps.min(axis=0)))
    extent = max(span, *plane_mm)
    if extent > _MAX_EXTENT_MM:
        raise GeometryError(
            f"{what}: the image would extend {extent / 1000:.3g} m (slice positions or "
            f"Rows/Columns x PixelSpacing), over the plausible {_MAX_EXTENT_MM / 1000:.0f} m. "
            "The header is corrupt; re-export the series.",
            code="IMPLAUSIBLE_GEOMETRY",
        )


def _resample_grid(offsets_px: np.ndarray, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(row0, col0, rows, cols) of :func:`_resample_stack`'s output grid for these slice
    offsets: slice 0's lattice extended to cover every shifted slice."""
    r_lo = int(math.floor(min(0.0, float(offsets_px[:, 0].min())) + 1e-6))
    c_lo = int(math.floor(min(0.0, float(offsets_px[:, 1].min())) + 1e-6))
    r_hi = int(math.ceil(max(0.0, float(offsets_px[:, 0].max())) - 1e-6)) + rows
    c_hi = int(math.ceil(max(0.0, float(offsets_px[:, 1].max())) - 1e-6)) + cols
    return r_lo, c_lo, r_hi - r_lo, c_hi - c_lo


def _assemble_stack(
    slices: list[_Slice],
    read_plane: Callable[[list[int], np.ndarray], list[bool]],
    *,
    strict: bool,
    what: str,
    modality: str,
    max_stored: float = 2.0**32,
) -> tuple[np.ndarray, np.ndarray, list[Finding], dict[str, Any]]:
    """Order slices in space, deduplicate, split time points, check spacing and tilt.

    ``read_plane(indices, out)`` fills ``out[n]`` with the rescaled float32 plane of slice
    ``indices[n]`` (shape (rows, cols)) and returns, per plane, whether it decoded to all
    zeros from a compressed stream. Returns (array (I,J,K[,T]), affine RAS, findings, meta).
    """
    findings: list[Finding] = []
    extra: dict[str, Any] = {}
    if not slices:
        raise CorruptFileError(f"{what}: no image slices. Check the input.")
    if any(s.ipp is None or s.iop is None for s in slices):
        raise GeometryError(
            f"{what}: ImagePositionPatient or ImageOrientationPatient is missing, so the "
            "slice positions and orientation are unknown (medfusion never invents an identity "
            "geometry). Re-export the series with its geometry tags.",
            code="MISSING_GEOMETRY",
        )
    if any(s.pixel_spacing is None for s in slices):
        raise GeometryError(
            f"{what}: PixelSpacing is missing; voxel sizes are unknown. Re-export the series "
            "with its geometry tags.",
            code="MISSING_GEOMETRY",
        )
    s0 = slices[0]
    sizes = {(s.rows, s.cols) for s in slices}
    if len(sizes) > 1:
        raise GeometryError(
            f"{what}: slices differ in size ({sorted(sizes)}). A series must have one matrix "
            "size; split it or pick the images you need.",
            code="INCONSISTENT_GEOMETRY",
        )
    spacings = np.asarray([s.pixel_spacing for s in slices], dtype=np.float64)
    _check_pixel_spacing(spacings, what)
    if not np.allclose(spacings, spacings[0], rtol=1e-3, atol=1e-4):
        raise GeometryError(
            f"{what}: pixel spacing differs between slices. A series must have one pixel "
            "spacing; split it before loading.",
            code="INCONSISTENT_GEOMETRY",
        )
    iops = np.asarray([s.iop for s in slices], dtype=np.float64)
    if not np.all(np.isfinite(iops)):
        raise GeometryError(
            f"{what}: ImageOrientationPatient holds NaN or infinite values. The header is "
            "corrupt; re-export the series.",
            code="INVALID_ORIENTATION",
        )
    if not np.allclose(iops, iops[0], atol=1e-3):
        raise GeometryError(
            f"{what}: image orientation differs between slices (e.g. a localizer with "
            "several planes). Load each orientation as its own series.",
            code="INCONSISTENT_GEOMETRY",
        )
    row = np.asarray(s0.iop[:3], dtype=np.float64)
    col = np.asarray(s0.iop[3:], dtype=np.float64)
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise GeometryError(
            f"{what}: ImageOrientationPatient is degenerate.", code="MISSING_GEOMETRY"
        )
    norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if any(abs(n - 1.0) > _IOP_UNIT_TOL for n in norms):
        # Direction cosines are unit vectors by definition; far from unit length the
        # values are not cosines at all, and normalising them would invent a geometry.
        raise GeometryError(
            f"{what}: ImageOrientationPatient row/column vectors have lengths "
            f"{norms[0]:.3g} and {norms[1]:.3g}, not 1 (they must be direction cosines). "
            "The header is corrupt; re-export the series.",
            code="INVALID_ORIENTATION",
        )
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    if abs(float(row @ col)) > 1e-3:
        raise GeometryError(
            f"{what}: ImageOrientationPatient row and column directions are not "
            "perpendicular. The header is corrupt; re-export the series.",
            code="INVALID_ORIENTATION",
        )
    normal = np.cross(row, col)
    row_spacing, col_spacing = float(s0.pixel_spacing[0]), float(s0.pixel_spacing[1])
    _finite_rescale(slices, what, max_stored)

    ipps = np.asarray([s.ipp for s in slices], dtype=np.float64)
    _check_positions(ipps, normal, (s0.rows * row_spacing, s0.cols * col_spacing), what)
    dist = ipps @ normal
    order = sorted(
        range(len(slices)),
        key=lambda i: (round(float(dist[i]) / _POS_TOL_MM), slices[i].instance_number or 0,
                       slices[i].file_index, slices[i].frame),
    )
    # group by position along the normal
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(dist[i] - dist[groups[-1][0]]) <= _POS_TOL_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in groups:
        if len(g) > 1:
            spread = ipps[g] - ipps[g[0]]
            if np.abs(spread).max() > 0.05 * min(row_spacing, col_spacing) + _POS_TOL_MM:
                raise GeometryError(
                    f"{what}: slices at the same depth lie at different in-plane positions "
                    "(two stacks in one series). Split the series before loading.",
                    code="INCONSISTENT_GEOMETRY",
                )

    # geometry checks on unique positions, before any pixel is read (strict refuses fast)
    k_count = len(groups)
    first = [g[0] for g in groups]
    d = dist[first]
    kipp = ipps[first]
    thickness = s0.thickness
    tilt_deg = 0.0
    missing_mm: list[float] = []
    irregular = False
    if k_count >= 2:
        span = kipp[-1] - kipp[0]
        along = float(span @ normal)
        inplane = span - along * normal
        drift = float(np.linalg.norm(inplane))
        tilt_deg = math.degrees(math.atan2(drift, abs(along))) if along != 0 else 90.0
        if tilt_deg < _TILT_MIN_DEG or drift < 0.05 * min(row_spacing, col_spacing):
            tilt_deg = 0.0
        gaps = np.diff(d)
        med = float(np.median(gaps))
        tol = max(_SPACING_REL_TOL * med, _SPACING_ABS_TOL_MM)
        if np.any(np.abs(gaps - med) > tol):
            irregular = True
            # A gap in a regular series: every gap is a whole multiple of the smallest one,
            # and most gaps are that smallest one (else it is a deliberate spacing change).
            base = float(gaps.min())
            ratios = gaps / base
            near_int = np.abs(ratios - np.round(ratios)) <= 0.1
            at_base = np.abs(gaps - base) <= max(_SPACING_REL_TOL * base, _SPACING_ABS_TOL_MM)
            if np.all(near_int) and at_base.sum() >= (~at_base).sum():
                for n, r in enumerate(np.round(ratios).astype(int)):
                    for m in range(1, r):
                        missing_mm.append(round(float(d[n] + m * base), 3))
    if missing_mm:
        detail = {"positions_mm": missing_mm, "count": len(missing_mm),
                  "regular_spacing_mm": round(float(np.diff(d).min()), 4)}
        if strict:
            raise MissingSlicesError(
                f"{what}: {len(missing_mm)} slice(s) missing at {missing_mm} mm along the "
                "slice normal. Re-export the complete series, or load without strict=True "
                "to interpolate the gap.",
            )
        findings.append(
            Finding(
                "MISSING_SLICES",
                f"{len(missing_mm)} slice(s) missing at {missing_mm} mm along the slice "
                "normal; the gap was filled by linear interpolation.",
                detail,
            )
        )
    if irregular and strict:
        raise GeometryError(
            f"{what}: slice spacing is uneven ({float(np.diff(d).min()):.3f} to "
            f"{float(np.diff(d).max()):.3f} mm). Load without strict=True to resample onto "
            "a regular grid.",
            code="UNEVEN_SPACING",
        )
    if tilt_deg and strict:
        raise GeometryError(
            f"{what}: gantry tilt of {tilt_deg:.2f} degrees (slices are sheared). Load without "
            "strict=True to resample onto an orthogonal grid.",
            code="GANTRY_TILT",
        )

    rows, cols = s0.rows, s0.cols
    resample_grid: tuple[np.ndarray, float, np.ndarray] | None = None
    if irregular or tilt_deg:
        # The output grid grows with the slices' in-plane drift and the number of target
        # positions: size it from the header values and check it against the limits
        # before any pixel is read (again below, once the number of time points is known).
        targets, step = _equalized_positions(d)
        offsets = np.stack(
            [((kipp - kipp[0]) @ col) / row_spacing, ((kipp - kipp[0]) @ row) / col_spacing],
            axis=1,
        )
        resample_grid = (targets, step, offsets)
        _, _, grid_rows, grid_cols = _resample_grid(offsets, rows, cols)
        check_declared_size((grid_cols, grid_rows, len(targets)), 4,
                            f"{what} (resampled onto a regular grid)")
    n_all = len(order)
    check_declared_size((cols, rows, n_all), 4, what)
    buf = np.empty((n_all, rows, cols), dtype=np.float32)
    zero = read_plane(order, buf)
    pos_of = {idx: n for n, idx in enumerate(order)}
    zero_frames = [n for n, z in enumerate(zero) if z]
    if zero_frames:
        findings.append(
            Finding(
                "ZERO_FRAME",
                f"{len(zero_frames)} compressed frame(s) decoded to all zeros; check the "
                "decoder or the source images.",
                {"count": len(zero_frames)},
            )
        )

    # identical duplicates: keep the first of each identical set
    removed = 0
    dedup_groups: list[list[int]] = []
    for g in groups:
        kept: list[int] = []
        for i in g:
            if any(np.array_equal(buf[pos_of[i]], buf[pos_of[j]]) for j in kept):
                removed += 1
                continue
            kept.append(i)
        dedup_groups.append(kept)
    if removed:
        findings.append(
            Finding(
                "DUPLICATE_SLICES_REMOVED",
                f"{removed} slice(s) identical to another at the same position were dropped.",
                {"count": removed},
            )
        )
    counts = {len(g) for g in dedup_groups}
    t_count = 1
    if counts != {1}:
        if len(counts) != 1:
            raise GeometryError(
                f"{what}: slice positions hold different numbers of distinct images "
                f"({sorted(counts)}); time points or phases cannot be separated safely. "
                "Split the series before loading.",
                code="DUPLICATE_POSITIONS",
            )
        dedup_groups, rule = _separate_time(dedup_groups, slices, what)
        t_count = len(dedup_groups[0])
        findings.append(
            Finding(
                "MULTIPLE_TIME_POINTS",
                f"{t_count} images per slice position were separated by {rule} into a 4D "
                "volume (I, J, K, T).",
                {"n_time_points": t_count, "separated_by": rule},
            )
        )
        extra["t_axis"] = rule

    k_count = len(dedup_groups)
    # pixel planes in (K, T, rows, cols) order
    if t_count == 1 and removed == 0 and len(order) == k_count:
        planes = buf  # already in spatial order, no copy
    else:
        idx = np.asarray([[pos_of[i] for i in g] for g in dedup_groups])  # (K, T)
        planes = buf[idx.reshape(-1)].reshape(k_count, t_count, rows, cols)
    if planes.ndim == 3:
        planes = planes[:, None]  # (K, 1, rows, cols)

    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing
    lps[:3, 1] = col * row_spacing
    lps[:3, 3] = kipp[0]
    if resample_grid is not None:
        targets, step, offsets = resample_grid
        _, _, grid_rows, grid_cols = _resample_grid(offsets, rows, cols)
        check_declared_size((grid_cols, grid_rows, len(targets) * t_count), 4,
                            f"{what} (resampled onto a regular grid)")
        fill = float(planes.min())
        outs = []
        origin_px = (0, 0)
        for t in range(t_count):
            res, origin_px = _resample_stack(
                np.ascontiguousarray(planes[:, t]), offsets, d - d[0], targets - d[0], fill
            )
            outs.append(res)
        planes = np.stack(outs, axis=1)
        lps[:3, 2] = normal * step
        lps[:3, 3] = kipp[0] + origin_px[0] * col * row_spacing + origin_px[1] * row * col_spacing
        if irregular:
            gaps = np.diff(d)
            findings.append(
                Finding(
                    "UNEVEN_SPACING_RESAMPLED",
                    f"slice spacing varied from {float(gaps.min()):.3f} to "
                    f"{float(gaps.max()):.3f} mm; resampled linearly onto {len(targets)} "
                    f"slices {step:.4f} mm apart (spacing never averaged).",
                    {"min_gap_mm": round(float(gaps.min()), 4),
                     "max_gap_mm": round(float(gaps.max()), 4),
                     "new_spacing_mm": round(step, 4), "n_slices": len(targets)},
                )
            )
        if tilt_deg:
            findings.append(
                Finding(
                    "GANTRY_TILT_RESAMPLED",
                    f"gantry tilt of {tilt_deg:.2f} degrees; resampled linearly in world space "
                    "onto an orthogonal grid (as dcm2niix's tilt correction).",
                    {"tilt_deg": round(tilt_deg, 3), "n_slices": len(targets)},
                )
            )
        extra["resampled"] = True
    else:
        if k_count >= 2:
            lps[:3, 2] = (kipp[-1] - kipp[0]) / (k_count - 1)
        else:
            plausible = thickness is not None and 0 < thickness <= _MAX_EXTENT_MM
            step = thickness if plausible else 1.0
            lps[:3, 2] = normal * step
    # (K, T, rows, cols) -> (I, J, K, T): a transposed view (Fortran order), no copy
    arr = planes.transpose(3, 2, 0, 1)
    if t_count == 1:
        arr = arr[..., 0]
    return arr, _lps_to_ras(lps), findings, extra


# ======================================================================================
# loading
# ======================================================================================
_META_NUMERIC = frozenset({"MagneticFieldStrength", "SliceThickness", "SpacingBetweenSlices",
                           "KVP", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
                           "BitsStored"})
_META_FREE = frozenset({"Manufacturer", "ManufacturerModelName", "ConvolutionKernel"})
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{0,16}$")


def _meta_value(tag: str, value: Any, ds: Any) -> Any:
    """An allow-listed value, validated by kind; None when it does not look like one.

    A malformed header can put anything in any tag (a name in KVP), so numbers must parse,
    code strings must be DICOM code strings, and the few free-text tags are scrubbed of the
    header's own identifiers.
    """
    values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" \
        else [value]
    out: list[Any] = []
    for v in values:
        if tag in _META_NUMERIC:
            try:
                f = float(v)
            except (TypeError, ValueError):
                return None
            if not math.isfinite(f):
                return None
            out.append(f)
        elif tag in _META_FREE:
            out.append(_scrub(str(v), ds)[:64])
        else:
            text = str(v).strip()
            if not _CODE_STRING.match(text):
                return None
            out.append(text)
    if not out:
        return None
    return out[0] if len(out) == 1 else out


def _meta(ds: Any, info: SeriesInfo | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for tag in META_ALLOW_LIST:
        try:
            value = ds.get(tag)
        except Exception:  # noqa: BLE001 - an unparsable value is simply left out
            continue
        if value is None or value == "":
            continue
        checked = _meta_value(tag, value, ds)
        if checked is not None:
            meta[tag] = checked
    if info is not None:
        meta["series_key"] = info.key
        meta["study_key"] = info.study_key
        meta["n_files"] = info.n_instances
    else:
        meta["series_key"] = pseudonym(str(ds.get("SeriesInstanceUID", "")), prefix="se-")
        meta["study_key"] = pseudonym(str(ds.get("StudyInstanceUID", "")), prefix="st-")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        meta["TransferSyntax"] = UID(str(ts)).name
    return meta


def _series_label(info: SeriesInfo) -> str:
    return f"series {info.key} ({info.modality}, {info.n_instances} file(s))"


@_guarded
def load_series(info: SeriesInfo, *, strict: bool = False) -> Volume:
    """Load one series found by :func:`scan_dicom` into a :class:`Volume`.

    ``strict=True`` refuses what the default repairs and records: missing slices
    (``MISSING_SLICES``), uneven spacing (``UNEVEN_SPACING``), gantry tilt
    (``GANTRY_TILT``) and pydicom read warnings.
    """
    headers = info._headers
    if not headers:
        scan = scan_dicom(info.files)
        match = [s for s in scan.series if s.key == info.key] or scan.series
        if not match:
            raise NotDicomError("no DICOM image found in the given series files.")
        headers = match[0]._headers
    what = _series_label(info)
    if info.is_enhanced:
        volume = _load_enhanced(headers, info, strict=strict, what=what)
    elif info.orientation == "projection":
        _check_pixel_module(headers[0], what)
        volume = _load_projection(headers[0], info, strict=strict, what=what)
    else:
        volume = _load_stack(headers, info, strict=strict, what=what)
    return _checked_volume(volume, what)


def _checked_volume(volume: Volume, what: str) -> Volume:
    """The loader contract, checked last: a non-empty shape and a finite non-singular
    affine. The specific checks above should make this unreachable; it stays so that no
    future path can hand back a silently invalid geometry."""
    if volume.array.size == 0:
        raise CorruptFileError(
            f"{what}: the image is empty (shape {volume.shape}). {_TRUNC_FIX}",
            code="INVALID_DIMENSIONS",
        )
    affine = volume.affine
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise GeometryError(
            f"{what}: the voxel-to-world matrix is singular or not finite (check "
            "PixelSpacing, ImageOrientationPatient and ImagePositionPatient). The header is "
            "corrupt; re-export the series.",
            code="SINGULAR_AFFINE",
        )
    # Voxels are not scanned again here (a full pass costs about a quarter of a large
    # series' load time): every path guarantees finite values where it makes them, from
    # integer stored values and a rescale checked by _finite_rescale / _rescale_bound
    # (resampling only interpolates), a checked VOI step for radiographs, and an explicit
    # check of nibabel's scaled mosaic data. tests/test_fuzz_dicom.py checks the result.
    return volume


def _is_mosaic(ds: Any) -> bool:
    value = ds.get("ImageType") or []
    values = [value] if isinstance(value, str) else list(value)
    return "MOSAIC" in [str(v).upper() for v in values]


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


def _check_mosaic_layout(wrapper: Any, ds: Any, what: str) -> None:
    """A mosaic tiles ``n`` slices in a ceil(sqrt(n)) x ceil(sqrt(n)) grid: refuse a
    NumberOfImagesInMosaic whose grid does not divide the matrix (the tiles would be cut
    across slices), naming the matrix and the count rather than blaming the CSA header."""
    n = _int(getattr(wrapper, "n_mosaic", None), 0) or 0
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    side = int(math.ceil(math.sqrt(n))) if n > 0 else 0
    if side < 1 or rows % side or cols % side:
        raise CorruptFileError(
            f"{what}: the CSA header says the mosaic holds {n} slices, i.e. a {side} x {side} "
            f"grid of tiles, which does not divide its {rows} x {cols} matrix. The mosaic "
            "header and pixel matrix disagree; convert the series with dcm2niix or "
            "re-export it.",
            code="INVALID_MOSAIC",
        )


def _load_mosaic(headers: Sequence[_FileHeader], info: SeriesInfo, *, what: str) -> Volume:
    """Siemens mosaics (several slices tiled in one image, one file per time point).

    Tiles, slice order and the corrected position of the first slice come from the Siemens
    CSA header through nibabel's DICOM wrapper (``nibabel.nicom.dicomwrappers``), the same
    logic as dcm2niix; one file is one 3D volume, several files are time points (4D)
    ordered by AcquisitionNumber then InstanceNumber.
    """
    from nibabel.nicom import dicomwrappers

    volumes: list[tuple[tuple[int, int, int], np.ndarray, np.ndarray]] = []
    for n, h in enumerate(headers):
        label = f"{what}, file #{n + 1}"
        _check_header_size(h, label)
        _check_pixel_module(h, label)
        ds = _full_dataset(h, label)
        try:
            wrapper = dicomwrappers.wrapper_from_data(ds)
            is_mosaic = bool(getattr(wrapper, "is_mosaic", False))
        except BaseException as exc:
            if not _is_input_failure(exc):
                raise
            is_mosaic = False
        if not is_mosaic:
            raise UnsupportedInputError(
                f"{label}: Siemens mosaic whose CSA header (NumberOfImagesInMosaic) cannot "
                "be read. Convert the series with dcm2niix and load the NIfTI file.",
            )
        _check_mosaic_layout(wrapper, h.ds, label)
        try:
            data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (rows, cols, slices)
            affine = np.asarray(wrapper.affine, dtype=np.float64)  # LPS, (row, col, slice)
        except BaseException as exc:
            if not _is_input_failure(exc):
                raise
            raise CorruptFileError(
                f"{label}: the mosaic's pixel data or geometry tags cannot be read "
                f"({type(exc).__name__}). {_TRUNC_FIX}",
            ) from None
        if data.ndim != 3:
            raise UnsupportedInputError(f"{label}: unexpected mosaic layout {data.shape}.")
        if not np.all(np.isfinite(data)):  # nibabel applied the header's rescale unchecked
            raise InvalidValuesError(
                f"{label}: rescaling the mosaic produced NaN or infinite voxels (check "
                "RescaleSlope/RescaleIntercept). Fix the header or exclude the series.",
            )
        key = (_int(h.ds.get("AcquisitionNumber"), 0) or 0,
               _int(h.ds.get("InstanceNumber"), 0) or 0, n)
        # medfusion's axes: i along a row (columns), j along a column (rows)
        volumes.append((key, data.transpose(1, 0, 2), affine[:, [1, 0, 2, 3]]))
    volumes.sort(key=lambda v: v[0])
    first_aff = volumes[0][2]
    for _key, data, aff in volumes[1:]:
        if data.shape != volumes[0][1].shape or not np.allclose(aff, first_aff, atol=1e-3):
            raise GeometryError(
                f"{what}: mosaic files of one series differ in geometry. Split the series.",
                code="INCONSISTENT_GEOMETRY",
            )
    findings: list[Finding] = [
        Finding("MOSAIC_UNPACKED", f"Siemens mosaic unpacked into {volumes[0][1].shape[2]} "
                "slices per time point.", {"n_slices": int(volumes[0][1].shape[2])})
    ]
    if len(volumes) == 1:
        arr = volumes[0][1]
    else:
        arr = np.stack([v[1] for v in volumes], axis=-1)
        findings.append(
            Finding(
                "MULTIPLE_TIME_POINTS",
                f"{len(volumes)} mosaic files were stacked as time points (I, J, K, T), "
                "ordered by AcquisitionNumber then InstanceNumber.",
                {"n_time_points": len(volumes), "separated_by": "AcquisitionNumber"},
            )
        )
    meta = _meta(headers[0].ds, info)
    meta["mosaic"] = True
    return Volume(array=np.asfortranarray(arr), affine=_lps_to_ras(first_aff),
                  modality=info.modality, meta=meta, issues=tuple(findings))


def _load_stack(
    headers: Sequence[_FileHeader], info: SeriesInfo, *, strict: bool, what: str
) -> Volume:
    ds0 = headers[0].ds
    if _is_mosaic(ds0):
        return _load_mosaic(headers, info, what=what)
    pre_findings: list[Finding] = []
    localizer = [_is_localizer(h.ds) for h in headers]
    if any(localizer) and not all(localizer):
        # Some scanners file the scout images in the axial series: they are not part of
        # the stack (other orientation or size), so they are set aside and recorded.
        headers = [h for h, loc in zip(headers, localizer, strict=True) if not loc]
        ds0 = headers[0].ds
        pre_findings.append(
            Finding(
                "LOCALIZER_EXCLUDED",
                f"{sum(localizer)} localizer image(s) in the series were not stacked.",
                {"count": int(sum(localizer))},
            )
        )
    slices: list[_Slice] = []
    for n, h in enumerate(headers):
        _check_pixel_module(h, f"{what}, file #{n + 1}")
        if h.n_frames > 1:
            raise UnsupportedInputError(
                f"{what}: a multi-frame file without per-frame geometry cannot be stacked. "
                "Convert it to single-frame or enhanced DICOM.",
            )
        slices.extend(_slices_from_header(h, n))
    total = sum(s.rows * s.cols for s in slices)
    check_declared_size((total,), 4, what)
    compressed_zero: list[bool] = []

    def read_plane(indices: list[int], out: np.ndarray) -> list[bool]:
        compressed_zero.clear()
        for n, i in enumerate(indices):
            s = slices[i]
            h = headers[s.file_index]
            stored, compressed = _read_stored(h, f"{what}, file #{s.file_index + 1}",
                                              strict=strict)
            plane = stored[s.frame]
            if plane.shape != (s.rows, s.cols):
                raise CorruptFileError(f"{what}: a decoded slice has the wrong size.")
            dst = out[n]
            if s.slope == 1.0:  # one pass: convert and add the intercept together
                np.add(plane, np.float32(s.intercept), out=dst, dtype=np.float32)
            else:
                np.multiply(plane, np.float32(s.slope), out=dst, dtype=np.float32)
                if s.intercept != 0.0:
                    dst += np.float32(s.intercept)
            compressed_zero.append(bool(compressed and not plane.any()))
        return list(compressed_zero)

    arr, affine, findings, extra = _assemble_stack(
        slices, read_plane, strict=strict, what=what, modality=info.modality,
        max_stored=max(_max_stored(h.ds) for h in headers),
    )
    meta = _meta(ds0, info)
    meta.update(extra)
    return Volume(array=arr, affine=affine, modality=info.modality, meta=meta,
                  issues=(*pre_findings, *findings))


def _max_stored(ds: Any) -> float:
    """An upper bound on the magnitude of a stored value (from BitsAllocated)."""
    return 2.0 ** (_int(ds.get("BitsAllocated"), 16) or 16)


def _is_localizer(ds: Any) -> bool:
    value = ds.get("ImageType") or []
    values = [value] if isinstance(value, str) else list(value)
    return "LOCALIZER" in [str(v).upper() for v in values]


def _full_header(h: _FileHeader, what: str) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(str(h.path), stop_before_pixels=True,
                                   force=_sniff(h.path) == "raw")
    except BaseException as exc:
        if not _is_input_failure(exc):
            raise
        raise CorruptFileError(
            f"{what}: the header cannot be parsed ({type(exc).__name__}). {_TRUNC_FIX}",
        ) from None


def _dt_key(text: Any) -> tuple[int, float] | None:
    """A DICOM DA+TM / DT string as a sortable (whole seconds digits, fraction) pair."""
    match = re.match(r"^\s*(\d{8,14})(\.\d+)?", str(text or ""))
    if match is None:
        return None
    return int(match.group(1)), float("0" + (match.group(2) or ".0"))


def _file_time_keys(ds: Any) -> dict[str, Any]:
    """Per-file acquisition order candidates of an enhanced file (see
    :func:`_enhanced_time_series`)."""
    keys: dict[str, Any] = {}
    frame_times = []
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        content = item.get("FrameContentSequence")
        if content:
            frame_times.append(_dt_key(content[0].get("FrameAcquisitionDateTime")))
    if frame_times and all(t is not None for t in frame_times):
        keys["FrameAcquisitionDateTime"] = min(frame_times)  # type: ignore[type-var]
    keys["AcquisitionDateTime"] = _dt_key(ds.get("AcquisitionDateTime"))
    date, time = ds.get("ContentDate"), ds.get("ContentTime")
    keys["ContentTime"] = _dt_key(f"{date}{time}") if date and time else None
    keys["InstanceNumber"] = _int(ds.get("InstanceNumber"))
    return keys


def _enhanced_geometry(ds: Any) -> np.ndarray | None:
    """Every frame's (IPP, IOP, PixelSpacing) of an enhanced file as one array (None when
    a frame lacks them or the functional groups are malformed)."""
    try:
        frames = _slices_from_enhanced(ds, "enhanced file")
    except BaseException as exc:  # a malformed file is simply not grouped; load reports it
        if not _is_input_failure(exc):
            raise
        return None
    rows = []
    for f in frames:
        if f.ipp is None or f.iop is None or f.pixel_spacing is None:
            return None
        rows.append([*f.ipp, *f.iop, *f.pixel_spacing, f.rows, f.cols])
    return np.asarray(rows, dtype=np.float64)


def _enhanced_time_series(hs: Sequence[_FileHeader]) -> tuple[list[int], str] | None:
    """For several enhanced files of one SeriesInstanceUID: their acquisition order and
    the rule used, when they are time points of one acquisition (every frame at the same
    position, orientation and spacing in every file, as Siemens XA writes fMRI) and one of
    FrameAcquisitionDateTime (earliest frame), AcquisitionDateTime, ContentDate+ContentTime
    or InstanceNumber differs between all of them; else None (the files stay separate
    entries)."""
    geometries = [_enhanced_geometry(h.ds) for h in hs]
    first = geometries[0]
    if first is None or not all(
        g is not None and g.shape == first.shape and np.allclose(g, first, atol=1e-3)
        for g in geometries
    ):
        return None
    keys = [_file_time_keys(h.ds) for h in hs]
    for rule in ("FrameAcquisitionDateTime", "AcquisitionDateTime", "ContentTime",
                 "InstanceNumber"):
        values = [k.get(rule) for k in keys]
        if any(v is None for v in values) or len(set(values)) != len(values):
            continue
        return sorted(range(len(hs)), key=lambda i: values[i]), rule
    return None


def _load_enhanced(
    headers: Sequence[_FileHeader], info: SeriesInfo, *, strict: bool, what: str
) -> Volume:
    """One enhanced multi-frame file, or several that :func:`scan_dicom` grouped as time
    points of one acquisition (same SeriesInstanceUID, identical per-frame geometry).

    Several files are stacked along T (last axis) in acquisition order: by the earliest
    FrameAcquisitionDateTime of each file, else AcquisitionDateTime, else
    ContentDate+ContentTime, else InstanceNumber (the first that differs between every
    file), as dcm2niix and SimpleITK build one 4D volume. Finding ``MULTIPLE_TIME_POINTS``
    names the rule.
    """
    if len(headers) == 1:
        _check_pixel_module(headers[0], what)
        return _load_enhanced_file(headers[0], info, strict=strict, what=what)
    ordered = _enhanced_time_series(headers)
    if ordered is None:
        raise GeometryError(
            f"{what}: the enhanced files differ in geometry or cannot be ordered in time. "
            "Load each file on its own.",
            code="INCONSISTENT_GEOMETRY",
        )
    order, rule = ordered
    ds0 = headers[0].ds
    total_frames = sum(h.n_frames for h in headers)
    check_declared_size((_int(ds0.get("Columns"), 0) or 0, _int(ds0.get("Rows"), 0) or 0,
                         total_frames), 4, what)
    volumes: list[Volume] = []
    for n in order:
        label = f"{what}, file #{n + 1}"
        _check_pixel_module(headers[n], label)
        volumes.append(_load_enhanced_file(headers[n], info, strict=strict, what=label))
    first = volumes[0]
    for v in volumes[1:]:
        if v.spatial_shape != first.spatial_shape or \
                not np.allclose(v.affine, first.affine, atol=1e-3):
            raise GeometryError(
                f"{what}: the enhanced files do not share one grid. Load each file on its own.",
                code="INCONSISTENT_GEOMETRY",
            )
    parts = [v.array if v.array.ndim == 4 else v.array[..., None] for v in volumes]
    arr = np.asfortranarray(np.concatenate(parts, axis=3))
    findings: list[Finding] = []
    for v in volumes:
        for f in v.issues:
            if f.code != "MULTIPLE_TIME_POINTS" and f not in findings:
                findings.append(f)
    findings.append(
        Finding(
            "MULTIPLE_TIME_POINTS",
            f"{len(volumes)} enhanced files of one series were stacked as {arr.shape[3]} time "
            f"points (I, J, K, T), ordered by {rule}.",
            {"n_time_points": int(arr.shape[3]), "n_files": len(volumes),
             "separated_by": f"files ordered by {rule}"},
        )
    )
    meta = dict(first.meta)
    meta["t_axis"] = f"files ordered by {rule}"
    return Volume(array=arr, affine=first.affine, modality=info.modality, meta=meta,
                  issues=tuple(findings))


def _load_enhanced_file(
    h: _FileHeader, info: SeriesInfo, *, strict: bool, what: str
) -> Volume:
    # The scan already parsed the functional groups (top-level tags by name, sequences in
    # full): reuse them instead of parsing a large header twice.
    reusable = isinstance(h.ds, Dataset) and "PerFrameFunctionalGroupsSequence" in h.ds
    ds = h.ds if reusable else _full_header(h, what)
    slices = _slices_from_enhanced(ds, what)
    stored_cache: dict[str, Any] = {}

    def read_plane(indices: list[int], out: np.ndarray) -> list[bool]:
        stored, compressed = _read_stored(h, what, strict=strict)
        stored_cache["c"] = compressed
        zeros = []
        for n, i in enumerate(indices):
            s = slices[i]
            plane = stored[s.frame]
            np.multiply(plane, np.float32(s.slope), out=out[n], casting="unsafe")
            if s.intercept != 0.0:
                out[n] += np.float32(s.intercept)
            zeros.append(bool(compressed and not plane.any()))
        return zeros

    arr, affine, findings, extra = _assemble_stack(
        slices, read_plane, strict=strict, what=what, modality=info.modality,
        max_stored=_max_stored(ds),
    )
    meta = _meta(ds, info)
    meta.update(extra)
    meta["enhanced"] = True
    return Volume(array=arr, affine=affine, modality=info.modality, meta=meta,
                  issues=tuple(findings))


#: A window narrower than this (in output units of the modality LUT) is a threshold, not
#: a presentation window: such a VOI is ignored rather than turned into a binary image.
_MIN_WINDOW_WIDTH = 1e-3


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """DICOM PS3.3 C.11.2.1.2 VOI window to [0, 1], computed in float64 (a tiny width must
    not turn 0/0 into NaN). None when the window is unusable: a width that is not finite,
    below :data:`_MIN_WINDOW_WIDTH`, or below 1 for LINEAR (the standard requires >= 1),
    a non-finite center, or a result that is not finite."""
    function = function.upper()
    if not (math.isfinite(center) and math.isfinite(width)) or width < _MIN_WINDOW_WIDTH:
        return None
    xd = x.astype(np.float64)
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (xd - center) / width))
    elif function == "LINEAR_EXACT":
        y = (xd - center) / width + 0.5
    else:
        if width < 1:
            return None
        if width == 1:  # the standard's LINEAR with width 1 is a step at center - 0.5
            y = (xd > center - 0.5).astype(np.float64)
        else:
            y = (xd - (center - 0.5)) / (width - 1.0) + 0.5
    out = np.clip(y, 0.0, 1.0).astype(np.float32)
    if not np.all(np.isfinite(out)):
        return None
    return out


def _voi_lut(item: Any) -> tuple[np.ndarray, int, int] | None:
    """(LUT entries, first mapped value, bits) of a VOILUTSequence item; None when the
    item is malformed (descriptor missing or out of range, no data)."""
    desc = _floats(item.get("LUTDescriptor"), 3)
    if desc is None or not all(math.isfinite(v) for v in desc):
        return None
    n_entries, first, bits = int(desc[0]) or 65536, int(desc[1]), int(desc[2])
    if not (0 < n_entries <= 65536 and 1 <= bits <= 16):
        return None
    lut_raw = item.get("LUTData")
    if lut_raw is None:
        return None
    if isinstance(lut_raw, (bytes, bytearray)):
        lut = np.frombuffer(bytes(lut_raw[: len(lut_raw) // 2 * 2]), dtype="<u2")[:n_entries]
    else:
        lut = np.asarray(_floats(lut_raw) or (), dtype=np.float64)[:n_entries]
    if lut.size == 0 or not np.all(np.isfinite(lut)):
        return None
    return lut.astype(np.float32), first, bits


def _projection_spacing(
    ds: Any, shape_rc: tuple[int, int], what: str
) -> tuple[tuple[float, float], list[Finding], str]:
    """Pixel spacing of a radiograph: PixelSpacing, else ImagerPixelSpacing, else 1 mm.

    Absent or all-zero values (written by some devices for "unknown") fall through to the
    next source with a finding; a present PixelSpacing that is negative, non-finite,
    implausibly small or large is refused (``INVALID_PIXEL_SPACING``), as for a series.
    """

    pixel = _floats(ds.get("PixelSpacing"), 2)
    imager = _floats(ds.get("ImagerPixelSpacing"), 2)
    findings: list[Finding] = []
    if pixel is not None and any(v != 0 for v in pixel):
        _check_pixel_spacing(np.asarray([pixel], dtype=np.float64), what)
        chosen, source = pixel, "PixelSpacing"
    elif imager is not None and all(math.isfinite(v) and v >= _MIN_SPACING_MM for v in imager):
        chosen, source = imager, "ImagerPixelSpacing"
        findings.append(Finding(
            "IMAGER_PIXEL_SPACING",
            "PixelSpacing absent; ImagerPixelSpacing (at the detector, not corrected for "
            "magnification) was used.",
            {},
        ))
    else:
        chosen, source = (1.0, 1.0), "none"
        findings.append(Finding("NO_PIXEL_SPACING",
                                "no pixel spacing in the header; 1 mm assumed.", {}))
    extent = max(shape_rc[0] * chosen[0], shape_rc[1] * chosen[1])
    if extent > _MAX_EXTENT_MM:
        raise GeometryError(
            f"{what}: the image would extend {extent / 1000:.3g} m (Rows/Columns x "
            f"{source}), over the plausible {_MAX_EXTENT_MM / 1000:.0f} m. The header is "
            "corrupt; re-export the image.",
            code="IMPLAUSIBLE_GEOMETRY",
        )
    return (float(chosen[0]), float(chosen[1])), findings, source


def _projection_frame(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, origin) of a radiograph in LPS: from
    ImageOrientationPatient (two unit, perpendicular cosines) and ImagePositionPatient when
    present and valid, else the identity orientation and origin 0, as ITK/GDCM read it."""
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is not None and all(math.isfinite(v) for v in iop):
        r, c = np.asarray(iop[:3]), np.asarray(iop[3:])
        nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
        if nr > 1e-6 and nc > 1e-6 and abs(float(r @ c)) / (nr * nc) <= 1e-3:
            row_dir, col_dir = r / nr, c / nc
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    origin = np.zeros(3)
    if ipp is not None and all(math.isfinite(v) for v in ipp):
        origin = np.asarray(ipp, dtype=np.float64)
    return row_dir, col_dir, origin


def _load_projection(h: _FileHeader, info: SeriesInfo, *, strict: bool, what: str) -> Volume:
    """A radiograph: modality LUT, VOI (LUT, else window, else full stored range) to
    [0, 1], then MONOCHROME1 inverted so that dense is bright. K = 1; frames go to T.

    A malformed VOI LUT or an unusable window (see :func:`_window`) is ignored with a
    ``VOI_IGNORED`` finding and the next VOI source is used."""
    ds = h.ds
    findings: list[Finding] = []
    slope = _float(ds.get("RescaleSlope"), 1.0) or 1.0
    intercept = _float(ds.get("RescaleIntercept"), 0.0) or 0.0
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise InvalidValuesError(
            f"{what}: RescaleSlope/RescaleIntercept is NaN or infinite. Fix the header.",
        )
    if _rescale_bound(_max_stored(ds), slope, intercept) > _FLOAT32_MAX / 2:
        raise InvalidValuesError(
            f"{what}: RescaleSlope/RescaleIntercept scale stored values beyond the float32 "
            "range (voxels would be infinite). Fix the header.",
        )
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    spacing, spacing_findings, spacing_source = _projection_spacing(ds, (rows, cols), what)
    photometric = str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").upper()
    stored, compressed = _read_stored(h, what, strict=strict)
    frames = stored.astype(np.float32)
    if compressed:
        zeros = [f for f in range(stored.shape[0]) if not stored[f].any()]
        if zeros:
            findings.append(Finding("ZERO_FRAME", f"{len(zeros)} frame(s) decoded to all zeros.",
                                    {"count": len(zeros)}))
    values = frames * np.float32(slope) + np.float32(intercept)
    meta_extra: dict[str, Any] = {}
    voi_seq = ds.get("VOILUTSequence")
    centers = _floats(ds.get("WindowCenter"))
    widths = _floats(ds.get("WindowWidth"))
    voi: np.ndarray | None = None
    if voi_seq:
        lut_spec = _voi_lut(voi_seq[0])
        if lut_spec is None:
            findings.append(Finding(
                "VOI_IGNORED",
                "the VOI LUT is malformed (descriptor or data missing or out of range) and "
                "was ignored; the next VOI source was used.",
                {"source": "VOILUTSequence"},
            ))
        else:
            lut, first, bits = lut_spec
            index = np.clip(np.rint(values - first), 0, len(lut) - 1).astype(np.int64)
            voi = lut[index] / np.float32((1 << bits) - 1)
            meta_extra["voi"] = "lut"
    if voi is None and centers and widths:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        voi = _window(values, centers[0], widths[0], function)
        if voi is None:
            findings.append(Finding(
                "VOI_IGNORED",
                "the VOI window (WindowCenter/WindowWidth) is unusable (not finite, or "
                "narrower than the VOI function allows) and was ignored; the full stored "
                "range was used.",
                {"source": "WindowCenter/WindowWidth"},
            ))
        else:
            meta_extra["voi"] = "window"
            meta_extra["window"] = [centers[0], widths[0]]
    if voi is None:
        bits_stored = _int(ds.get("BitsStored"), 16) or 16
        signed = (_int(ds.get("PixelRepresentation"), 0) or 0) == 1
        lo = -(1 << (bits_stored - 1)) if signed else 0
        hi = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
        a, b = lo * slope + intercept, hi * slope + intercept
        lo_v, hi_v = min(a, b), max(a, b)
        voi = np.clip((values - lo_v) / max(hi_v - lo_v, 1e-12), 0.0, 1.0).astype(np.float32)
        meta_extra["voi"] = "none (full stored range)"
    values = voi
    if photometric == "MONOCHROME1":
        values = np.float32(1.0) - values
        findings.append(
            Finding(
                "MONOCHROME1_INVERTED",
                "MONOCHROME1 image inverted after the VOI step so that dense is bright.",
                {},
            )
        )
        meta_extra["inverted"] = True
    elif photometric != "MONOCHROME2":
        raise UnsupportedInputError(
            f"{what}: PhotometricInterpretation {photometric} is not supported for "
            "radiographs; expected MONOCHROME1 or MONOCHROME2.",
        )
    findings.extend(spacing_findings)
    meta_extra["spacing_source"] = spacing_source
    row_spacing, col_spacing = float(spacing[0]), float(spacing[1])
    # The frame every DICOM toolkit (ITK/GDCM, dcm2niix) gives one image, so that maps
    # written on this grid (saliency) overlay the radiograph in their viewers: the header's
    # ImageOrientationPatient / ImagePositionPatient when present and valid (k = row x
    # column, unit length), else the identity orientation with the origin at the first
    # pixel. A radiograph rarely has them: its world frame is then a convention only.
    row_dir, col_dir, origin = _projection_frame(ds)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = np.cross(row_dir, col_dir)
    lps[:3, 3] = origin
    arr = values.transpose(2, 1, 0)[:, :, None, :]  # (I, J, 1, F)
    if arr.shape[3] == 1:
        arr = arr[..., 0]
    else:
        findings.append(Finding("MULTI_FRAME", f"{arr.shape[3]} frames returned along T.",
                                {"n_frames": int(arr.shape[3])}))
    meta = _meta(ds, info)
    meta.update(meta_extra)
    meta["PhotometricInterpretation"] = photometric
    return Volume(array=np.ascontiguousarray(arr, dtype=np.float32), affine=_lps_to_ras(lps),
                  modality=info.modality, meta=meta, issues=tuple(findings))


@_guarded
def load_dicom_file(path: str | Path, *, strict: bool = False) -> Volume:
    """Load one DICOM file: a radiograph (CR/DX/DR, single- or multi-frame), an enhanced
    multi-frame CT/MR, or a lone cross-sectional slice (K = 1)."""
    path = Path(path)
    header, reason = _read_header(path)
    if header is None:
        if reason == "no pixel data":
            raise NotDicomError("the DICOM file holds no image (no pixel data).")
        if reason == "DICOMDIR":
            raise NotDicomError("the file is a DICOMDIR index; load its folder instead.")
        raise NotDicomError(
            "the file is not a readable DICOM image (no DICM marker or unreadable header). "
            "Pass a DICOM image, a folder of DICOM files, or a .nii/.nii.gz file.",
        )
    _check_header_size(header, "DICOM file")
    series_uid = str(header.ds.get("SeriesInstanceUID", "") or "single-file")
    info = _make_info(series_uid, [header], key_source=series_uid)
    return load_series(info, strict=strict)

