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
  and gantry tilt are in ``docs/dicom.md`` and in :func:`_assemble_stack`, whose named
  steps live in :mod:`medfusion.io.dicom.stack`.
* Nothing identifying leaves this module: series and studies are named by pseudonymous
  keys, metadata is an allow-list, messages carry no paths or UIDs.

The package: ``headers`` (header-only scan, series records, tag helpers), ``pixels``
(decoding), ``stack`` (assembly steps), ``series`` / ``enhanced`` / ``mosaic`` /
``radiograph`` (one reader per kind of input), ``geometry`` and ``resample``, ``meta``
and ``guard``; this ``__init__`` holds the public loaders and re-exports every helper
name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from medfusion.errors import (
    CorruptFileError,
    GeometryError,
    NotDicomError,
)

# Every name the single-module reader defined stays importable from here (callers and
# tests import private helpers too).
from medfusion.io.dicom.enhanced import (  # noqa: F401 - re-exported
    _dt_key,
    _enhanced_geometry,
    _enhanced_time_series,
    _file_time_keys,
    _load_enhanced,
    _load_enhanced_file,
    _slices_from_enhanced,
)
from medfusion.io.dicom.geometry import (  # noqa: F401 - re-exported
    _IOP_UNIT_TOL,
    _MAX_EXTENT_MM,
    _MAX_POSITION_MM,
    _MIN_SPACING_MM,
    _check_pixel_spacing,
    _check_positions,
    _lps_to_ras,
)
from medfusion.io.dicom.guard import (  # noqa: F401 - re-exported
    _TRUNC_FIX,
    _guarded,
    _is_decoder_panic,
    _is_input_failure,
)
from medfusion.io.dicom.headers import (  # noqa: F401 - re-exported
    _FAST_REFUSE,
    _FAST_WANTED,
    _HEADER_TAGS,
    _IDENTIFIER_TAGS,
    _TIME_TAGS,
    META_ALLOW_LIST,
    PROJECTION_MODALITIES,
    DicomScan,
    SeriesInfo,
    _check_header_size,
    _FileHeader,
    _first_fg,
    _float,
    _floats,
    _full_header,
    _header_iop,
    _identifier_strings,
    _int,
    _is_enhanced,
    _json_value,
    _make_info,
    _orientation_label,
    _read_header,
    _scrub,
    _sniff,
    _syntax_name,
    iter_files,
)
from medfusion.io.dicom.meta import (  # noqa: F401 - re-exported
    _CODE_STRING,
    _META_FREE,
    _META_NUMERIC,
    _meta,
    _meta_value,
)
from medfusion.io.dicom.mosaic import (  # noqa: F401 - re-exported
    _check_mosaic_layout,
    _is_mosaic,
    _load_mosaic,
)
from medfusion.io.dicom.pixels import (  # noqa: F401 - re-exported
    _FLOAT32_MAX,
    _GRAYSCALE,
    _INSTALL_HINT,
    _UNCOMPRESSED,
    _check_excess_pixels,
    _check_pixel_module,
    _decode_failure,
    _full_dataset,
    _is_compressed_syntax,
    _mask_bits,
    _max_stored,
    _pixel_dtype,
    _read_fast,
    _read_pydicom,
    _read_stored,
    _require_decoder,
    _rescale_bound,
)
from medfusion.io.dicom.radiograph import (  # noqa: F401 - re-exported
    _MIN_WINDOW_WIDTH,
    _load_projection,
    _projection_frame,
    _projection_spacing,
    _voi_lut,
    _window,
)
from medfusion.io.dicom.resample import (  # noqa: F401 - re-exported
    _equalized_positions,
    _resample_grid,
    _resample_stack,
    _shift_linear,
)
from medfusion.io.dicom.series import (  # noqa: F401 - re-exported
    _is_localizer,
    _load_stack,
    _slices_from_header,
)
from medfusion.io.dicom.source import dicom_source
from medfusion.io.dicom.stack import (  # noqa: F401 - re-exported
    _POS_TOL_MM,
    _SPACING_ABS_TOL_MM,
    _SPACING_REL_TOL,
    _TILT_MIN_DEG,
    _assemble_stack,
    _finite_rescale,
    _separate_time,
    _Slice,
)
from medfusion.types import Volume

__all__ = [
    "DicomScan",
    "SeriesInfo",
    "dicom_source",
    "load_dicom_file",
    "load_series",
    "scan_dicom",
]


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
    volume = _checked_volume(volume, what)
    # the UIDs and identity a DICOM result object needs; no pixel data, never output
    return volume.replace(dicom=dicom_source(headers, info))


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
