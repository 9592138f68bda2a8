"""Grid geometry and the one resampler every spatial step uses.

A *grid* is a spatial shape plus a 4x4 affine (voxel index -> RAS+ mm). Resampling an array
from a source grid onto a destination grid is always done in world space: the destination
voxel centre ``x = A_dst @ j`` is looked up at source index ``A_src^-1 @ x``. Spatial steps
therefore only need to state the destination grid exactly; the values follow.

Fast path. Every grid medfusion builds from a source differs from it by a signed axis
permutation (reorientation) and per-axis scale and offset (spacing, resize, crop/pad), so
``A_src^-1 @ A_dst`` is a scaled signed permutation. Then trilinear interpolation is
separable: three 1D linear passes, each along one source axis. Before downsampling by a
factor ``f >= 2`` along an axis, the source is average-pooled by ``floor(f)`` (box filter:
``torch.avg_pool3d`` for small boxes, slab by slab for large ones) so high frequencies do
not alias (a single-step 512 -> 96 interpolation keeps ~5x more noise; see
docs/preprocessing.md). Pooled sample positions are
tracked exactly (a partial last window has its own centre), so pooling never shifts the
geometry. Any other relation between grids (oblique to axis-aligned) falls back to
``scipy.ndimage.affine_transform`` with a Gaussian prefilter when downsampling.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medfusion.errors import PreprocessError

Outside = Literal["edge", "zero"]

# Innermost-axis passes with at most this many input samples use a dense matmul.
_MATMUL_MAX = 128
# Relative cost per output voxel of a 1D pass along axis 0, 1, 2 (measured: gathers along
# the innermost axis are slower), used to order the three passes.
_PASS_COST = (1.0, 1.0, 2.0)
# Relative tolerance for "this affine entry is zero" and "this coordinate is on the grid".
_TOL = 1e-6
# Box averages over at least this many voxels per output sample stream the volume slab by
# slab (k0 slices summed, then a 2D box average of one small plane): torch's avg_pool3d is
# compute-bound there (512x512x200 by (5, 5, 2): 131 ms vs 55 ms, by (10, 10, 4): 129 vs
# 21 ms, one thread), while for small boxes the output is nearly as large as the input and
# the two are equally fast.
_SLAB_MIN_FACTOR = 12


def check_affine(affine: np.ndarray) -> np.ndarray:
    """The affine as float64, refusing one that cannot map voxels to world (singular/NaN)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise PreprocessError(
            "The volume's affine is not a finite 4x4 matrix; reload the volume with "
            "medfusion.load_volume so its geometry is checked.",
            code="GEOMETRY",
        )
    det = float(np.linalg.det(a[:3, :3]))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise PreprocessError(
            "The volume's affine is singular (zero voxel size or collinear axes), so voxel "
            "positions in world space are undefined; fix the header or reload the volume.",
            code="GEOMETRY",
        )
    return a


def index_map(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """4x4 matrix taking destination voxel indices to source voxel indices."""
    return np.linalg.solve(check_affine(src_affine), check_affine(dst_affine))


def _as_axis_map(m: np.ndarray) -> list[tuple[int, float, float]] | None:
    """If ``m`` (dst index -> src index) is a scaled signed permutation, return for each
    destination axis ``(source axis, scale, offset)``; otherwise ``None``."""
    r = m[:3, :3]
    big = np.abs(r) > _TOL * max(float(np.abs(r).max()), 1e-30)
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    out = []
    for d in range(3):
        s = int(np.argmax(big[:, d]))
        out.append((s, float(r[s, d]), float(m[s, 3])))
    return out


def _interp_axis(
    t: torch.Tensor,
    axis: int,
    positions: np.ndarray,
    coords: np.ndarray,
    n_src: int,
    order: int,
    outside: Outside,
) -> torch.Tensor:
    """Values of ``t`` along ``axis`` at source-index ``coords``.

    ``positions`` (increasing) are the source-index positions of ``t``'s samples along
    ``axis`` (``arange(n)`` unless pooled). ``n_src`` is the source length before pooling:
    coordinates beyond half a voxel outside ``[0, n_src - 1]`` are outside the field of view.
    """
    n = t.shape[axis]
    # Identity along this axis: skip the pass (crop offsets of 0, X-ray depth 1...).
    if n == len(coords) and len(positions) == n and np.allclose(coords, positions, atol=1e-6):
        return t
    shape = [1] * t.ndim
    shape[axis] = len(coords)
    if order == 0:
        # Nearest source voxel (labels): index by rounding in the unpooled grid.
        i0 = np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.int64)
        i1 = i0
        w = np.zeros(len(coords))
    else:
        c = np.clip(coords, positions[0], positions[-1])
        if n == 1:
            i0 = np.zeros(len(c), dtype=np.int64)
            i1 = i0
            w = np.zeros(len(c))
        else:
            i0 = np.clip(np.searchsorted(positions, c, side="right") - 1, 0, n - 2)
            i1 = i0 + 1
            w = np.clip((c - positions[i0]) / (positions[i1] - positions[i0]), 0.0, 1.0)
    if axis == t.ndim - 1 and n <= _MATMUL_MAX:
        # Gathering along the innermost (strided) axis is ~9x slower than along the outer
        # ones; a small dense interpolation matrix (two non-zeros per row) uses BLAS instead.
        weights = np.zeros((len(coords), n), dtype=np.float64)
        rows = np.arange(len(coords))
        np.add.at(weights, (rows, i0), 1.0 - w)
        np.add.at(weights, (rows, i1), w)
        out = torch.matmul(t, torch.from_numpy(weights.T.astype(np.float32)))
    elif order == 0:
        out = torch.index_select(t, axis, torch.from_numpy(i0))
    else:
        a0 = torch.index_select(t, axis, torch.from_numpy(i0))
        a1 = torch.index_select(t, axis, torch.from_numpy(i1))
        out = torch.lerp(a0, a1, torch.from_numpy(w.astype(np.float32)).reshape(shape))
    if outside == "zero":
        inside = (coords >= -0.5 - 1e-4) & (coords <= n_src - 0.5 + 1e-4)
        if not inside.all():
            out = out * torch.from_numpy(inside.astype(np.float32)).reshape(shape)
    return out


def _pool(
    t: torch.Tensor, factors: tuple[int, int, int]
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Box-average ``t`` (I, J, K) by integer ``factors``; return it and, per axis, the
    exact source-index centre of every pooled sample (a partial last window included)."""
    positions = []
    for ax, k in enumerate(factors):
        n = t.shape[ax]
        starts = np.arange(0, n, k, dtype=np.float64)
        ends = np.minimum(starts + k, n)
        positions.append((starts + ends - 1.0) / 2.0)
    if all(k == 1 for k in factors):
        return t, positions
    return _box_average(t, factors), positions


def _box_average(t: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Mean of each ``factors`` box of ``t``; a partial last window along an axis averages
    only the voxels it covers (ceil mode), so the whole field of view contributes and
    nothing is padded."""
    if math.prod(factors) < _SLAB_MIN_FACTOR:
        return F.avg_pool3d(t[None, None], kernel_size=factors, stride=factors,
                            ceil_mode=True)[0, 0]
    k0, k1, k2 = factors
    n_out = -(-t.shape[0] // k0)
    out: torch.Tensor | None = None
    for i in range(n_out):
        slab = t[i * k0:(i + 1) * k0]
        plane = slab.sum(dim=0) if slab.shape[0] > 1 else slab[0]
        pooled = F.avg_pool2d(plane[None], kernel_size=(k1, k2), stride=(k1, k2),
                              ceil_mode=True)[0]
        if out is None:
            out = torch.empty((n_out, *pooled.shape), dtype=pooled.dtype)
        torch.div(pooled, slab.shape[0], out=out[i])
    assert out is not None
    return out


def c_order_view(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image as a C-contiguous float32 array with a matching affine, without a copy
    when possible.

    Loaders often return Fortran-ordered or flipped views (e.g. DICOM stacks built slice by
    slice). Because resampling is defined in world space, permuting or flipping the *source*
    axes (and the affine's columns with them) changes nothing in the result, but lets the
    pooling and 1D passes stream through memory instead of copying 100s of MB first.
    """
    arr = np.asarray(array)
    aff = np.asarray(affine, dtype=np.float64).copy()
    if arr.dtype != np.float32 or arr.flags.c_contiguous or arr.ndim != 3:
        return np.ascontiguousarray(arr, dtype=np.float32), aff
    for ax in range(3):
        if arr.strides[ax] < 0:
            # Index i of the flipped view is index n - 1 - i of the array.
            n = arr.shape[ax]
            arr = np.flip(arr, axis=ax)
            flip = np.eye(4)
            flip[ax, ax] = -1.0
            flip[ax, 3] = n - 1
            aff = aff @ flip
    perm = sorted(range(3), key=lambda a: -arr.strides[a])
    view = arr.transpose(perm)
    if view.flags.c_contiguous:
        swap = np.eye(4)[:, [*perm, 3]]
        return view, aff @ swap
    return np.ascontiguousarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64)


def _pass_order(shape: tuple[int, ...], out_len: list[int]) -> tuple[int, ...]:
    """Order of the three 1D passes with the least estimated work (voxels written, weighted
    by the axis' cost): shrinking passes first, growing ones last, inner axis early."""
    best: tuple[float, tuple[int, ...]] | None = None
    for perm in itertools.permutations(range(3)):
        cur = list(shape)
        cost = 0.0
        for ax in perm:
            cur[ax] = out_len[ax]
            cost += float(np.prod(cur)) * _PASS_COST[ax]
        if best is None or cost < best[0]:
            best = (cost, perm)
    assert best is not None
    return best[1]


def resample_array(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    *,
    order: int = 1,
    antialias: bool = True,
    outside: Outside = "edge",
) -> np.ndarray:
    """Resample a 3D ``array`` on (its shape, ``src_affine``) onto (``dst_shape``,
    ``dst_affine``) in world space. Returns float32 of shape ``dst_shape``.

    ``order`` 1 = trilinear, 0 = nearest. ``outside``: ``"edge"`` extends the border value
    (for resampling within one field of view), ``"zero"`` gives 0 beyond half a voxel
    outside the source field of view (for mapping maps back to a scanner grid).
    """
    if order not in (0, 1):
        raise PreprocessError(f"Interpolation order must be 0 or 1, got {order}.", code="BAD_ORDER")
    arr, src_affine = c_order_view(array, src_affine)
    dst_shape = tuple(int(s) for s in dst_shape)  # type: ignore[assignment]
    m = index_map(src_affine, dst_affine)
    axis_map = _as_axis_map(m)
    if axis_map is None:
        return _resample_general(arr, m, dst_shape, order, antialias, outside)

    src_shape = arr.shape
    # Per source axis: which destination axis it feeds, with what scale/offset.
    by_src: dict[int, tuple[int, float, float]] = {s: (d, sc, off) for d, (s, sc, off) in
                                                   enumerate(axis_map)}
    factors = [1, 1, 1]
    if order == 1 and antialias:
        for s, (_d, sc, _off) in by_src.items():
            k = int(math.floor(abs(sc) + 1e-6))
            if k >= 2 and src_shape[s] >= 2:
                factors[s] = min(k, src_shape[s])
    with torch.inference_mode():
        t = torch.from_numpy(arr)
        t, positions = _pool(t, (factors[0], factors[1], factors[2]))
        order_axes = _pass_order(tuple(t.shape), [dst_shape[by_src[s][0]] for s in range(3)])
        for s in order_axes:
            d, sc, off = by_src[s]
            coords = sc * np.arange(dst_shape[d], dtype=np.float64) + off
            t = _interp_axis(t, s, positions[s], coords, src_shape[s], order, outside)
        # Axes are still in source order, each now holding its destination length.
        perm = [axis_map[d][0] for d in range(3)]
        out = t.permute(*perm).contiguous().numpy()
    return np.asarray(out, dtype=np.float32)


def _resample_general(
    arr: np.ndarray,
    m: np.ndarray,
    dst_shape: tuple[int, ...],
    order: int,
    antialias: bool,
    outside: Outside,
) -> np.ndarray:
    """Resampling for grids not related by an axis permutation (oblique to each other)."""
    from scipy import ndimage

    src = arr
    if order == 1 and antialias:
        # Source voxels per destination voxel along each source axis; smooth where > 1.
        step = np.linalg.norm(m[:3, :3], axis=1)
        sigma = [0.4 * s if s > 1.5 else 0.0 for s in step]
        if any(sigma):
            src = ndimage.gaussian_filter(arr, sigma=sigma, mode="nearest")
    out = ndimage.affine_transform(
        src,
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=tuple(dst_shape),
        order=order,
        mode="nearest",
        prefilter=False,
    )
    if outside == "zero":
        # Which destination voxels fall in the source field of view (half a voxel margin).
        idx = np.indices(dst_shape, dtype=np.float64).reshape(3, -1)
        src_idx = m[:3, :3] @ idx + m[:3, 3:4]
        lim = np.asarray(arr.shape, dtype=np.float64)[:, None]
        inside = ((src_idx >= -0.5 - 1e-4) & (src_idx <= lim - 0.5 + 1e-4)).all(axis=0)
        out = out * inside.reshape(dst_shape)
    return np.asarray(out, dtype=np.float32)


# --- grid construction ---------------------------------------------------------------------


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis: the column norms of the affine's 3x3 part."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def scaled_grid(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    new_shape: tuple[int, int, int],
    scales: tuple[float, float, float],
) -> np.ndarray:
    """Affine of a grid with the same axes and the same field-of-view *centre*, whose voxel
    ``j`` along axis ``a`` sits at old index ``(j - (m - 1)/2) * scales[a] + (n - 1)/2``.

    With ``scales = n/m`` the new voxels tile exactly the old field of view (resize); with
    ``scales = new_spacing/old_spacing`` the spacing is the target one (resample)."""
    a = np.asarray(affine, dtype=np.float64)
    diag = np.diag([*scales, 1.0])
    triples = zip(shape, new_shape, scales, strict=True)
    off = np.array([(n - 1) / 2.0 - (m - 1) / 2.0 * s for n, m, s in triples] + [1.0])
    t = diag.copy()
    t[:, 3] = off
    return a @ t


def shifted_grid(affine: np.ndarray, start: tuple[int, int, int]) -> np.ndarray:
    """Affine of a grid whose voxel 0 is the old voxel ``start`` (crop if > 0, pad if < 0)."""
    t = np.eye(4)
    t[:3, 3] = start
    return np.asarray(affine, dtype=np.float64) @ t
