"""Saliency back on the scanner grid, written as NIfTI plus a PNG montage.

``DIR/<study_id>/<role>.nii.gz`` holds the map on exactly the source volume's spatial shape
and affine (sform and qform both set, code 1 "scanner"), float32 in [0, 1], with an empty
description: no identifier in the header. ``<role>.png`` shows axial slices around the
peak in radiological display (patient's right on the image's left, anterior up), over the
source image when given; a radiograph (K = 1) is one 2D panel instead, as stored (first
row at the top, first column on the left, as a DICOM viewer shows it), pixels drawn to
scale from the pixel spacing. Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfusion.atomic import atomic_path
from medfusion.errors import ExplanationError, OutputError, UnsafePathError
from medfusion.preprocess import map_to_source
from medfusion.types import Explanation, Volume

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# a study id becomes one folder name: letters, digits, dot, dash, underscore; no "." / ".."
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def saliency_to_source(values: np.ndarray, prepared: Volume, source: Volume) -> Volume:
    """A [0, 1] map on the model grid of ``prepared`` -> a Volume on ``source``'s exact grid
    (spatial shape and affine), via :func:`medfusion.preprocess.map_to_source`."""
    mapped = map_to_source(np.asarray(values, dtype=np.float32), prepared, source)
    array = np.clip(np.asarray(mapped.array, dtype=np.float32), 0.0, None)
    top = float(array.max()) if array.size else 0.0
    # interpolation onto the source grid can miss the exact peak: rescale so the source
    # map's own maximum is 1 again (a flat zero map stays zero)
    array = np.clip(array / top, 0.0, 1.0) if top > 0 else array
    return Volume(array=array, affine=mapped.affine, modality=source.modality,
                  history=mapped.history)


def _safe_component(name: str, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or set(name) <= {"."}:
        raise UnsafePathError(
            f"{what} must be a plain name (letters, digits, '.', '-', '_'; no path "
            "separators); use the study's pseudonymous key."
        )
    return name


def _write_nifti(volume: Volume, path: Path) -> None:
    import nibabel as nib

    array = np.asarray(volume.array, dtype=np.float32)
    image = nib.Nifti1Image(array, volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    image.header["descrip"] = b""
    image.header["aux_file"] = b""
    image.header["db_name"] = b""

    with atomic_path(path) as tmp:  # keeps the .nii.gz suffix nibabel picks the format from
        nib.save(image, tmp)


def _axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to superior-inferior."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def _display_slices(volume: Volume) -> np.ndarray:
    """The array in closest-canonical RAS order, so axial slices can be drawn uniformly."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    return nib.orientations.apply_orientation(np.asarray(volume.array[..., :]), ornt)


#: long side of a radiograph's PNG panel, in pixels
PLANAR_LONG_SIDE = 512
_PNG_DPI = 80


def is_planar(volume: Volume) -> bool:
    """A 2D image stored with K == 1 (a radiograph): drawn as one panel, not axial slices
    (an axial slice of it would be one pixel high)."""
    i, j, k = volume.spatial_shape
    return k == 1 and i > 1 and j > 1


def _background_array(saliency: Volume, background: Volume | None) -> np.ndarray | None:
    """The source image (first time point / frame) when it lies on the map's grid."""
    if background is None:
        return None
    arr = np.asarray(background.array, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[..., 0]
    if arr.shape != saliency.spatial_shape:
        return None
    return arr


def _gray_limits(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1e-6))


def _save(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=_PNG_DPI, metadata={"Software": None})
    finally:
        plt.close(fig)


def _planar_size(saliency: Volume) -> tuple[int, int]:
    """(width, height) in PNG pixels: the physical aspect (columns x column spacing by rows
    x row spacing), long side :data:`PLANAR_LONG_SIDE`."""
    n_i, n_j, _ = saliency.spatial_shape
    s_i, s_j, _ = saliency.spacing
    width_mm, height_mm = n_i * s_i, n_j * s_j
    scale = PLANAR_LONG_SIDE / max(width_mm, height_mm)
    return max(1, int(round(width_mm * scale))), max(1, int(round(height_mm * scale)))


def _write_planar_png(saliency: Volume, background: Volume | None, path: Path,
                      role: str) -> None:
    """One panel: the radiograph in gray, the map over it. Array axis i is the DICOM column
    (left to right), j the row (top to bottom), so the image is ``array[:, :, 0].T``. The
    panel fills the whole figure, so the PNG's pixels map linearly onto the image's."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    width, height = _planar_size(saliency)
    sal = np.asarray(saliency.array, dtype=np.float32)[:, :, 0].T
    bg = _background_array(saliency, background)
    fig = plt.figure(figsize=(width / _PNG_DPI, height / _PNG_DPI), dpi=_PNG_DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    # the figure has the image's physical aspect; stretching the image over all of it draws
    # every pixel in proportion to its spacing (a non-square spacing keeps its true shape)
    extent = (0.0, 1.0, 1.0, 0.0)
    if bg is not None:
        b = bg[:, :, 0].T
        lo, hi = _gray_limits(b)
        ax.imshow(b, cmap="gray", vmin=lo, vmax=hi, extent=extent, aspect="auto",
                  interpolation="antialiased")
    ax.imshow(sal, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45 if bg is not None else 1.0,
              extent=extent, aspect="auto", interpolation="antialiased")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(1.0, 0.0)
    ax.axis("off")
    ax.text(0.01, 0.99, role, transform=ax.transAxes, color="white", fontsize=8,
            va="top", ha="left", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5,
                                       "linewidth": 0})
    _save(fig, path)


def _write_png(saliency: Volume, background: Volume | None, path: Path, role: str,
               n_slices: int = 5) -> None:
    if is_planar(saliency):
        _write_planar_png(saliency, background, path, role)
        return

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sal = _display_slices(saliency)
    bg_arr = _background_array(saliency, background)
    bg = None
    if bg_arr is not None and background is not None:
        bg = _display_slices(Volume(array=bg_arr, affine=background.affine))
    depth = sal.shape[2]
    peak_k = int(np.unravel_index(int(np.argmax(sal)), sal.shape)[2])
    half = n_slices // 2
    ks = sorted({int(np.clip(peak_k + d * max(1, depth // (2 * n_slices + 1)), 0, depth - 1))
                 for d in range(-half, half + 1)})
    fig, axes = plt.subplots(1, len(ks), figsize=(2.2 * len(ks), 2.6), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        # RAS array: axis 0 -> patient right, axis 1 -> anterior. Radiological display:
        # rows anterior->posterior, columns patient right->left.
        if bg is not None:
            b = bg[:, :, k]
            lo, hi = _gray_limits(b)
            ax.imshow(b[::-1, ::-1].T, cmap="gray", vmin=lo, vmax=hi)
        ax.imshow(sal[::-1, ::-1, k].T, cmap="jet", vmin=0.0, vmax=1.0,
                  alpha=0.45 if bg is not None else 1.0)
        ax.set_title(f"{role} axial {k}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def write_explanation(
    explanation: Explanation,
    directory: str | Path,
    study_id: str,
    *,
    images: Mapping[str, Volume] | None = None,
) -> dict[str, Path]:
    """Write ``directory/<study_id>/<role>.nii.gz`` and ``<role>.png`` for every saliency map.

    ``study_id`` must be a plain name (use the pseudonymous key); ``images`` (the source
    volumes by role) are drawn under the PNG overlay when given. Returns the written paths
    by ``"<role>.nii.gz"`` / ``"<role>.png"``.
    """
    if not isinstance(explanation, Explanation):
        raise ExplanationError("write_explanation needs a medfusion.types.Explanation.")
    _safe_component(study_id, "study_id")
    for role in explanation.saliency:
        _safe_component(role, "role")
    root = Path(directory)
    out_dir = root / study_id
    written: dict[str, Path] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for role, volume in sorted(explanation.saliency.items()):
            nii = out_dir / f"{role}.nii.gz"
            png = out_dir / f"{role}.png"
            _write_nifti(volume, nii)
            _write_png(volume, (images or {}).get(role), png, role)
            written[nii.name] = nii
            written[png.name] = png
    except OSError as error:
        raise OutputError(
            f"could not write saliency maps ({type(error).__name__}); check that the "
            "saliency folder is writable and the disk has space."
        ) from None
    return written
