"""Saliency back on the scanner grid, written as NIfTI plus a PNG figure.

``DIR/<study_id>/<role>.nii.gz`` holds the map on exactly the source volume's spatial shape
and affine (sform and qform both set, code 1 "scanner"), float32 in [0, 1], with an empty
description: no identifier in the header. ``<role>.png`` shows axial, coronal and sagittal
slices through the map's peak inside the body in radiological display (patient's right on
the image's left, anterior or superior up; orientation letters on every panel), over the
source image in its modality's window (CT presets, MR percentiles), the map transparent
below a threshold, with a colour bar and the study key and role in the title. A radiograph
(K = 1) is one 2D panel instead, as stored (first row at the top, first column on the left,
as a DICOM viewer shows it), pixels drawn to scale from the pixel spacing. Files are
written atomically (temporary file, then rename).
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


#: long side of one panel of a 3D figure, in PNG pixels (>= 256 whatever the source size)
PANEL_PX = 320
#: map values below this are transparent in the figures (the colour bar shows the scale)
MAP_THRESHOLD = 0.3
#: CT display windows (centre, width) in HU; chosen from BodyPartExamined
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "soft tissue": (40.0, 400.0),
}
_HEAD_PARTS = ("HEAD", "BRAIN", "SKULL")


def _window(background: Volume, image: np.ndarray) -> tuple[float, float, str]:
    """Gray limits from the modality: a CT preset (brain for a head, soft tissue otherwise),
    else the 1st-99th percentile of the body's voxels."""
    if str(background.modality).upper() == "CT":
        part = str(background.meta.get("BodyPartExamined", "")).upper()
        name = "brain" if any(p in part for p in _HEAD_PARTS) else "soft tissue"
        centre, width = CT_WINDOWS[name]
        return centre - width / 2.0, centre + width / 2.0, f"CT {name} window"
    body = image[_body_mask(background, image)]
    lo, hi = _gray_limits(body if body.size else image)
    return lo, hi, "1-99th percentile"


def _body_mask(background: Volume, image: np.ndarray) -> np.ndarray:
    """Voxels inside the body: above -500 HU for CT, above a tenth of the 99th percentile
    otherwise (air and the space around the patient excluded)."""
    if str(background.modality).upper() == "CT":
        return image > -500.0
    finite = image[np.isfinite(image)]
    if not finite.size:
        return np.zeros(image.shape, dtype=bool)
    return image > 0.1 * float(np.percentile(finite, 99))


def _ras_spacing(volume: Volume) -> np.ndarray:
    """Voxel size (mm) along the closest-canonical RAS array axes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    spacing = np.zeros(3)
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = volume.spacing[axis]
    return spacing


def figure_peak(sal: np.ndarray, bg: np.ndarray | None, background: Volume | None
                ) -> tuple[int, int, int]:
    """The voxel the figure's three slices go through: the map's peak inside the body (a
    peak in the air beside the patient is not shown) and off the outermost tenth of the
    field of view (Grad-CAM's padding edge); each restriction is dropped when it leaves no
    map. Arrays in the figure's RAS order."""
    inside = sal
    if bg is not None and background is not None:
        body = _body_mask(background, bg)
        if body.any() and float((sal * body).max()) > 0:
            inside = sal * body
    core = np.zeros(sal.shape, dtype=bool)
    core[tuple(slice(n // 10, n - n // 10) for n in sal.shape)] = True
    if float((inside * core).max()) > 0:
        inside = inside * core
    i, j, k = np.unravel_index(int(np.argmax(inside)), sal.shape)
    return int(i), int(j), int(k)


def _write_png(saliency: Volume, background: Volume | None, path: Path, role: str,
               title: str | None = None, method: str = "gradcam") -> None:
    """Three orthogonal slices (axial, coronal, sagittal) through the map's peak inside the
    body and away from the edge of the field of view, in radiological display with
    orientation letters; the source in its modality's window, the map transparent below
    :data:`MAP_THRESHOLD`, a colour bar and a title naming the study key and the role.
    A radiograph is one panel."""
    if is_planar(saliency):
        _write_planar_png(saliency, background, path, role)
        return

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sal = _display_slices(saliency)
    bg_arr = _background_array(saliency, background)
    bg = None
    window = None
    if bg_arr is not None and background is not None:
        bg = _display_slices(Volume(array=bg_arr, affine=background.affine))
        window = _window(background, bg)
    pi, pj, pk = figure_peak(sal, bg, background)
    sx, sy, sz = _ras_spacing(saliency)
    nx, ny, nz = sal.shape
    # RAS arrays; radiological display: patient right on the image's left, anterior or
    # superior up. Each view: (2D array, extent (w, h) in mm, letters left/right/top/bottom)
    views = [
        ("axial", lambda a: a[::-1, ::-1, pk].T, (nx * sx, ny * sy), ("R", "L", "A", "P")),
        ("coronal", lambda a: a[::-1, pj, ::-1].T, (nx * sx, nz * sz), ("R", "L", "S", "I")),
        ("sagittal", lambda a: a[pi, ::-1, ::-1].T, (ny * sy, nz * sz), ("A", "P", "S", "I")),
    ]
    dpi = _PNG_DPI
    pad, title_px, bar_px = 8, 28, 70
    width_px = 3 * PANEL_PX + 4 * pad + bar_px
    height_px = PANEL_PX + title_px + 2 * pad
    fig = plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="black")
    cmap = matplotlib.colormaps["jet"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    image = None
    for n, (name, cut, (w_mm, h_mm), letters) in enumerate(views):
        scale = PANEL_PX / max(w_mm, h_mm)
        w, h = w_mm * scale, h_mm * scale
        left = pad + n * (PANEL_PX + pad) + (PANEL_PX - w) / 2
        bottom = pad + (PANEL_PX - h) / 2
        ax = fig.add_axes((left / width_px, bottom / height_px, w / width_px, h / height_px))
        extent = (0.0, w_mm, h_mm, 0.0)
        if bg is not None and window is not None:
            ax.imshow(cut(bg), cmap="gray", vmin=window[0], vmax=window[1], extent=extent,
                      interpolation="antialiased", aspect="auto")
        shown = np.ma.masked_less(cut(sal), MAP_THRESHOLD)
        image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0,
                          alpha=0.5 if bg is not None else 1.0, extent=extent,
                          interpolation="nearest", aspect="auto")
        ax.set_facecolor("black")
        ax.axis("off")
        box = {"facecolor": "black", "alpha": 0.6, "pad": 1.0, "linewidth": 0}
        for text, xy, ha, va in ((letters[0], (0.01, 0.5), "left", "center"),
                                 (letters[1], (0.99, 0.5), "right", "center"),
                                 (letters[2], (0.5, 0.99), "center", "top"),
                                 (letters[3], (0.5, 0.01), "center", "bottom")):
            ax.text(*xy, text, transform=ax.transAxes, color="white", fontsize=10,
                    fontweight="bold", ha=ha, va=va, bbox=box)
        index = {"axial": pk, "coronal": pj, "sagittal": pi}[name]
        ax.text(0.01, 0.01, f"{name} {index}", transform=ax.transAxes, color="white",
                fontsize=8, ha="left", va="bottom", bbox=box)
    cax = fig.add_axes(((3 * PANEL_PX + 4 * pad) / width_px, (pad + 20) / height_px,
                        14 / width_px, (PANEL_PX - 40) / height_px))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(f"saliency (< {MAP_THRESHOLD:g} not shown)", color="white", fontsize=8)
    bar.ax.tick_params(colors="white", labelsize=7)
    parts = [title or "", role, method.replace("gradcampp", "Grad-CAM++")
             .replace("gradcam", "Grad-CAM")]
    if window is not None:
        parts.append(window[2])
    fig.text(0.5, 1.0 - (title_px / 2) / height_px, "  |  ".join(p for p in parts if p),
             color="white", fontsize=10, ha="center", va="center")
    _save(fig, path)


def write_explanation(
    explanation: Explanation,
    directory: str | Path,
    study_id: str,
    *,
    images: Mapping[str, Volume] | None = None,
    study_key: str | None = None,
) -> dict[str, Path]:
    """Write ``directory/<study_id>/<role>.nii.gz`` and ``<role>.png`` for every saliency map.

    ``study_id`` must be a plain name (use the pseudonymous key); ``images`` (the source
    volumes by role) are drawn under the PNG overlay when given; ``study_key`` (the
    pseudonymous key, default ``study_id``) is named in the figure's title. Returns the
    written paths by ``"<role>.nii.gz"`` / ``"<role>.png"``.
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
            _write_png(volume, (images or {}).get(role), png, role,
                       title=study_key or study_id, method=explanation.method)
            written[nii.name] = nii
            written[png.name] = png
    except OSError as error:
        raise OutputError(
            f"could not write saliency maps ({type(error).__name__}); check that the "
            "saliency folder is writable and the disk has space."
        ) from None
    return written
