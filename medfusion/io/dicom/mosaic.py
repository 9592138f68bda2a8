"""Siemens mosaics (several slices tiled in one image), unpacked with nibabel's CSA-aware
DICOM wrapper."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medfusion.errors import (
    CorruptFileError,
    GeometryError,
    InvalidValuesError,
    UnsupportedInputError,
)
from medfusion.io.dicom.geometry import _lps_to_ras
from medfusion.io.dicom.guard import _TRUNC_FIX, _is_input_failure
from medfusion.io.dicom.headers import SeriesInfo, _check_header_size, _FileHeader, _int
from medfusion.io.dicom.meta import _meta
from medfusion.io.dicom.pixels import _check_pixel_module, _full_dataset
from medfusion.types import Finding, Volume


def _is_mosaic(ds: Any) -> bool:
    value = ds.get("ImageType") or []
    values = [value] if isinstance(value, str) else list(value)
    return "MOSAIC" in [str(v).upper() for v in values]


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


def _read_mosaic_file(h: _FileHeader, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One mosaic file unpacked by nibabel: (data (rows, cols, slices) float32, LPS affine
    over (row, col, slice)). Refuses an unreadable CSA header (``UNSUPPORTED_INPUT``), a
    tile grid that does not divide the matrix (``INVALID_MOSAIC``), unreadable pixels or
    geometry (``CORRUPT``) and a rescale that makes voxels non-finite (``INVALID_VALUES``)."""
    from nibabel.nicom import dicomwrappers

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
    return data, affine


def _load_mosaic(headers: Sequence[_FileHeader], info: SeriesInfo, *, what: str) -> Volume:
    """Siemens mosaics (several slices tiled in one image, one file per time point).

    Tiles, slice order and the corrected position of the first slice come from the Siemens
    CSA header through nibabel's DICOM wrapper (``nibabel.nicom.dicomwrappers``), the same
    logic as dcm2niix; one file is one 3D volume, several files are time points (4D)
    ordered by AcquisitionNumber then InstanceNumber.
    """
    volumes: list[tuple[tuple[int, int, int], np.ndarray, np.ndarray]] = []
    for n, h in enumerate(headers):
        data, affine = _read_mosaic_file(h, f"{what}, file #{n + 1}")
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
