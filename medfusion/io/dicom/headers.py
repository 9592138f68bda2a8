"""Header-only pass: the tags medfusion reads, the per-file header record, tag value helpers,
file sniffing, series records (:class:`SeriesInfo`) and folder walking. Nothing here
decodes pixels."""

from __future__ import annotations

import math
import warnings
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
)
from medfusion.io.dicom.guard import _TRUNC_FIX, _is_input_failure
from medfusion.io.dicom_fast import read_fast_header, wanted_tags
from medfusion.io.keys import pseudonym
from medfusion.io.limits import check_declared_size
from medfusion.io.walk import OK, walk_files

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


#: Patient and General Study attributes kept (in ``DicomSource.identity``) only so that a DICOM
#: result object written on explicit request belongs to the patient's study; never output
#: anywhere else.
IDENTITY_TAGS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
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
        "FrameOfReferenceUID",
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
        *IDENTITY_TAGS,
        *_TIME_TAGS,
    }
)


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
    """Every regular file under ``folder`` (any nesting), walked with the one folder walker
    (:func:`medfusion.io.walk.walk_files`: links may not leave ``folder``, link loops are
    skipped); symbolic links to files are left out (a series is its files, not views of
    them)."""
    return [p for p, status in walk_files(folder) if status == OK and not p.is_symlink()]


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
