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
from medfusion.stages import timed
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
_SPACING_REL_TOL = 0.01  # |gap - median| / median under this is float jitter
# ... or under this many mm: positions written with 2 decimals jitter gaps by up to 0.01 mm
_SPACING_ABS_TOL_MM = 0.015
_TILT_MIN_DEG = 0.1


@dataclass(frozen=True)
class _Axes:
    """The in-plane directions and pixel spacing every slice of a stack shares (LPS)."""

    row: np.ndarray  # unit vector along a row (increasing column index)
    col: np.ndarray  # unit vector along a column (increasing row index)
    normal: np.ndarray  # cross(row, col): the direction slices are stacked along
    row_spacing: float  # PixelSpacing[0]: mm between adjacent rows
    col_spacing: float  # PixelSpacing[1]: mm between adjacent columns


def _finite_rescale(slices: Sequence[_Slice], what: str, max_stored: float) -> None:
    """Step 3: refuse a rescale that makes voxels invalid (``INVALID_VALUES``): NaN/inf, a
    zero slope (every voxel the intercept), or values past float32's range (finite in
    float64, inf once converted). ``max_stored`` bounds the magnitude of a stored value
    (2 ** BitsAllocated)."""
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


# --------------------------------------------------------------------------------------
# The steps of _assemble_stack, in the order it runs them. Header-only steps come first so
# that a bad series is refused (strict included) before any pixel is read.
# --------------------------------------------------------------------------------------
def _check_slice_headers(slices: Sequence[_Slice], what: str) -> None:
    """Step 1: every slice carries a geometry and all share one matrix and pixel spacing.

    Input: the slices in any order. Refuses: no slice (``CORRUPT``); a slice without
    ImagePositionPatient, ImageOrientationPatient or PixelSpacing (``MISSING_GEOMETRY``;
    no identity geometry is ever invented); a PixelSpacing that is not finite, not positive
    or below 1 micrometre (``INVALID_PIXEL_SPACING``); slices of different sizes or pixel
    spacings (``INCONSISTENT_GEOMETRY``).
    """
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


def _slice_axes(slices: Sequence[_Slice], what: str) -> _Axes:
    """Step 2: the shared row / column / normal directions and spacings of the slices.

    Input: slices that passed :func:`_check_slice_headers`. Output: :class:`_Axes` from the
    first slice (row and column cosines normalised, ``normal = row x column``). Refuses:
    non-finite cosines, cosines far from unit length (over ``_IOP_UNIT_TOL``: not
    direction cosines) or not perpendicular (``INVALID_ORIENTATION``); slices whose
    orientations differ (``INCONSISTENT_GEOMETRY``); a zero cosine vector
    (``MISSING_GEOMETRY``).
    """
    s0 = slices[0]
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
    return _Axes(row=row, col=col, normal=np.cross(row, col),
                 row_spacing=float(s0.pixel_spacing[0]), col_spacing=float(s0.pixel_spacing[1]))


def _slice_positions(
    slices: Sequence[_Slice], axes: _Axes, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 (after :func:`_finite_rescale`): every slice's position.

    Output: ``(ipps (N, 3), dist (N,))``, ImagePositionPatient in mm and its projection on
    the slice normal, in the order of ``slices``. Refuses positions that are not finite
    (``INVALID_POSITION``) or that no scanner produces: over 100 m from the origin, or an
    image extent over 10 m (``IMPLAUSIBLE_GEOMETRY``).
    """
    s0 = slices[0]
    ipps = np.asarray([s.ipp for s in slices], dtype=np.float64)
    _check_positions(ipps, axes.normal,
                     (s0.rows * axes.row_spacing, s0.cols * axes.col_spacing), what)
    return ipps, ipps @ axes.normal


def _order_by_position(slices: Sequence[_Slice], dist: np.ndarray) -> list[int]:
    """Step 5: slice indices in spatial order along the normal.

    Input: the slices and their distances along the normal (:func:`_slice_positions`).
    Output: indices sorted by distance, rounded to ``_POS_TOL_MM`` so that float noise does
    not reorder a shared position; only slices sharing a position are then ordered by
    InstanceNumber, file and frame (a deterministic order for the duplicate and time point
    steps). File order and InstanceNumber never move a slice to another position. Refuses
    nothing.
    """
    return sorted(
        range(len(slices)),
        key=lambda i: (round(float(dist[i]) / _POS_TOL_MM), slices[i].instance_number or 0,
                       slices[i].file_index, slices[i].frame),
    )


def _group_positions(
    order: Sequence[int], dist: np.ndarray, ipps: np.ndarray, axes: _Axes, what: str
) -> list[list[int]]:
    """Step 6: the ordered slices grouped by position (one group per output slice).

    Input: :func:`_order_by_position`'s order, the distances and positions. Output: lists
    of slice indices, in spatial order; a slice joins the current group when it lies within
    ``_POS_TOL_MM`` of the group's first slice along the normal. Refuses a group whose
    members lie at different in-plane positions (over 5 % of a pixel): two stacks in one
    series (``INCONSISTENT_GEOMETRY``).
    """
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(dist[i] - dist[groups[-1][0]]) <= _POS_TOL_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in groups:
        if len(g) > 1:
            spread = ipps[g] - ipps[g[0]]
            pixel = min(axes.row_spacing, axes.col_spacing)
            if np.abs(spread).max() > 0.05 * pixel + _POS_TOL_MM:
                raise GeometryError(
                    f"{what}: slices at the same depth lie at different in-plane positions "
                    "(two stacks in one series). Split the series before loading.",
                    code="INCONSISTENT_GEOMETRY",
                )
    return groups


def _detect_tilt(kipp: np.ndarray, axes: _Axes) -> float:
    """Step 7: the gantry tilt in degrees, 0.0 when the stack is not sheared.

    Input: the position of each group's first slice (K, 3), in spatial order. The tilt is
    the angle between the first-to-last slice vector and the normal; it counts only from
    ``_TILT_MIN_DEG`` and when the in-plane drift reaches 5 % of a pixel (float noise in
    positions is no tilt). Fewer than two positions: 0.0. Refuses nothing (strict mode
    refuses a tilt in :func:`_refuse_or_record_spacing`).
    """
    if len(kipp) < 2:
        return 0.0
    span = kipp[-1] - kipp[0]
    along = float(span @ axes.normal)
    inplane = span - along * axes.normal
    drift = float(np.linalg.norm(inplane))
    tilt_deg = math.degrees(math.atan2(drift, abs(along))) if along != 0 else 90.0
    if tilt_deg < _TILT_MIN_DEG or drift < 0.05 * min(axes.row_spacing, axes.col_spacing):
        tilt_deg = 0.0
    return tilt_deg


def _detect_uneven(d: np.ndarray) -> tuple[bool, list[float]]:
    """Step 8: whether the slice spacing is uneven, and where slices are missing.

    Input: the distances along the normal of the unique positions, ascending. Output:
    ``(irregular, missing_mm)``. A gap counts as uneven when it differs from the median gap
    by more than ``_SPACING_REL_TOL`` of it and more than ``_SPACING_ABS_TOL_MM`` (positions
    written with few decimals jitter). ``missing_mm`` lists the positions (mm along the
    normal, 3 decimals) of slices missing from an otherwise regular series: every gap a
    whole multiple of the smallest one, most gaps that smallest one. Empty when the
    spacing changes on purpose. Refuses nothing.
    """
    if len(d) < 2:
        return False, []
    gaps = np.diff(d)
    med = float(np.median(gaps))
    tol = max(_SPACING_REL_TOL * med, _SPACING_ABS_TOL_MM)
    if not np.any(np.abs(gaps - med) > tol):
        return False, []
    missing_mm: list[float] = []
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
    return True, missing_mm


def _refuse_or_record_spacing(
    d: np.ndarray, irregular: bool, missing_mm: list[float], tilt_deg: float, *,
    strict: bool, what: str,
) -> list[Finding]:
    """Step 9: what strict mode refuses and the default records, before any pixel is read.

    Input: the unique positions ``d`` and the results of :func:`_detect_uneven` and
    :func:`_detect_tilt`. Output: the ``MISSING_SLICES`` finding when slices are missing
    (the default fills the gap by resampling). Under ``strict`` refuses, in this order,
    missing slices (``MissingSlicesError``, ``MISSING_SLICES``), uneven spacing
    (``UNEVEN_SPACING``) and gantry tilt (``GANTRY_TILT``).
    """
    findings: list[Finding] = []
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
    return findings


def _plan_resample(
    d: np.ndarray, kipp: np.ndarray, axes: _Axes, rows: int, cols: int, what: str
) -> tuple[np.ndarray, float, np.ndarray]:
    """Step 10 (uneven spacing or tilt only): the regular grid to resample onto.

    Input: unique positions along the normal ``d`` and in space ``kipp``, the axes and the
    slice matrix. Output: ``(targets, step, offsets)``: target distances along the normal
    (dcm2niix's equalisation, :func:`_equalized_positions`), their spacing, and each
    slice's in-plane offset from the first in (row, col) pixels. The output grid grows
    with the in-plane drift and the number of targets, so its size is checked against the
    limits from the header values, before any pixel is read (``LIMIT_EXCEEDED``).
    """
    targets, step = _equalized_positions(d)
    offsets = np.stack(
        [((kipp - kipp[0]) @ axes.col) / axes.row_spacing,
         ((kipp - kipp[0]) @ axes.row) / axes.col_spacing],
        axis=1,
    )
    _, _, grid_rows, grid_cols = _resample_grid(offsets, rows, cols)
    check_declared_size((grid_cols, grid_rows, len(targets)), 4,
                        f"{what} (resampled onto a regular grid)")
    return targets, step, offsets


def _read_planes(
    order: list[int],
    read_plane: Callable[[list[int], np.ndarray], list[bool]],
    rows: int,
    cols: int,
    what: str,
) -> tuple[np.ndarray, list[Finding]]:
    """Step 11: read and rescale every slice, in spatial order.

    Input: :func:`_order_by_position`'s order and the loader's ``read_plane``. Output:
    ``(buf (N, rows, cols) float32, findings)``; ``buf[n]`` is slice ``order[n]``; a
    ``ZERO_FRAME`` finding counts compressed frames that decoded to all zeros. Refuses a
    buffer over the limits (``LIMIT_EXCEEDED``); decoding errors come from ``read_plane``.
    """
    findings: list[Finding] = []
    n_all = len(order)
    check_declared_size((cols, rows, n_all), 4, what)
    buf = np.empty((n_all, rows, cols), dtype=np.float32)
    with timed("decode"):
        zero = read_plane(order, buf)
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
    return buf, findings


def _drop_identical(
    groups: list[list[int]], buf: np.ndarray, pos_of: dict[int, int]
) -> tuple[list[list[int]], int, list[Finding]]:
    """Step 12: drop slices whose pixels equal another's at the same position.

    Input: position groups (:func:`_group_positions`), the planes and ``pos_of`` (slice
    index -> row of ``buf``). Output: ``(groups, removed, findings)``: each group keeps the
    first of every set of identical planes, in order; ``DUPLICATE_SLICES_REMOVED`` counts
    the dropped ones. Different pixels at one position stay (time points or phases, see
    :func:`_split_time_points`). Refuses nothing.
    """
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
    findings: list[Finding] = []
    if removed:
        findings.append(
            Finding(
                "DUPLICATE_SLICES_REMOVED",
                f"{removed} slice(s) identical to another at the same position were dropped.",
                {"count": removed},
            )
        )
    return dedup_groups, removed, findings


def _split_time_points(
    groups: list[list[int]], slices: Sequence[_Slice], what: str
) -> tuple[list[list[int]], int, list[Finding], str | None]:
    """Step 13: separate several distinct images per position into time points (T axis).

    Input: deduplicated position groups. Output: ``(groups, t_count, findings, rule)``;
    with one image per position the groups come back unchanged, ``t_count`` 1 and ``rule``
    None; otherwise member t of every group is time point t, ordered by the first attribute
    that separates them (:func:`_separate_time`), recorded in ``MULTIPLE_TIME_POINTS``.
    Refuses positions holding different numbers of distinct images, or images that no
    attribute separates (``DUPLICATE_POSITIONS``).
    """
    counts = {len(g) for g in groups}
    if counts == {1}:
        return groups, 1, [], None
    if len(counts) != 1:
        raise GeometryError(
            f"{what}: slice positions hold different numbers of distinct images "
            f"({sorted(counts)}); time points or phases cannot be separated safely. "
            "Split the series before loading.",
            code="DUPLICATE_POSITIONS",
        )
    groups, rule = _separate_time(groups, slices, what)
    t_count = len(groups[0])
    finding = Finding(
        "MULTIPLE_TIME_POINTS",
        f"{t_count} images per slice position were separated by {rule} into a 4D "
        "volume (I, J, K, T).",
        {"n_time_points": t_count, "separated_by": rule},
    )
    return groups, t_count, [finding], rule


def _gather_planes(
    buf: np.ndarray, groups: list[list[int]], pos_of: dict[int, int], t_count: int
) -> np.ndarray:
    """Step 14: the planes as (K, T, rows, cols), K in spatial order, T in time order.

    Input: the planes read in spatial order, the final groups (K lists of T slice
    indices) and ``pos_of``. When every slice was kept as its own position the buffer is
    used as is (a view, no copy). Refuses nothing.
    """
    k_count = len(groups)
    if t_count == 1 and len(buf) == k_count:
        planes = buf  # already in spatial order, no copy
    else:
        idx = np.asarray([[pos_of[i] for i in g] for g in groups])  # (K, T)
        rows, cols = buf.shape[1:]
        planes = buf[idx.reshape(-1)].reshape(k_count, t_count, rows, cols)
    if planes.ndim == 3:
        planes = planes[:, None]  # (K, 1, rows, cols)
    return planes


def _plane_affine(axes: _Axes, origin: np.ndarray) -> np.ndarray:
    """The LPS affine's in-plane columns and origin; the slice column is set by the caller."""
    lps = np.eye(4)
    lps[:3, 0] = axes.row * axes.col_spacing
    lps[:3, 1] = axes.col * axes.row_spacing
    lps[:3, 3] = origin
    return lps


def _regular_affine(kipp: np.ndarray, axes: _Axes, thickness: float | None) -> np.ndarray:
    """Step 15a (regular stack): the LPS affine of slices already on a regular grid.

    Input: the positions of the K unique slices in spatial order. The slice column is the
    mean step from first to last position (exact on a regular grid, and it keeps the
    direction of the stack); one slice has no step, so SliceThickness (when plausible,
    ``0 < t <= 10 m``) or 1 mm along the normal is used. Refuses nothing.
    """
    lps = _plane_affine(axes, kipp[0])
    k_count = len(kipp)
    if k_count >= 2:
        lps[:3, 2] = (kipp[-1] - kipp[0]) / (k_count - 1)
    else:
        plausible = thickness is not None and 0 < thickness <= _MAX_EXTENT_MM
        step = thickness if plausible else 1.0
        lps[:3, 2] = axes.normal * step
    return lps


def _resample_planes(
    planes: np.ndarray,
    plan: tuple[np.ndarray, float, np.ndarray],
    d: np.ndarray,
    kipp: np.ndarray,
    axes: _Axes,
    *,
    irregular: bool,
    tilt_deg: float,
    what: str,
) -> tuple[np.ndarray, np.ndarray, list[Finding]]:
    """Step 15b (uneven spacing or tilt): resample onto :func:`_plan_resample`'s grid.

    Input: planes (K, T, rows, cols) in spatial order, the plan, the unique positions.
    Output: ``(planes (S, T, rows', cols'), LPS affine, findings)``: linear interpolation
    in world space, one time point at a time (voxels outside a slice take the minimum);
    the affine is orthogonal with the planned step along the normal.
    ``UNEVEN_SPACING_RESAMPLED`` and ``GANTRY_TILT_RESAMPLED`` record what was done
    (spacing is never averaged). Refuses an output over the limits (``LIMIT_EXCEEDED``).
    """
    targets, step, offsets = plan
    t_count, rows, cols = planes.shape[1:]
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
    lps = _plane_affine(axes, kipp[0])
    lps[:3, 2] = axes.normal * step
    lps[:3, 3] = (kipp[0] + origin_px[0] * axes.col * axes.row_spacing
                  + origin_px[1] * axes.row * axes.col_spacing)
    findings: list[Finding] = []
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
    return np.stack(outs, axis=1), lps, findings


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

    The steps, in order (each documents its contract and refusals): check the headers,
    derive the axes, check the rescale, project positions on the normal, order by
    position, group shared positions, detect tilt, detect uneven spacing and missing
    slices, refuse (strict) or record, plan the resampling grid, read the pixels, drop
    identical duplicates, split time points, gather the planes, then build the affine on
    the regular grid or resample onto one. ``modality`` is accepted for the callers'
    symmetry and not used.
    """
    _check_slice_headers(slices, what)
    axes = _slice_axes(slices, what)
    _finite_rescale(slices, what, max_stored)
    ipps, dist = _slice_positions(slices, axes, what)
    order = _order_by_position(slices, dist)
    groups = _group_positions(order, dist, ipps, axes, what)

    # geometry checks on unique positions, before any pixel is read (strict refuses fast)
    first = [g[0] for g in groups]
    d = dist[first]
    kipp = ipps[first]
    tilt_deg = _detect_tilt(kipp, axes)
    irregular, missing_mm = _detect_uneven(d)
    findings = _refuse_or_record_spacing(d, irregular, missing_mm, tilt_deg,
                                         strict=strict, what=what)
    rows, cols = slices[0].rows, slices[0].cols
    plan = _plan_resample(d, kipp, axes, rows, cols, what) if irregular or tilt_deg else None

    buf, read_findings = _read_planes(order, read_plane, rows, cols, what)
    pos_of = {idx: n for n, idx in enumerate(order)}
    groups, _removed, dup_findings = _drop_identical(groups, buf, pos_of)
    groups, t_count, time_findings, rule = _split_time_points(groups, slices, what)
    findings += read_findings + dup_findings + time_findings
    extra: dict[str, Any] = {}
    if rule is not None:
        extra["t_axis"] = rule
    planes = _gather_planes(buf, groups, pos_of, t_count)

    if plan is not None:
        planes, lps, resample_findings = _resample_planes(
            planes, plan, d, kipp, axes, irregular=irregular, tilt_deg=tilt_deg, what=what
        )
        findings += resample_findings
        extra["resampled"] = True
    else:
        lps = _regular_affine(kipp, axes, slices[0].thickness)
    # (K, T, rows, cols) -> (I, J, K, T): a transposed view (Fortran order), no copy
    arr = planes.transpose(3, 2, 0, 1)
    if t_count == 1:
        arr = arr[..., 0]
    return arr, _lps_to_ras(lps), findings, extra
