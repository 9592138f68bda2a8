"""Enhanced multi-frame CT/MR: per-frame geometry from the functional groups, one file as a
3D/4D volume, and several files of one acquisition stacked as time points."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medfusion.errors import (
    CorruptFileError,
    GeometryError,
)
from medfusion.io.dicom.guard import _is_input_failure
from medfusion.io.dicom.headers import (
    SeriesInfo,
    _FileHeader,
    _first_fg,
    _float,
    _floats,
    _full_header,
    _int,
    _json_value,
)
from medfusion.io.dicom.meta import _meta
from medfusion.io.dicom.pixels import _check_pixel_module, _max_stored, _read_stored
from medfusion.io.dicom.stack import _assemble_stack, _Slice
from medfusion.io.limits import check_declared_size
from medfusion.types import Finding, Volume


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
