"""Pure ``Volume -> Volume`` preprocessing steps, each recorded in ``Volume.history``.

Spatial steps (``to_canonical``, ``resample_to_spacing``, ``resize_to_shape``,
``crop_or_pad``) compute their destination grid exactly and resample in world space, so the
output affine places every voxel centre where its value was sampled; intensity steps
(``window_ct``, ``standardize_mr``, ``normalize_xray``) leave the geometry untouched. Each
step's ``params`` are JSON values; with the recorded input grid they are enough to invert it
(``map_to_source`` needs only the affines).

4D volumes (I, J, K, T): spatial steps apply to every volume along T; ``select_channel``
keeps one.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel.orientations as nio
import numpy as np

from medfusion.errors import PreprocessError
from medfusion.preprocess import grid as g
from medfusion.types import Volume

# --- helpers ----------------------------------------------------------------------------------


def _array(volume: Volume) -> np.ndarray:
    return np.asarray(volume.array, dtype=np.float32)


def _per_channel(volume: Volume, fn) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Apply a 3D array function to each volume of a 4D array (or to the 3D array)."""
    arr = _array(volume)
    if arr.ndim == 3:
        return fn(arr)
    return np.stack([fn(arr[..., t]) for t in range(arr.shape[3])], axis=-1)


def _affine_json(affine: np.ndarray) -> list[list[float]]:
    return [[float(x) for x in row] for row in np.asarray(affine)]


def _triple(values: Sequence[float] | Sequence[int], name: str, cast: type) -> tuple:
    try:
        out = tuple(cast(v) for v in values)
    except (TypeError, ValueError):
        raise PreprocessError(f"{name} must be 3 numbers, got {values!r}.", code="BAD_ARGUMENT") \
            from None
    if len(out) != 3 or any(not np.isfinite(v) or v <= 0 for v in out):
        raise PreprocessError(
            f"{name} must be 3 positive numbers, got {values!r}.", code="BAD_ARGUMENT"
        )
    return out


# --- orientation ------------------------------------------------------------------------------


def canonical_ornt(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """nibabel orientation (one ``[output axis, flip]`` row per input axis) that brings the
    array closest to RAS+ (as ``nibabel.as_closest_canonical``).

    A 2D image stored with K == 1 (a radiograph) keeps its singleton axis last, so the model
    grid (H, W, 1) still fits: only its two in-plane axes are ordered (by the world axis each
    is closest to, R < A < S) and flipped to point to +R/+A/+S.
    """
    ornt = nio.io_orientation(g.check_affine(affine))
    if len(shape) >= 3 and int(shape[2]) == 1 and not (int(shape[0]) == 1 or int(shape[1]) == 1):
        w0, w1 = ornt[0, 0], ornt[1, 0]
        pos0, pos1 = (0, 1) if w0 < w1 else (1, 0)
        ornt = np.array([[pos0, ornt[0, 1]], [pos1, ornt[1, 1]], [2, 1.0]])
    return ornt


def to_canonical(volume: Volume) -> Volume:
    """Reorder and flip array axes so they point (closest) to R, A, S.

    Exact: no interpolation; the affine is updated so every voxel keeps its world position.
    Oblique acquisitions stay oblique (their axes become the closest to R, A, S).
    """
    shape = volume.spatial_shape
    ornt = canonical_ornt(volume.affine, shape)
    new_affine = volume.affine @ nio.inv_ornt_aff(ornt, shape)
    arr = np.ascontiguousarray(nio.apply_orientation(_array(volume), ornt), dtype=np.float32)
    params = {
        "ornt": [[int(a), int(f)] for a, f in ornt],
        "from": "".join(volume.orientation),
    }
    return volume.with_step("to_canonical", params, array=arr, affine=new_affine)


# --- resampling -------------------------------------------------------------------------------


def spacing_grid(
    shape: tuple[int, int, int], affine: np.ndarray, spacing: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Destination grid of :func:`resample_to_spacing`: same axes and field-of-view centre,
    ``round(n * old / new)`` voxels per axis. An axis of length 1 (an X-ray's depth) keeps
    its length and spacing."""
    old = g.spacing_of(affine)
    new_shape = []
    scales = []
    for n, o, s in zip(shape, old, spacing, strict=True):
        if n == 1:
            new_shape.append(1)
            scales.append(1.0)
        else:
            new_shape.append(max(1, int(round(n * o / s))))
            scales.append(float(s / o))
    ns = (new_shape[0], new_shape[1], new_shape[2])
    return ns, g.scaled_grid(shape, affine, ns, (scales[0], scales[1], scales[2]))


def resize_grid(
    shape: tuple[int, int, int], affine: np.ndarray, new_shape: Sequence[int]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Destination grid of :func:`resize_to_shape`: the new voxels tile exactly the same
    field of view (edge to edge), i.e. voxel ``j`` sits at old index ``(j + 0.5) n/m - 0.5``."""
    ns = (int(new_shape[0]), int(new_shape[1]), int(new_shape[2]))
    scales = (shape[0] / ns[0], shape[1] / ns[1], shape[2] / ns[2])
    return ns, g.scaled_grid(shape, affine, ns, scales)


def resample_to_spacing(volume: Volume, spacing: Sequence[float], *, order: int = 1) -> Volume:
    """Resample to ``spacing`` mm (same axes, same field-of-view centre), trilinear with
    box-filter anti-aliasing when downsampling; ``order=0`` for label maps."""
    sp = _triple(spacing, "spacing", float)
    shape = volume.spatial_shape
    new_shape, new_affine = spacing_grid(shape, volume.affine, sp)
    arr = _per_channel(
        volume,
        lambda a: g.resample_array(a, volume.affine, new_shape, new_affine, order=order),
    )
    params = {"spacing": list(sp), "shape": list(new_shape), "order": order}
    return volume.with_step("resample_to_spacing", params, array=arr, affine=new_affine)


def resize_to_shape(volume: Volume, shape: Sequence[int], *, order: int = 1) -> Volume:
    """Resize to ``shape`` voxels covering exactly the same field of view (the affine's
    spacing scales by n/m and its origin moves to the new first voxel centre)."""
    ns = _triple(shape, "shape", int)
    new_shape, new_affine = resize_grid(volume.spatial_shape, volume.affine, ns)
    arr = _per_channel(
        volume,
        lambda a: g.resample_array(a, volume.affine, new_shape, new_affine, order=order),
    )
    params = {"shape": list(new_shape), "order": order}
    return volume.with_step("resize_to_shape", params, array=arr, affine=new_affine)


def crop_pad_start(shape: Sequence[int], new_shape: Sequence[int]) -> tuple[int, int, int]:
    """Old index of the new voxel 0 when cropping/padding symmetrically about the centre
    (positive = crop, negative = pad; an odd remainder goes to the end)."""
    s = [(int(n) - int(m)) // 2 for n, m in zip(shape, new_shape, strict=True)]
    return s[0], s[1], s[2]


def crop_or_pad(volume: Volume, shape: Sequence[int], value: float = 0.0) -> Volume:
    """Crop or pad (with constant ``value``) each axis about its centre to ``shape``.

    The affine is translated by exactly the crop/pad offset, so kept voxels keep their world
    positions; padded voxels extend the grid with the same spacing.
    """
    ns = _triple(shape, "shape", int)
    old = volume.spatial_shape
    start = crop_pad_start(old, ns)
    new_affine = g.shifted_grid(volume.affine, start)

    def fn(a: np.ndarray) -> np.ndarray:
        out = np.full(ns, np.float32(value), dtype=np.float32)
        src = tuple(slice(max(s, 0), min(s + m, n)) for s, m, n in zip(start, ns, old, strict=True))
        dst = tuple(slice(max(-s, 0), max(-s, 0) + (sl.stop - sl.start))
                    for s, sl in zip(start, src, strict=True))
        out[dst] = a[src]
        return out

    arr = _per_channel(volume, fn)
    params = {"shape": list(ns), "start": list(start), "value": float(value)}
    return volume.with_step("crop_or_pad", params, array=arr, affine=new_affine)


def select_channel(volume: Volume, index: int = 0) -> Volume:
    """Keep volume ``index`` of a 4D (I, J, K, T) array (the documented channel rule)."""
    arr = _array(volume)
    if arr.ndim == 3:
        return volume
    if not 0 <= index < arr.shape[3]:
        raise PreprocessError(
            f"Channel {index} does not exist; the volume has {arr.shape[3]}.", code="NOT_3D"
        )
    out = np.ascontiguousarray(arr[..., index])
    return volume.with_step("select_channel", {"index": int(index), "of": int(arr.shape[3])},
                            array=out)


# --- intensity --------------------------------------------------------------------------------


def window_ct_array(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (np.clip(arr, lo, hi) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return out.astype(np.float32, copy=False)


def window_ct(volume: Volume, lo: float = -1000.0, hi: float = 1000.0) -> Volume:
    """Map the HU window [lo, hi] linearly to [0, 1], clipping outside (air -1000 -> 0)."""
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise PreprocessError(f"CT window needs lo < hi, got ({lo}, {hi}).", code="BAD_ARGUMENT")
    arr = window_ct_array(_array(volume), float(lo), float(hi))
    return volume.with_step("window_ct", {"lo": float(lo), "hi": float(hi)}, array=arr)


def standardize_mr_array(
    arr: np.ndarray, lower: float = 0.5, upper: float = 99.5, foreground: float = 0.05
) -> tuple[np.ndarray, dict[str, float]]:
    """Robust MR z-score; returns the array and the statistics used (see standardize_mr)."""
    p_lo, p_hi = (float(v) for v in np.percentile(arr, [lower, upper]))
    clipped = np.clip(arr, p_lo, p_hi)
    threshold = p_lo + foreground * (p_hi - p_lo)
    fg = clipped[clipped > threshold]
    if fg.size < max(1, 0.01 * clipped.size):
        fg = clipped.ravel()
    mean = float(fg.mean(dtype=np.float64))
    std = float(fg.std(dtype=np.float64))
    if not np.isfinite(std) or std < 1e-8 * max(1.0, abs(mean)):
        out = np.zeros_like(clipped, dtype=np.float32)
        std = 0.0
    else:
        out = ((clipped - np.float32(mean)) * np.float32(1.0 / std)).astype(np.float32)
    stats = {"p_lo": p_lo, "p_hi": p_hi, "mean": mean, "std": std,
             "foreground_fraction": float(fg.size / max(1, clipped.size))}
    return out, stats


def standardize_mr(
    volume: Volume, lower: float = 0.5, upper: float = 99.5, foreground: float = 0.05
) -> Volume:
    """Robust MR standardisation.

    1. Clip to the ``lower``/``upper`` percentiles (0.5 / 99.5): a few hot voxels or a
       metal artefact cannot stretch the scale.
    2. Foreground = voxels above ``p_lo + foreground * (p_hi - p_lo)`` (5 % of the robust
       range: excludes air and its noise, keeps dark tissue); fewer than 1 % foreground
       voxels -> the whole volume is used.
    3. z-score with the foreground mean and standard deviation (a constant volume -> 0).
    The statistics are recorded in the step's params.
    """
    arr, stats = standardize_mr_array(_array(volume), lower, upper, foreground)
    params = {"lower": float(lower), "upper": float(upper), "foreground": float(foreground),
              **stats}
    return volume.with_step("standardize_mr", params, array=arr)


def normalize_xray_array(
    arr: np.ndarray, lower: float = 0.5, upper: float = 99.5
) -> tuple[np.ndarray, dict[str, float]]:
    p_lo, p_hi = (float(v) for v in np.percentile(arr, [lower, upper]))
    if p_hi - p_lo <= 1e-8 * max(1.0, abs(p_hi)):
        return np.zeros_like(arr, dtype=np.float32), {"p_lo": p_lo, "p_hi": p_hi}
    out = (np.clip(arr, p_lo, p_hi) - np.float32(p_lo)) * np.float32(1.0 / (p_hi - p_lo))
    return out.astype(np.float32), {"p_lo": p_lo, "p_hi": p_hi}


def normalize_xray(volume: Volume, lower: float = 0.5, upper: float = 99.5) -> Volume:
    """Scale the ``lower``..``upper`` percentile range (0.5..99.5) to [0, 1], clipping
    outside (robust to burnt-in markers and collimator edges; a constant image -> 0)."""
    arr, stats = normalize_xray_array(_array(volume), lower, upper)
    params = {"lower": float(lower), "upper": float(upper), **stats}
    return volume.with_step("normalize_xray", params, array=arr)
