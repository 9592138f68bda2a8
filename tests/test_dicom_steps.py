"""Each named step of DICOM stack assembly (medfusion/io/dicom/stack.py), tested on its own.

Slices are built in memory (no files): every step takes header values, positions or
planes, so each contract (what it returns, what it refuses with which code) is checked
directly. The last tests run the whole assembly to check that the steps compose.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from medfusion.errors import MedfusionError, MissingSlicesError
from medfusion.io.dicom import _assemble_stack, _Slice
from medfusion.io.dicom.stack import (
    _POS_TOL_MM,
    _Axes,
    _check_slice_headers,
    _detect_tilt,
    _detect_uneven,
    _drop_identical,
    _finite_rescale,
    _gather_planes,
    _group_positions,
    _order_by_position,
    _plan_resample,
    _read_planes,
    _refuse_or_record_spacing,
    _regular_affine,
    _resample_planes,
    _slice_axes,
    _slice_positions,
    _split_time_points,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _slice(z: float, *, xy: tuple[float, float] = (0.0, 0.0), iop: Any = AXIAL,
           spacing: Any = (0.5, 0.5), rows: int = 4, cols: int = 3, inst: int | None = None,
           file_index: int = 0, time_keys: dict[str, Any] | None = None,
           slope: float = 1.0, thickness: float | None = None) -> _Slice:
    return _Slice(file_index=file_index, frame=0, ipp=(xy[0], xy[1], z), iop=iop,
                  pixel_spacing=spacing, rows=rows, cols=cols, slope=slope, intercept=0.0,
                  thickness=thickness, instance_number=inst, time_keys=time_keys or {})


def _axes(spacing: float = 0.5) -> _Axes:
    return _Axes(row=np.array([1.0, 0.0, 0.0]), col=np.array([0.0, 1.0, 0.0]),
                 normal=np.array([0.0, 0.0, 1.0]), row_spacing=spacing, col_spacing=spacing)


def _code(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(MedfusionError) as info:
        fn(*args, **kwargs)
    return info.value.code


# --- step 1: header checks -----------------------------------------------------------
def test_headers_refuse_missing_or_mixed_geometry() -> None:
    assert _code(_check_slice_headers, [], "s") == "CORRUPT"
    no_ipp = _slice(0.0)
    no_ipp.ipp = None
    assert _code(_check_slice_headers, [_slice(1.0), no_ipp], "s") == "MISSING_GEOMETRY"
    no_ps = _slice(0.0, spacing=None)
    assert _code(_check_slice_headers, [_slice(1.0), no_ps], "s") == "MISSING_GEOMETRY"
    assert _code(_check_slice_headers, [_slice(0.0), _slice(1.0, rows=5)],
                 "s") == "INCONSISTENT_GEOMETRY"
    assert _code(_check_slice_headers, [_slice(0.0, spacing=(-0.5, 0.5))],
                 "s") == "INVALID_PIXEL_SPACING"
    assert _code(_check_slice_headers, [_slice(0.0), _slice(1.0, spacing=(0.6, 0.6))],
                 "s") == "INCONSISTENT_GEOMETRY"
    _check_slice_headers([_slice(0.0), _slice(1.0)], "s")  # a consistent pair passes


# --- step 2: axes ----------------------------------------------------------------------
def test_axes_are_normalised_and_the_normal_is_row_cross_column() -> None:
    c, s = math.cos(0.3), math.sin(0.3)
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # an oblique coronal-like plane
    axes = _slice_axes([_slice(0.0, iop=iop, spacing=(0.7, 0.4))], "s")
    assert np.allclose(axes.normal, np.cross(iop[:3], iop[3:]))
    assert (axes.row_spacing, axes.col_spacing) == (0.7, 0.4)


@pytest.mark.parametrize(("iops", "code"), [
    ([(2.0, 0, 0, 0, 2.0, 0)], "INVALID_ORIENTATION"),  # not direction cosines
    ([(1.0, 0, 0, 0.1, 0.995, 0)], "INVALID_ORIENTATION"),  # not perpendicular
    ([(float("nan"), 0, 0, 0, 1.0, 0)], "INVALID_ORIENTATION"),
    ([(0.0, 0, 0, 0, 1.0, 0)], "MISSING_GEOMETRY"),  # a zero vector
    ([AXIAL, (0, 1.0, 0, 0, 0, -1.0)], "INCONSISTENT_GEOMETRY"),  # two planes
])
def test_axes_refuse_bad_orientation(iops: list[Any], code: str) -> None:
    slices = [_slice(float(n), iop=iop) for n, iop in enumerate(iops)]
    assert _code(_slice_axes, slices, "s") == code


# --- step 3: rescale -------------------------------------------------------------------
def test_rescale_refuses_zero_slope_and_float32_overflow() -> None:
    assert _code(_finite_rescale, [_slice(0.0, slope=0.0)], "s", 2.0**16) == "INVALID_VALUES"
    assert _code(_finite_rescale, [_slice(0.0, slope=1e36)], "s", 2.0**16) == "INVALID_VALUES"
    _finite_rescale([_slice(0.0, slope=2.5)], "s", 2.0**16)


# --- step 4: positions -----------------------------------------------------------------
def test_positions_project_on_an_oblique_normal() -> None:
    iop = (1.0, 0.0, 0.0, 0.0, math.cos(0.4), math.sin(0.4))
    slices = [_slice(z, xy=(1.0, 2.0), iop=iop) for z in (0.0, 3.0)]
    axes = _slice_axes(slices, "s")
    ipps, dist = _slice_positions(slices, axes, "s")
    assert np.allclose(dist, ipps @ np.cross(iop[:3], iop[3:]))
    assert math.isclose(dist[1] - dist[0], 3.0 * axes.normal[2])


def test_positions_refuse_non_finite_and_implausible() -> None:
    axes = _axes()
    assert _code(_slice_positions, [_slice(float("inf"))], axes, "s") == "INVALID_POSITION"
    assert _code(_slice_positions, [_slice(0.0), _slice(2e5)], axes,
                 "s") == "IMPLAUSIBLE_GEOMETRY"


# --- step 5: order ---------------------------------------------------------------------
def test_order_follows_position_not_file_order_or_instance_number() -> None:
    rng = np.random.default_rng(0)
    z = np.arange(8) * 2.5
    for _ in range(5):
        perm = rng.permutation(8)
        inst = rng.permutation(8) + 1  # instance numbers unrelated to position
        slices = [_slice(float(z[p]), inst=int(inst[n]), file_index=n)
                  for n, p in enumerate(perm)]
        dist = np.array([s.ipp[2] for s in slices])
        order = _order_by_position(slices, dist)
        assert [slices[i].ipp[2] for i in order] == sorted(z.tolist())


def test_order_breaks_ties_at_one_position_by_instance_number() -> None:
    slices = [_slice(5.0, inst=3, file_index=0), _slice(0.0, inst=9, file_index=1),
              _slice(5.0 + _POS_TOL_MM / 10, inst=1, file_index=2)]
    dist = np.array([s.ipp[2] for s in slices])
    assert _order_by_position(slices, dist) == [1, 2, 0]


# --- step 6: groups --------------------------------------------------------------------
def test_groups_join_slices_within_the_tolerance() -> None:
    zs = [0.0, 0.0 + _POS_TOL_MM / 2, 2.5, 5.0, 5.0]
    slices = [_slice(z) for z in zs]
    ipps = np.array([s.ipp for s in slices])
    groups = _group_positions(range(5), ipps[:, 2], ipps, _axes(), "s")
    assert groups == [[0, 1], [2], [3, 4]]


def test_groups_refuse_two_stacks_at_one_depth() -> None:
    slices = [_slice(0.0), _slice(0.0, xy=(3.0, 0.0)), _slice(2.5)]
    ipps = np.array([s.ipp for s in slices])
    assert _code(_group_positions, [0, 1, 2], ipps[:, 2], ipps, _axes(),
                 "s") == "INCONSISTENT_GEOMETRY"


# --- step 7: tilt ----------------------------------------------------------------------
@pytest.mark.parametrize("tilt", [5.0, 18.5])
def test_tilt_is_measured_from_positions_against_the_normal(tilt: float) -> None:
    step = 2.0
    kipp = np.array([[0.0, k * step * math.tan(math.radians(tilt)), k * step]
                     for k in range(6)])
    assert math.isclose(_detect_tilt(kipp, _axes()), tilt, rel_tol=1e-9)


def test_tilt_ignores_sub_pixel_drift_and_single_slices() -> None:
    kipp = np.array([[0.0, 0.0, 0.0], [0.0, 0.01, 2.0], [0.0, 0.02, 4.0]])  # 4 % of a pixel
    assert _detect_tilt(kipp, _axes(spacing=0.5)) == 0.0
    assert _detect_tilt(kipp[:1], _axes()) == 0.0


# --- step 8: uneven spacing ------------------------------------------------------------
def test_uneven_ignores_float_jitter_of_written_positions() -> None:
    d = np.round(np.arange(10) * 0.833333, 2)  # positions written with two decimals
    assert _detect_uneven(d) == (False, [])


def test_uneven_names_the_missing_positions() -> None:
    d = np.delete(np.arange(10) * 2.5, [4, 7])
    irregular, missing = _detect_uneven(d)
    assert irregular
    assert missing == [10.0, 17.5]


def test_uneven_without_a_regular_base_is_no_gap() -> None:
    d = np.array([0.0, 1.0, 2.0, 5.0, 8.0, 11.0])  # a deliberate change of spacing
    assert _detect_uneven(d) == (True, [])


# --- step 9: strict policy -------------------------------------------------------------
def test_policy_records_by_default_and_refuses_under_strict() -> None:
    d = np.array([0.0, 2.5, 7.5])
    found = _refuse_or_record_spacing(d, True, [5.0], 0.0, strict=False, what="s")
    assert [f.code for f in found] == ["MISSING_SLICES"]
    assert found[0].details["positions_mm"] == [5.0]
    with pytest.raises(MissingSlicesError):
        _refuse_or_record_spacing(d, True, [5.0], 0.0, strict=True, what="s")
    assert _code(_refuse_or_record_spacing, d, True, [], 0.0, strict=True,
                 what="s") == "UNEVEN_SPACING"
    assert _code(_refuse_or_record_spacing, d[:2], False, [], 7.0, strict=True,
                 what="s") == "GANTRY_TILT"
    assert _refuse_or_record_spacing(d, True, [], 7.0, strict=False, what="s") == []


# --- step 10: resample plan ------------------------------------------------------------
def test_plan_equalises_positions_and_measures_in_plane_offsets() -> None:
    d = np.array([0.0, 1.0, 2.0, 4.0, 5.0, 6.0])  # one slice missing at 3 mm
    kipp = np.stack([np.zeros(6), d / 2, d], axis=1)  # drifting along the column direction
    targets, step, offsets = _plan_resample(d, kipp, _axes(0.5), 4, 3, "s")
    assert step == 1.0 and np.allclose(targets, np.arange(7.0))  # the smallest gap, gap filled
    assert np.allclose(offsets[:, 0], d)  # rows: d / 2 mm at 0.5 mm per row
    assert np.allclose(offsets[:, 1], 0.0)


def test_plan_refuses_a_grid_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFUSION_MAX_BYTES", str(4096))
    d = np.array([0.0, 1.0, 3.0])
    kipp = np.array([[0.0, 0.0, 0.0], [0.0, 50.0, 1.0], [0.0, 150.0, 3.0]])  # 300 px drift
    assert _code(_plan_resample, d, kipp, _axes(0.5), 4, 3, "s") == "LIMIT_EXCEEDED"


# --- step 11: read ---------------------------------------------------------------------
def test_read_fills_planes_in_the_given_order_and_counts_zero_frames() -> None:
    def read_plane(indices: list[int], out: np.ndarray) -> list[bool]:
        for n, i in enumerate(indices):
            out[n] = i
        return [i == 2 for i in indices]

    buf, found = _read_planes([2, 0, 1], read_plane, 4, 3, "s")
    assert buf.dtype == np.float32 and buf[:, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert [(f.code, f.details["count"]) for f in found] == [("ZERO_FRAME", 1)]


# --- step 12: duplicates ---------------------------------------------------------------
def test_identical_duplicates_are_dropped_different_pixels_kept() -> None:
    buf = np.zeros((4, 2, 2), dtype=np.float32)
    buf[2] = 7.0  # slice 2 differs from slices 0 and 1 at the same position
    groups, removed, found = _drop_identical([[0, 1, 2], [3]], buf, {0: 0, 1: 1, 2: 2, 3: 3})
    assert groups == [[0, 2], [3]] and removed == 1
    assert [(f.code, f.details["count"]) for f in found] == [("DUPLICATE_SLICES_REMOVED", 1)]


# --- step 13: time points --------------------------------------------------------------
def test_time_points_ordered_by_the_separating_attribute() -> None:
    trig = {0: 300.0, 1: 100.0, 2: 100.0, 3: 300.0}
    slices = [_slice(float(i // 2), time_keys={"TriggerTime": trig[i]}) for i in range(4)]
    groups, t_count, found, rule = _split_time_points([[0, 1], [2, 3]], slices, "s")
    assert groups == [[1, 0], [2, 3]] and t_count == 2 and rule == "TriggerTime"
    assert found[0].code == "MULTIPLE_TIME_POINTS"
    same = [[0], [1]]
    assert _split_time_points(same, slices, "s") == (same, 1, [], None)


def test_time_points_refused_when_counts_differ_or_nothing_separates() -> None:
    slices = [_slice(0.0), _slice(0.0), _slice(1.0), _slice(1.0), _slice(1.0)]
    assert _code(_split_time_points, [[0, 1], [2, 3, 4]], slices,
                 "s") == "DUPLICATE_POSITIONS"
    assert _code(_split_time_points, [[0, 1], [2, 3]], slices, "s") == "DUPLICATE_POSITIONS"


# --- step 14: gather -------------------------------------------------------------------
def test_gather_is_a_view_for_a_plain_stack_and_k_t_ordered_otherwise() -> None:
    buf = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2)
    plain = _gather_planes(buf, [[0], [1], [2], [3]], {i: i for i in range(4)}, 1)
    assert plain.shape == (4, 1, 2, 2) and np.shares_memory(plain, buf)
    pos_of = {10: 0, 11: 1, 12: 2, 13: 3}
    planes = _gather_planes(buf, [[11, 10], [13, 12]], pos_of, 2)
    assert planes.shape == (2, 2, 2, 2)
    assert np.array_equal(planes[0, 0], buf[1]) and np.array_equal(planes[1, 1], buf[2])


# --- step 15: affine or resampling ----------------------------------------------------
def test_regular_affine_steps_from_first_to_last_position() -> None:
    kipp = np.array([[0.0, 0.0, 10.0], [0.0, 0.0, 12.5], [0.0, 0.0, 15.0]])
    lps = _regular_affine(kipp, _axes(0.5), None)
    assert np.allclose(lps[:3, 2], [0, 0, 2.5]) and np.allclose(lps[:3, 3], kipp[0])
    assert np.allclose(np.diag(lps)[:2], [0.5, 0.5])
    one = kipp[:1]
    assert np.allclose(_regular_affine(one, _axes(), 3.0)[:3, 2], [0, 0, 3.0])
    assert np.allclose(_regular_affine(one, _axes(), 0.0)[:3, 2], [0, 0, 1.0])  # implausible


def test_resampling_interpolates_linearly_between_uneven_slices() -> None:
    d = np.array([0.0, 1.0, 3.0])
    kipp = np.array([[0.0, 0.0, z] for z in d])
    plan = _plan_resample(d, kipp, _axes(), 2, 2, "s")
    planes = np.broadcast_to(d[:, None, None, None], (3, 1, 2, 2)).astype(np.float32)
    out, lps, found = _resample_planes(planes, plan, d, kipp, _axes(), irregular=True,
                                       tilt_deg=0.0, what="s")
    assert np.allclose(out[:, 0, 0, 0], plan[0])  # value = position: linear in z
    assert np.allclose(lps[:3, 2], [0, 0, plan[1]])
    assert [f.code for f in found] == ["UNEVEN_SPACING_RESAMPLED"]


# --- the steps composed ----------------------------------------------------------------
def _run(slices: list[_Slice], planes: dict[int, np.ndarray], **kw: Any) -> tuple[Any, ...]:
    def read_plane(indices: list[int], out: np.ndarray) -> list[bool]:
        for n, i in enumerate(indices):
            out[n] = planes[i]
        return [False] * len(indices)

    return _assemble_stack(slices, read_plane, strict=kw.get("strict", False), what="s",
                           modality="CT")


def test_assembly_does_not_depend_on_input_order() -> None:
    rng = np.random.default_rng(3)
    zs = [0.0, 2.5, 5.0, 10.0, 12.5]  # one slice missing at 7.5 mm
    values = {z: rng.normal(size=(4, 3)).astype(np.float32) for z in zs}
    results = []
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(zs))
        slices = [_slice(zs[p], inst=n + 1, file_index=n) for n, p in enumerate(perm)]
        planes = {n: values[zs[p]] for n, p in enumerate(perm)}
        results.append(_run(slices, planes))
    for arr, affine, found, extra in results[1:]:
        assert np.array_equal(arr, results[0][0]) and np.array_equal(affine, results[0][1])
        assert found == results[0][2] and extra == results[0][3]
    arr, _, found, extra = results[0]
    assert arr.shape == (3, 4, 6) and extra == {"resampled": True}
    assert [f.code for f in found] == ["MISSING_SLICES", "UNEVEN_SPACING_RESAMPLED"]
    assert found[0].details["positions_mm"] == [7.5]
    assert np.allclose(arr[..., 3], ((values[5.0] + values[10.0]) / 2).T)  # the filled gap
