"""Linear resampling of a stack of parallel planes onto a regular, orthogonal grid in world
space (uneven slice spacing, gantry tilt), as dcm2niix equalises and corrects tilt."""

from __future__ import annotations

import math

import numpy as np


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


def _resample_grid(offsets_px: np.ndarray, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(row0, col0, rows, cols) of :func:`_resample_stack`'s output grid for these slice
    offsets: slice 0's lattice extended to cover every shifted slice."""
    r_lo = int(math.floor(min(0.0, float(offsets_px[:, 0].min())) + 1e-6))
    c_lo = int(math.floor(min(0.0, float(offsets_px[:, 1].min())) + 1e-6))
    r_hi = int(math.ceil(max(0.0, float(offsets_px[:, 0].max())) - 1e-6)) + rows
    c_hi = int(math.ceil(max(0.0, float(offsets_px[:, 1].max())) - 1e-6)) + cols
    return r_lo, c_lo, r_hi - r_lo, c_hi - c_lo
