"""Deterministic writers of valid (and deliberately broken) DICOM files, for tests and samples.

Every writer produces standard files with pydicom (a proper File Meta Information group,
explicit VR little endian unless another transfer syntax is asked for) and plants
*sentinel* patient identifiers by default (:data:`SENTINELS`, a private tag and a free-text
comment), so a test can check that none of them leaks into medfusion's outputs.

Array convention (same as medfusion's ``Volume`` and NIfTI): arrays are indexed (I, J, K)
= (columns, rows, slices). Slice ``k`` of the DICOM file is ``array[:, :, k].T`` (DICOM
pixel data is row-major, rows first). Geometry is given as a voxel-to-RAS affine (NIfTI /
nibabel convention); the writer converts it to DICOM LPS:

* ImageOrientationPatient = (unit of LPS column 0 of the affine, unit of LPS column 1),
* PixelSpacing = (|column 1|, |column 0|)  (DICOM order: row spacing, column spacing),
* ImagePositionPatient of slice k = LPS translation + k * LPS column 2.

Values are given in real units (HU for CT); the writer stores integers through
RescaleSlope/RescaleIntercept (``stored = round((value - intercept) / slope)``).

All randomness (file names, write order, UIDs) is seeded: the same call writes the same
bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DSfloat

__all__ = [
    "SENTINELS",
    "SENTINEL_FREE_TEXT",
    "SENTINEL_PRIVATE",
    "SENTINEL_FILE_STEM",
    "series_affine",
    "truncate_file",
    "write_enhanced_multiframe",
    "write_huge_header",
    "write_mosaic",
    "write_non_dicom_files",
    "write_radiograph",
    "write_series",
]

#: Identifiers planted in every file by default. None may ever appear in medfusion output.
SENTINELS: dict[str, str] = {
    "PatientName": "ZZTEST^SENTINEL",
    "PatientID": "ZZTEST-ID-0001",
    "PatientBirthDate": "19010101",
    "AccessionNumber": "ZZACC0001",
    "InstitutionName": "ZZTEST HOSPITAL",
}
#: Planted in ImageComments / StudyDescription (free text).
SENTINEL_FREE_TEXT = "ZZTEST FREETEXT NOTE"
#: Planted in a private tag.
SENTINEL_PRIVATE = "ZZTEST PRIVATE VALUE"
#: Used by ``file_names="sentinel"``: a file name that holds a patient name.
SENTINEL_FILE_STEM = "ZZTEST_SENTINEL"

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "DR": "1.2.840.10008.5.1.4.1.1.1.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
}
_ENHANCED_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2.1",
    "MR": "1.2.840.10008.5.1.4.1.1.4.1",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

Rescale = tuple[float, float]


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _ds(x: float) -> DSfloat:
    """A DS value that always fits the 16-character limit (keeps as much precision as fits)."""
    return DSfloat(float(x), auto_format=True)


def _uid(*parts: object) -> str:
    """A deterministic UID derived from ``parts`` (pydicom hashes the entropy sources)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def default_affine(shape_ijk: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """The default geometry: an axial LPS stack (rows run posterior, columns run left),
    centred in-plane on the origin, first slice at z = 0. Returned as voxel-to-RAS."""
    si, sj, sk = (float(s) for s in spacing)
    ni, nj = int(shape_ijk[0]), int(shape_ijk[1])
    lps = np.eye(4)
    lps[:3, 0] = (si, 0.0, 0.0)
    lps[:3, 1] = (0.0, sj, 0.0)
    lps[:3, 2] = (0.0, 0.0, sk)
    lps[:3, 3] = (-(ni - 1) * si / 2.0, -(nj - 1) * sj / 2.0, 0.0)
    return _lps_ras(lps)


def _lps_ras(affine: np.ndarray) -> np.ndarray:
    """Swap LPS <-> RAS (negate the first two world rows); its own inverse."""
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:2, :] *= -1.0
    return out


def series_affine(
    shape_ijk: Sequence[int],
    *,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    tilt_deg: float = 0.0,
) -> np.ndarray:
    """The voxel-to-RAS affine of the stack that :func:`write_series` writes.

    With ``tilt_deg`` the image planes are rotated about the row direction (a gantry tilt)
    while the slice step keeps its direction (table motion): the result is sheared, which
    is exactly what a loader must detect. Use this to compute where each written voxel lies
    in world space.
    """
    base = default_affine(shape_ijk, spacing) if affine is None else np.asarray(affine, float)
    if base.shape != (4, 4):
        raise ValueError("affine must be 4x4")
    if tilt_deg == 0.0:
        return base.copy()
    lps = _lps_ras(base)
    row = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col = lps[:3, 1]
    t = np.deg2rad(tilt_deg)
    # Rodrigues rotation of the column vector about the row direction.
    col_rot = (
        col * np.cos(t) + np.cross(row, col) * np.sin(t) + row * np.dot(row, col) * (1 - np.cos(t))
    )
    lps[:3, 1] = col_rot
    return _lps_ras(lps)


def _stored_dtype(stored: np.ndarray, what: str) -> tuple[np.dtype, int]:
    """uint16 when every value is >= 0, else int16; refuse values that would wrap."""
    lo, hi = float(stored.min()), float(stored.max())
    if lo >= 0 and hi <= 65535:
        return np.dtype("<u2"), 0
    if lo >= -32768 and hi <= 32767:
        return np.dtype("<i2"), 1
    raise ValueError(
        f"{what}: stored values span [{lo}, {hi}], outside 16 bits; choose another rescale"
    )


def _base_dataset(
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    identifiers: bool,
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = (
        transfer_syntax
        if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        else ExplicitVRLittleEndian
    )
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "MEDFUSION_TEST"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = "20200101"
    ds.StudyTime = "120000"
    ds.Manufacturer = "MEDFUSION FACTORY"
    ds.ManufacturerModelName = "SYNTH-1"
    ds.ReferringPhysicianName = "ZZTEST^REFERRER" if identifiers else ""
    if identifiers:
        for keyword, value in SENTINELS.items():
            setattr(ds, keyword, value)
        ds.StudyDescription = SENTINEL_FREE_TEXT
        ds.ImageComments = SENTINEL_FREE_TEXT
        block = ds.private_block(0x0009, "ZZTEST PRIVATE", create=True)
        block.add_new(0x01, "LO", SENTINEL_PRIVATE)
    else:
        ds.PatientName = ""
        ds.PatientID = ""
    ds.StudyID = "1"
    return ds


def _add_private_tags(ds: Dataset, n: int) -> None:
    """``n`` vendor-like private LO tags (real scanners write hundreds; parsing cost grows)."""
    if n <= 0:
        return
    groups = (0x0019, 0x0021, 0x0043, 0x0029)
    per_block = 0xFF
    added = 0
    for g in groups:
        block = ds.private_block(g, f"MEDFUSION VENDOR {g:04X}", create=True)
        for e in range(per_block):
            if added >= n:
                return
            block.add_new(e, "LO", f"vendor value {added}")
            added += 1


def _set_pixels(ds: Dataset, frames_rc: np.ndarray, *, signed: int, bits_stored: int) -> None:
    """Set the pixel module from (F, rows, cols) or (rows, cols) integer data."""
    ds.SamplesPerPixel = 1
    if "PhotometricInterpretation" not in ds:
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(frames_rc.shape[-2])
    ds.Columns = int(frames_rc.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = signed
    ds.PixelData = np.ascontiguousarray(frames_rc).tobytes()


def _save(ds: FileDataset, path: Path, transfer_syntax: str) -> Path:
    if transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        # Encapsulate with pydicom's encoders (RLE natively; JPEG 2000 via pylibjpeg-openjpeg).
        # Keep the seeded SOPInstanceUID: pydicom would draw a random one, and a UID of
        # another length shifts every later byte, so byte-level fuzzing would not repeat.
        ds.compress(transfer_syntax, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _apply_extra(ds: Dataset, extra: Mapping[str, Any]) -> None:
    """Set extra tags by keyword; ``None`` deletes the tag (to build malformed files)."""
    for keyword, value in extra.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


# --------------------------------------------------------------------------------------
# series of single-frame slices
# --------------------------------------------------------------------------------------
def write_series(
    folder: str | Path,
    array_ijk: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    modality: str = "CT",
    rescale: Rescale | Sequence[Rescale] = (1.0, -1024.0),
    series_description: str = "AXIAL",
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    shuffle_files: bool = True,
    seed: int = 0,
    file_names: Literal["random", "instance", "index", "sentinel"] = "random",
    tilt_deg: float = 0.0,
    slice_positions: Sequence[float] | None = None,
    missing_indices: Sequence[int] = (),
    instance_numbers: Literal["normal", "reversed", "missing", "duplicate"] = "normal",
    transfer_syntax: str = ExplicitVRLittleEndian,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    time_tags: Sequence[str] = ("AcquisitionNumber", "TemporalPositionIdentifier"),
    identifiers: bool = True,
    n_private_tags: int = 0,
    per_slice_tags: Mapping[int, Mapping[str, Any]] | None = None,
    **extra_tags: Any,
) -> list[Path]:
    """Write one DICOM series, one file per slice; return the written paths (write order).

    Parameters
    ----------
    folder:
        Created if needed. Files go directly in it.
    array_ijk:
        Values in real units (HU for CT), shape (I, J, K) = (columns, rows, slices), or
        (I, J, K, T) for T time points / phases at the same K positions (each time point is
        tagged with ``time_tags`` = t + 1; pass ``time_tags=()`` for an inseparable series).
    affine, spacing:
        Voxel-to-RAS geometry of the stack (default: axial with ``spacing``).
    rescale:
        ``(slope, intercept)`` for every slice, or one pair per slice (per-slice rescale).
    series_uid, study_uid:
        Default: derived from ``seed`` and ``series_number`` (deterministic).
    shuffle_files:
        Write files in a seeded random order (and so with names in random order).
    file_names:
        ``"random"`` seeded hex names without extension, ``"instance"`` ``IM{InstanceNumber}``,
        ``"index"`` ``{write order:04d}.dcm``, ``"sentinel"`` names holding a patient name.
    tilt_deg:
        Gantry tilt: image planes rotated about the row direction, slice step unchanged
        (see :func:`series_affine`).
    slice_positions:
        Distances in mm of each slice along the slice-step direction (uneven spacing);
        default ``k * |step|``.
    missing_indices:
        Slice indices not written (a gap).
    instance_numbers:
        ``"normal"`` (1..K in spatial order), ``"reversed"``, ``"missing"`` (tag absent) or
        ``"duplicate"`` (all 1).
    transfer_syntax:
        Any syntax pydicom can encode here (explicit/implicit VR LE, RLE Lossless, JPEG 2000
        Lossless).
    identifiers:
        Plant :data:`SENTINELS`, a free-text comment and a private tag (default True).
    n_private_tags:
        Add that many vendor-like private tags per file.
    per_slice_tags:
        ``{k: {keyword: value}}`` set on slice k (all time points); ``None`` deletes a tag.
    extra_tags:
        ``keyword=value`` set on every file after everything else; ``None`` deletes a tag
        (e.g. ``ImagePositionPatient=None`` for a series without geometry).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array_ijk, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"array_ijk must be 3D or 4D, got shape {arr.shape}")
    ni, nj, nk, nt = arr.shape
    aff = series_affine((ni, nj, nk), affine=affine, spacing=spacing, tilt_deg=tilt_deg)
    lps = _lps_ras(aff)
    row_vec, col_vec, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing = float(np.linalg.norm(row_vec))  # spacing between columns (along a row)
    row_spacing = float(np.linalg.norm(col_vec))
    iop = [*(row_vec / col_spacing), *(col_vec / row_spacing)]
    step_len = float(np.linalg.norm(step))
    offsets = (
        np.arange(nk, dtype=float) * step_len
        if slice_positions is None
        else np.asarray(slice_positions, dtype=float)
    )
    if offsets.shape != (nk,):
        raise ValueError("slice_positions needs one value per slice")
    positions = [lps[:3, 3] + offsets[k] * step / step_len for k in range(nk)]
    normal = np.cross(iop[:3], iop[3:])

    if isinstance(rescale[0], (int, float, np.floating, np.integer)):
        rescales = [tuple(rescale)] * nk  # type: ignore[arg-type]
    else:
        rescales = [tuple(r) for r in rescale]  # type: ignore[union-attr]
    if len(rescales) != nk:
        raise ValueError("rescale needs one (slope, intercept) per slice")
    stored = np.empty_like(arr)
    for k, (slope, intercept) in enumerate(rescales):
        stored[:, :, k, :] = np.rint((arr[:, :, k, :] - intercept) / slope)
    dtype, signed = _stored_dtype(stored, "write_series")
    stored_int = stored.astype(dtype)

    study_uid = study_uid or _uid("study", seed)
    series_uid = series_uid or _uid("series", seed, series_number)
    frame_of_ref = _uid("for", study_uid)
    sop_class = _SOP_CLASS.get(modality.upper(), _SECONDARY_CAPTURE)
    rng = np.random.default_rng(seed)

    jobs = [(t, k) for t in range(nt) for k in range(nk) if k not in set(missing_indices)]
    order = rng.permutation(len(jobs)) if shuffle_files else np.arange(len(jobs))
    n_written = len(jobs)
    paths: list[Path] = []
    used_names: set[str] = set()
    for write_idx, job_idx in enumerate(order):
        t, k = jobs[int(job_idx)]
        spatial_rank = t * nk + k
        if instance_numbers == "normal":
            inst: int | None = spatial_rank + 1
        elif instance_numbers == "reversed":
            inst = nt * nk - spatial_rank
        elif instance_numbers == "duplicate":
            inst = 1
        else:
            inst = None
        sop_uid = _uid("sop", series_uid, t, k)
        ds = _base_dataset(
            sop_class=sop_class,
            sop_instance=sop_uid,
            transfer_syntax=transfer_syntax,
            identifiers=identifiers,
        )
        ds.ImageType = list(image_type)
        ds.Modality = modality
        ds.SeriesDescription = series_description
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_ref
        ds.SeriesNumber = series_number
        if inst is not None:
            ds.InstanceNumber = inst
        if nt > 1:
            for tag in time_tags:
                setattr(ds, tag, t + 1)
            if "TemporalPositionIdentifier" in time_tags:
                ds.NumberOfTemporalPositions = nt
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.SliceLocation = _ds(float(np.dot(positions[k], normal)))
        ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
        ds.SliceThickness = _ds(step_len)
        if modality.upper() == "CT":
            ds.KVP = "120"
            ds.ConvolutionKernel = "STANDARD"
            ds.RescaleType = "HU"
        elif modality.upper() == "MR":
            ds.MagneticFieldStrength = _ds(1.5)
            ds.RepetitionTime = _ds(2000.0)
            ds.EchoTime = _ds(30.0)
        slope, intercept = rescales[k]
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        _set_pixels(ds, stored_int[:, :, k, t].T, signed=signed, bits_stored=16)
        _add_private_tags(ds, n_private_tags)
        if per_slice_tags and k in per_slice_tags:
            _apply_extra(ds, per_slice_tags[k])
        _apply_extra(ds, extra_tags)

        if file_names == "random":
            name = f"{int(rng.integers(0, 2**62)):016x}"
        elif file_names == "instance":
            name = f"IM{(inst if inst is not None else spatial_rank + 1):05d}"
        elif file_names == "index":
            name = f"{write_idx:04d}.dcm"
        elif file_names == "sentinel":
            name = f"{SENTINEL_FILE_STEM}_{write_idx:04d}.dcm"
        else:
            raise ValueError(f"unknown file_names {file_names!r}")
        while name in used_names:  # duplicate instance numbers: keep every file
            name = name + "_"
        used_names.add(name)
        paths.append(_save(ds, folder / name, transfer_syntax))
    assert len(paths) == n_written
    return paths


# --------------------------------------------------------------------------------------
# projection radiographs
# --------------------------------------------------------------------------------------
def write_radiograph(
    path: str | Path,
    array_ij: np.ndarray,
    *,
    modality: str = "DX",
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2",
    pixel_spacing: Sequence[float] | None = (0.2, 0.2),
    imager_pixel_spacing: Sequence[float] | None = None,
    window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    voi_lut: Mapping[str, Any] | None = None,
    rescale: Rescale | None = None,
    bits_stored: int = 12,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    identifiers: bool = True,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY"),
    **extra_tags: Any,
) -> Path:
    """Write a projection radiograph (CR / DX / DR / MG), single- or multi-frame.

    ``array_ij`` holds *stored* pixel values (non-negative integers below
    ``2**bits_stored``), shape (I, J) = (columns, rows), or (I, J, F) for F frames.
    ``pixel_spacing`` / ``imager_pixel_spacing`` are DICOM-ordered (row spacing, column
    spacing); either may be None. ``window`` is ``(center, width)`` or several such pairs.
    ``voi_lut`` is ``{"lut": 1-D int array, "first_mapped": int, "bits": int}`` and becomes
    a VOILUTSequence item. ``rescale`` (slope, intercept) is written when given.
    """
    path = Path(path)
    arr = np.asarray(array_ij)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError("array_ij must be (I, J) or (I, J, F)")
    if arr.min() < 0 or arr.max() >= 2**bits_stored:
        raise ValueError(f"stored values must lie in [0, 2**{bits_stored})")
    nf = arr.shape[2]
    sop_class = _SOP_CLASS.get(modality.upper(), _SECONDARY_CAPTURE)
    sop_uid = _uid("xray", seed, str(path.name))
    ds = _base_dataset(
        sop_class=sop_class,
        sop_instance=sop_uid,
        transfer_syntax=transfer_syntax,
        identifiers=identifiers,
    )
    ds.ImageType = list(image_type)
    ds.Modality = modality
    ds.SeriesDescription = "CHEST PA"
    ds.StudyInstanceUID = _uid("study", seed)
    ds.SeriesInstanceUID = _uid("xseries", seed, str(path.name))
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.KVP = "110"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PhotometricInterpretation = photometric
    if pixel_spacing is not None:
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [_ds(v) for v in imager_pixel_spacing]
    if rescale is not None:
        ds.RescaleSlope = _ds(rescale[0])
        ds.RescaleIntercept = _ds(rescale[1])
        ds.RescaleType = "US"
    if window is not None:
        pairs = [window] if isinstance(window[0], (int, float)) else list(window)  # type: ignore[index]
        ds.WindowCenter = [_ds(c) for c, _ in pairs] if len(pairs) > 1 else _ds(pairs[0][0])
        ds.WindowWidth = [_ds(w) for _, w in pairs] if len(pairs) > 1 else _ds(pairs[0][1])
    if voi_lut is not None:
        lut = np.asarray(voi_lut["lut"], dtype="<u2")
        item = Dataset()
        item.LUTDescriptor = [len(lut) if len(lut) < 65536 else 0, int(voi_lut["first_mapped"]),
                              int(voi_lut.get("bits", 16))]
        item.LUTExplanation = "SYNTHETIC VOI"
        item.LUTData = lut.tobytes()
        ds.VOILUTSequence = DicomSequence([item])
        # pydicom needs the explicit VR for LUTData in a sequence.
        item["LUTData"].VR = "OW"
        item["LUTDescriptor"].VR = "US"
    if nf > 1:
        ds.NumberOfFrames = nf
    frames = np.transpose(arr, (2, 1, 0)).astype("<u2")  # (F, rows, cols)
    _set_pixels(ds, frames if nf > 1 else frames[0], signed=0, bits_stored=bits_stored)
    _apply_extra(ds, extra_tags)
    return _save(ds, path, transfer_syntax)


# --------------------------------------------------------------------------------------
# enhanced multi-frame CT / MR
# --------------------------------------------------------------------------------------
def write_enhanced_multiframe(
    path: str | Path,
    array_ijk: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 3.0),
    modality: Literal["CT", "MR"] = "MR",
    rescale: Rescale | Sequence[Rescale] = (1.0, 0.0),
    shuffle_frames: bool = False,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "NONE"),
    identifiers: bool = True,
    series_description: str = "ENHANCED",
    **extra_tags: Any,
) -> Path:
    """Write one enhanced multi-frame CT/MR file with per-frame functional groups.

    ``array_ijk`` is (I, J, K) or (I, J, K, T) in real units. Each frame carries
    PlanePositionSequence (IPP), FrameContentSequence (InStackPositionNumber,
    TemporalPositionIndex, DimensionIndexValues) and, when ``rescale`` is a per-frame list
    (one pair per frame in (t, k) order), its own PixelValueTransformationSequence; the
    orientation, pixel measures and a single rescale are in the shared functional groups.
    ``shuffle_frames`` stores frames in a seeded random order (a loader must sort them by
    position, not frame number).
    """
    path = Path(path)
    arr = np.asarray(array_ijk, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[..., None]
    ni, nj, nk, nt = arr.shape
    aff = series_affine((ni, nj, nk), affine=affine, spacing=spacing)
    lps = _lps_ras(aff)
    row_vec, col_vec, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing = float(np.linalg.norm(row_vec))
    row_spacing = float(np.linalg.norm(col_vec))
    iop = [*(row_vec / col_spacing), *(col_vec / row_spacing)]

    frames_tk = [(t, k) for t in range(nt) for k in range(nk)]
    per_frame_rescale = not isinstance(rescale[0], (int, float, np.floating, np.integer))
    rescales = (
        [tuple(r) for r in rescale]  # type: ignore[union-attr]
        if per_frame_rescale
        else [tuple(rescale)] * len(frames_tk)  # type: ignore[arg-type]
    )
    if len(rescales) != len(frames_tk):
        raise ValueError("per-frame rescale needs one (slope, intercept) per frame")
    stored = np.empty((len(frames_tk), nj, ni), dtype=np.float64)
    for f, (t, k) in enumerate(frames_tk):
        slope, intercept = rescales[f]
        stored[f] = np.rint((arr[:, :, k, t].T - intercept) / slope)
    dtype, signed = _stored_dtype(stored, "write_enhanced_multiframe")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frames_tk)) if shuffle_frames else np.arange(len(frames_tk))

    sop_class = _ENHANCED_SOP_CLASS[modality.upper()]
    sop_uid = _uid("enh", seed, str(path.name))
    ds = _base_dataset(
        sop_class=sop_class,
        sop_instance=sop_uid,
        transfer_syntax=transfer_syntax,
        identifiers=identifiers,
    )
    ds.ImageType = list(image_type)
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.StudyInstanceUID = _uid("study", seed)
    ds.SeriesInstanceUID = _uid("enh-series", seed, str(path.name))
    ds.FrameOfReferenceUID = _uid("for", ds.StudyInstanceUID)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ContentDate = "20200101"
    ds.ContentTime = "120000"
    ds.AcquisitionDateTime = "20200101120000"
    if modality.upper() == "MR":
        ds.MagneticFieldStrength = _ds(3.0)
    else:
        ds.KVP = "120"

    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [_ds(v) for v in iop]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    measures.SliceThickness = _ds(float(np.linalg.norm(step)))
    shared.PixelMeasuresSequence = DicomSequence([measures])
    if not per_frame_rescale:
        pvt = Dataset()
        pvt.RescaleSlope = _ds(rescales[0][0])
        pvt.RescaleIntercept = _ds(rescales[0][1])
        pvt.RescaleType = "HU" if modality.upper() == "CT" else "US"
        shared.PixelValueTransformationSequence = DicomSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    pixel_frames = []
    for f in order:
        t, k = frames_tk[int(f)]
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + k * step]
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = t + 1
        content.DimensionIndexValues = [t + 1, k + 1]
        item.FrameContentSequence = DicomSequence([content])
        if per_frame_rescale:
            pvt = Dataset()
            pvt.RescaleSlope = _ds(rescales[int(f)][0])
            pvt.RescaleIntercept = _ds(rescales[int(f)][1])
            pvt.RescaleType = "HU" if modality.upper() == "CT" else "US"
            item.PixelValueTransformationSequence = DicomSequence([pvt])
        per_frame.append(item)
        pixel_frames.append(stored[int(f)])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(per_frame)
    _set_pixels(ds, np.stack(pixel_frames).astype(dtype), signed=signed, bits_stored=16)
    _apply_extra(ds, extra_tags)
    return _save(ds, path, transfer_syntax)


# --------------------------------------------------------------------------------------
# Siemens mosaics
# --------------------------------------------------------------------------------------
def _csa2_header(tags: Mapping[str, tuple[str, Sequence[str]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``{name: (vr, [values])}``, the layout
    nibabel's ``csareader`` reads (SPM's specification)."""
    out = bytearray(b"SV10\x04\x03\x02\x01")
    out += struct.pack("<2I", len(tags), 77)
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0,
                           len(values), 77)
        for value in values:
            data = value.encode() + b"\0"
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data + b"\0" * (-len(data) % 4)
    return bytes(out)


def write_mosaic(
    folder: str | Path,
    array_ijk: np.ndarray,
    *,
    n_images: int | None = None,
    matrix: tuple[int, int] | None = None,
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    seed: int = 0,
    identifiers: bool = True,
) -> Path:
    """One Siemens mosaic file: the K slices of ``array_ijk`` (I, J, K) tiled row by row in
    a ceil(sqrt(K)) square grid, with a CSA image header declaring NumberOfImagesInMosaic.

    ``n_images`` overrides the declared slice count and ``matrix`` (rows, columns) pads or
    crops the tiled image, to build mosaics whose header and matrix disagree.
    """
    arr = np.asarray(array_ijk, dtype=np.float64)
    ni, nj, nk = arr.shape
    side = int(np.ceil(np.sqrt(nk)))
    tiled = np.zeros((side * nj, side * ni))
    for k in range(nk):
        r, c = divmod(k, side)
        tiled[r * nj : (r + 1) * nj, c * ni : (c + 1) * ni] = arr[:, :, k].T
    if matrix is not None:
        out = np.zeros(matrix)
        rows, cols = min(matrix[0], tiled.shape[0]), min(matrix[1], tiled.shape[1])
        out[:rows, :cols] = tiled[:rows, :cols]
        tiled = out
    folder = Path(folder)
    path = write_series(
        folder, tiled.T[:, :, None], spacing=spacing, modality="MR", rescale=(1.0, 0.0),
        image_type=("ORIGINAL", "PRIMARY", "M", "MOSAIC"), seed=seed, file_names="index",
        identifiers=identifiers,
    )[0]
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    csa = _csa2_header({
        "NumberOfImagesInMosaic": ("US", [str(n_images if n_images is not None else nk)]),
        "AcquisitionMatrixText": ("SH", [f"{nj}p*{ni}"]),
        "SliceNormalVector": ("FD", ["0.0", "0.0", "1.0"]),
    })
    block.add_new(0x10, "OB", csa)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------
# malformed inputs
# --------------------------------------------------------------------------------------
def write_huge_header(
    path: str | Path,
    *,
    rows: int = 60000,
    columns: int = 60000,
    frames: int = 1000,
    modality: str = "DX",
    seed: int = 0,
) -> Path:
    """A DICOM file whose header declares ``rows x columns x frames`` 16-bit pixels while
    its PixelData holds only a few bytes (must be refused from the header alone)."""
    path = Path(path)
    ds = _base_dataset(
        sop_class=_SOP_CLASS.get(modality, _SECONDARY_CAPTURE),
        sop_instance=_uid("huge", seed),
        transfer_syntax=ExplicitVRLittleEndian,
        identifiers=True,
    )
    ds.Modality = modality
    ds.StudyInstanceUID = _uid("study", seed)
    ds.SeriesInstanceUID = _uid("huge-series", seed)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [_ds(0.1), _ds(0.1)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = b"\0" * 16
    return _save(ds, path, ExplicitVRLittleEndian)


def truncate_file(path: str | Path, *, remove_bytes: int = 200) -> Path:
    """Cut ``remove_bytes`` off the end of a file in place (truncated pixel data; on an
    encapsulated file this also loses the sequence delimiter)."""
    path = Path(path)
    data = path.read_bytes()
    if remove_bytes >= len(data):
        raise ValueError("would remove the whole file")
    path.write_bytes(data[: len(data) - remove_bytes])
    return path


def write_non_dicom_files(folder: str | Path) -> list[Path]:
    """Files that must be skipped: a text note, a fake PDF, a DICOMDIR (a DICOM file
    without an image), a hidden macOS file and an empty file. Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    note = folder / "notes.txt"
    note.write_text("radiology notes: nothing to see\n")
    out.append(note)
    pdf = folder / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n")
    out.append(pdf)
    ds_store = folder / ".DS_Store"
    ds_store.write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(64)))
    out.append(ds_store)
    empty = folder / "empty.dcm"
    empty.write_bytes(b"")
    out.append(empty)
    dicomdir = _base_dataset(
        sop_class=_DICOMDIR_CLASS,
        sop_instance=_uid("dicomdir", str(folder.name)),
        transfer_syntax=ExplicitVRLittleEndian,
        identifiers=True,
    )
    dicomdir.FileSetID = "MEDFUSION"
    dicomdir.DirectoryRecordSequence = DicomSequence([])
    out.append(_save(dicomdir, folder / "DICOMDIR", ExplicitVRLittleEndian))
    return out


def read_back(path: str | Path) -> Dataset:
    """Read a written file with pydicom (convenience for tests)."""
    return pydicom.dcmread(str(path))
