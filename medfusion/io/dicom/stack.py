"""Stack assembly: 2D slices (single-frame files or enhanced frames) to one volume and its
affine, as a sequence of named steps (see :func:`_assemble_stack` and ``docs/dicom.md``).

Each step states what it takes, what it returns and what it refuses with which code;
``tests/test_dicom_steps.py`` tests them one by one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfusion.errors import (
    CorruptFileError,
    GeometryError,
    InvalidValuesError,
    MissingSlicesError,
)
from medfusion.io.dicom.geometry import (
    _IOP_UNIT_TOL,
    _MAX_EXTENT_MM,
    _check_pixel_spacing,
    _check_positions,
    _lps_to_ras,
)
from medfusion.io.dicom.pixels import _FLOAT32_MAX, _rescale_bound
from medfusion.io.dicom.resample import _equalized_positions, _resample_grid, _resample_stack
from medfusion.io.limits import check_declared_size
from medfusion.types import Finding


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
