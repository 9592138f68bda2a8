"""World-geometry plausibility checks shared by stacks and radiographs (pixel spacing,
slice positions, image extent) and the LPS -> RAS conversion of an affine."""

from __future__ import annotations

import numpy as np

from medfusion.errors import (
    GeometryError,
)


def _lps_to_ras(m: np.ndarray) -> np.ndarray:
    out = np.array(m, dtype=np.float64, copy=True)
    out[:2, :] *= -1.0
    return out


#: Largest plausible extent of an image along any axis, and largest plausible distance
#: of a position from the scanner origin. Human anatomy and scanner bores are under
#: 2 m; beyond these the header is corrupt (and float precision and memory suffer).
_MAX_EXTENT_MM = 10_000.0


_MAX_POSITION_MM = 100_000.0


#: Smallest plausible pixel spacing (1 micrometre: below any CT, MR or X-ray detector).
_MIN_SPACING_MM = 1e-3


#: Direction cosines written with few decimals are unit length to well within this.
_IOP_UNIT_TOL = 0.01


def _check_pixel_spacing(spacings: np.ndarray, what: str) -> None:
    """Refuse PixelSpacing that would give a mirrored, singular or non-finite affine."""
    if not np.all(np.isfinite(spacings)):
        raise GeometryError(
            f"{what}: PixelSpacing holds NaN or infinite values. The header is corrupt; "
            "re-export the series.",
            code="INVALID_PIXEL_SPACING",
        )
    if np.any(spacings <= 0):
        raise GeometryError(
            f"{what}: PixelSpacing is zero or negative (a negative spacing would mirror the "
            "image, a zero one collapses it). The header is corrupt; re-export the series.",
            code="INVALID_PIXEL_SPACING",
        )
    if np.any(spacings < _MIN_SPACING_MM):
        raise GeometryError(
            f"{what}: PixelSpacing of {float(spacings.min()):.3g} mm is below "
            f"{_MIN_SPACING_MM} mm, not a physical pixel size. The header is corrupt; "
            "re-export the series.",
            code="INVALID_PIXEL_SPACING",
        )


def _check_positions(
    ipps: np.ndarray, normal: np.ndarray, plane_mm: tuple[float, float], what: str
) -> None:
    """Refuse slice positions and image extents that no scanner produces (a corrupt
    ImagePositionPatient or PixelSpacing would otherwise give a huge or non-finite grid)."""
    if not np.all(np.isfinite(ipps)):
        raise GeometryError(
            f"{what}: ImagePositionPatient holds NaN or infinite values. The header is "
            "corrupt; re-export the series.",
            code="INVALID_POSITION",
        )
    if float(np.abs(ipps).max()) > _MAX_POSITION_MM:
        raise GeometryError(
            f"{what}: ImagePositionPatient lies {float(np.abs(ipps).max()):.3g} mm from the "
            f"scanner origin (over {_MAX_POSITION_MM / 1000:.0f} m), not a physical position. "
            "The header is corrupt; re-export the series.",
            code="IMPLAUSIBLE_GEOMETRY",
        )
    span = float(np.linalg.norm(ipps.max(axis=0) - ipps.min(axis=0)))
    extent = max(span, *plane_mm)
    if extent > _MAX_EXTENT_MM:
        raise GeometryError(
            f"{what}: the image would extend {extent / 1000:.3g} m (slice positions or "
            f"Rows/Columns x PixelSpacing), over the plausible {_MAX_EXTENT_MM / 1000:.0f} m. "
            "The header is corrupt; re-export the series.",
            code="IMPLAUSIBLE_GEOMETRY",
        )
