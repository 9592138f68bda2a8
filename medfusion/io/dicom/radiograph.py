"""Projection radiographs (CR/DX/MG ...): modality LUT, VOI (LUT, window, or the full stored
range) to [0, 1], MONOCHROME1 inversion, pixel spacing and the world frame ITK gives one
image."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medfusion.errors import (
    GeometryError,
    InvalidValuesError,
    UnsupportedInputError,
)
from medfusion.io.dicom.geometry import (
    _MAX_EXTENT_MM,
    _MIN_SPACING_MM,
    _check_pixel_spacing,
    _lps_to_ras,
)
from medfusion.io.dicom.headers import SeriesInfo, _FileHeader, _float, _floats, _int
from medfusion.io.dicom.meta import _meta
from medfusion.io.dicom.pixels import _FLOAT32_MAX, _max_stored, _read_stored, _rescale_bound
from medfusion.types import Finding, Volume

#: A window narrower than this (in output units of the modality LUT) is a threshold, not
#: a presentation window: such a VOI is ignored rather than turned into a binary image.
_MIN_WINDOW_WIDTH = 1e-3


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """DICOM PS3.3 C.11.2.1.2 VOI window to [0, 1], computed in float64 (a tiny width must
    not turn 0/0 into NaN). None when the window is unusable: a width that is not finite,
    below :data:`_MIN_WINDOW_WIDTH`, or below 1 for LINEAR (the standard requires >= 1),
    a non-finite center, or a result that is not finite."""
    function = function.upper()
    if not (math.isfinite(center) and math.isfinite(width)) or width < _MIN_WINDOW_WIDTH:
        return None
    xd = x.astype(np.float64)
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (xd - center) / width))
    elif function == "LINEAR_EXACT":
        y = (xd - center) / width + 0.5
    else:
        if width < 1:
            return None
        if width == 1:  # the standard's LINEAR with width 1 is a step at center - 0.5
            y = (xd > center - 0.5).astype(np.float64)
        else:
            y = (xd - (center - 0.5)) / (width - 1.0) + 0.5
    out = np.clip(y, 0.0, 1.0).astype(np.float32)
    if not np.all(np.isfinite(out)):
        return None
    return out


def _voi_lut(item: Any) -> tuple[np.ndarray, int, int] | None:
    """(LUT entries, first mapped value, bits) of a VOILUTSequence item; None when the
    item is malformed (descriptor missing or out of range, no data)."""
    desc = _floats(item.get("LUTDescriptor"), 3)
    if desc is None or not all(math.isfinite(v) for v in desc):
        return None
    n_entries, first, bits = int(desc[0]) or 65536, int(desc[1]), int(desc[2])
    if not (0 < n_entries <= 65536 and 1 <= bits <= 16):
        return None
    lut_raw = item.get("LUTData")
    if lut_raw is None:
        return None
    if isinstance(lut_raw, (bytes, bytearray)):
        lut = np.frombuffer(bytes(lut_raw[: len(lut_raw) // 2 * 2]), dtype="<u2")[:n_entries]
    else:
        lut = np.asarray(_floats(lut_raw) or (), dtype=np.float64)[:n_entries]
    if lut.size == 0 or not np.all(np.isfinite(lut)):
        return None
    return lut.astype(np.float32), first, bits


def _projection_spacing(
    ds: Any, shape_rc: tuple[int, int], what: str
) -> tuple[tuple[float, float], list[Finding], str]:
    """Pixel spacing of a radiograph: PixelSpacing, else ImagerPixelSpacing, else 1 mm.

    Absent or all-zero values (written by some devices for "unknown") fall through to the
    next source with a finding; a present PixelSpacing that is negative, non-finite,
    implausibly small or large is refused (``INVALID_PIXEL_SPACING``), as for a series.
    """

    pixel = _floats(ds.get("PixelSpacing"), 2)
    imager = _floats(ds.get("ImagerPixelSpacing"), 2)
    findings: list[Finding] = []
    if pixel is not None and any(v != 0 for v in pixel):
        _check_pixel_spacing(np.asarray([pixel], dtype=np.float64), what)
        chosen, source = pixel, "PixelSpacing"
    elif imager is not None and all(math.isfinite(v) and v >= _MIN_SPACING_MM for v in imager):
        chosen, source = imager, "ImagerPixelSpacing"
        findings.append(Finding(
            "IMAGER_PIXEL_SPACING",
            "PixelSpacing absent; ImagerPixelSpacing (at the detector, not corrected for "
            "magnification) was used.",
            {},
        ))
    else:
        chosen, source = (1.0, 1.0), "none"
        findings.append(Finding("NO_PIXEL_SPACING",
                                "no pixel spacing in the header; 1 mm assumed.", {}))
    extent = max(shape_rc[0] * chosen[0], shape_rc[1] * chosen[1])
    if extent > _MAX_EXTENT_MM:
        raise GeometryError(
            f"{what}: the image would extend {extent / 1000:.3g} m (Rows/Columns x "
            f"{source}), over the plausible {_MAX_EXTENT_MM / 1000:.0f} m. The header is "
            "corrupt; re-export the image.",
            code="IMPLAUSIBLE_GEOMETRY",
        )
    return (float(chosen[0]), float(chosen[1])), findings, source


def _projection_frame(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, origin) of a radiograph in LPS: from
    ImageOrientationPatient (two unit, perpendicular cosines) and ImagePositionPatient when
    present and valid, else the identity orientation and origin 0, as ITK/GDCM read it."""
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is not None and all(math.isfinite(v) for v in iop):
        r, c = np.asarray(iop[:3]), np.asarray(iop[3:])
        nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
        if nr > 1e-6 and nc > 1e-6 and abs(float(r @ c)) / (nr * nc) <= 1e-3:
            row_dir, col_dir = r / nr, c / nc
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    origin = np.zeros(3)
    if ipp is not None and all(math.isfinite(v) for v in ipp):
        origin = np.asarray(ipp, dtype=np.float64)
    return row_dir, col_dir, origin


def _projection_rescale(ds: Any, what: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a radiograph (1 and 0 when absent); refuses a
    non-finite pair or one that scales stored values past float32 (``INVALID_VALUES``)."""
    slope = _float(ds.get("RescaleSlope"), 1.0) or 1.0
    intercept = _float(ds.get("RescaleIntercept"), 0.0) or 0.0
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise InvalidValuesError(
            f"{what}: RescaleSlope/RescaleIntercept is NaN or infinite. Fix the header.",
        )
    if _rescale_bound(_max_stored(ds), slope, intercept) > _FLOAT32_MAX / 2:
        raise InvalidValuesError(
            f"{what}: RescaleSlope/RescaleIntercept scale stored values beyond the float32 "
            "range (voxels would be infinite). Fix the header.",
        )
    return slope, intercept


def _projection_voi(
    values: np.ndarray, ds: Any, slope: float, intercept: float
) -> tuple[np.ndarray, list[Finding], dict[str, Any]]:
    """The VOI step to [0, 1]: the VOI LUT, else the first window, else the full stored
    range. Returns (values, findings, meta); an unusable source is skipped with a
    ``VOI_IGNORED`` finding."""
    findings: list[Finding] = []
    meta_extra: dict[str, Any] = {}
    voi_seq = ds.get("VOILUTSequence")
    centers = _floats(ds.get("WindowCenter"))
    widths = _floats(ds.get("WindowWidth"))
    voi: np.ndarray | None = None
    if voi_seq:
        lut_spec = _voi_lut(voi_seq[0])
        if lut_spec is None:
            findings.append(Finding(
                "VOI_IGNORED",
                "the VOI LUT is malformed (descriptor or data missing or out of range) and "
                "was ignored; the next VOI source was used.",
                {"source": "VOILUTSequence"},
            ))
        else:
            lut, first, bits = lut_spec
            index = np.clip(np.rint(values - first), 0, len(lut) - 1).astype(np.int64)
            voi = lut[index] / np.float32((1 << bits) - 1)
            meta_extra["voi"] = "lut"
    if voi is None and centers and widths:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        voi = _window(values, centers[0], widths[0], function)
        if voi is None:
            findings.append(Finding(
                "VOI_IGNORED",
                "the VOI window (WindowCenter/WindowWidth) is unusable (not finite, or "
                "narrower than the VOI function allows) and was ignored; the full stored "
                "range was used.",
                {"source": "WindowCenter/WindowWidth"},
            ))
        else:
            meta_extra["voi"] = "window"
            meta_extra["window"] = [centers[0], widths[0]]
    if voi is None:
        bits_stored = _int(ds.get("BitsStored"), 16) or 16
        signed = (_int(ds.get("PixelRepresentation"), 0) or 0) == 1
        lo = -(1 << (bits_stored - 1)) if signed else 0
        hi = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
        a, b = lo * slope + intercept, hi * slope + intercept
        lo_v, hi_v = min(a, b), max(a, b)
        voi = np.clip((values - lo_v) / max(hi_v - lo_v, 1e-12), 0.0, 1.0).astype(np.float32)
        meta_extra["voi"] = "none (full stored range)"
    return voi, findings, meta_extra


def _projection_affine(ds: Any, spacing: tuple[float, float]) -> np.ndarray:
    """The LPS affine of a radiograph on the grid ITK reads (see :func:`_projection_frame`)."""
    row_spacing, col_spacing = float(spacing[0]), float(spacing[1])
    # The frame every DICOM toolkit (ITK/GDCM, dcm2niix) gives one image, so that maps
    # written on this grid (saliency) overlay the radiograph in their viewers: the header's
    # ImageOrientationPatient / ImagePositionPatient when present and valid (k = row x
    # column, unit length), else the identity orientation with the origin at the first
    # pixel. A radiograph rarely has them: its world frame is then a convention only.
    row_dir, col_dir, origin = _projection_frame(ds)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = np.cross(row_dir, col_dir)
    lps[:3, 3] = origin
    return lps


def _load_projection(h: _FileHeader, info: SeriesInfo, *, strict: bool, what: str) -> Volume:
    """A radiograph: modality LUT, VOI (LUT, else window, else full stored range) to
    [0, 1], then MONOCHROME1 inverted so that dense is bright. K = 1; frames go to T.

    A malformed VOI LUT or an unusable window (see :func:`_window`) is ignored with a
    ``VOI_IGNORED`` finding and the next VOI source is used."""
    ds = h.ds
    findings: list[Finding] = []
    slope, intercept = _projection_rescale(ds, what)
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    spacing, spacing_findings, spacing_source = _projection_spacing(ds, (rows, cols), what)
    photometric = str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").upper()
    stored, compressed = _read_stored(h, what, strict=strict)
    frames = stored.astype(np.float32)
    if compressed:
        zeros = [f for f in range(stored.shape[0]) if not stored[f].any()]
        if zeros:
            findings.append(Finding("ZERO_FRAME", f"{len(zeros)} frame(s) decoded to all zeros.",
                                    {"count": len(zeros)}))
    values = frames * np.float32(slope) + np.float32(intercept)
    values, voi_findings, meta_extra = _projection_voi(values, ds, slope, intercept)
    findings.extend(voi_findings)
    if photometric == "MONOCHROME1":
        values = np.float32(1.0) - values
        findings.append(
            Finding(
                "MONOCHROME1_INVERTED",
                "MONOCHROME1 image inverted after the VOI step so that dense is bright.",
                {},
            )
        )
        meta_extra["inverted"] = True
    elif photometric != "MONOCHROME2":
        raise UnsupportedInputError(
            f"{what}: PhotometricInterpretation {photometric} is not supported for "
            "radiographs; expected MONOCHROME1 or MONOCHROME2.",
        )
    findings.extend(spacing_findings)
    meta_extra["spacing_source"] = spacing_source
    lps = _projection_affine(ds, spacing)
    arr = values.transpose(2, 1, 0)[:, :, None, :]  # (I, J, 1, F)
    if arr.shape[3] == 1:
        arr = arr[..., 0]
    else:
        findings.append(Finding("MULTI_FRAME", f"{arr.shape[3]} frames returned along T.",
                                {"n_frames": int(arr.shape[3])}))
    meta = _meta(ds, info)
    meta.update(meta_extra)
    meta["PhotometricInterpretation"] = photometric
    return Volume(array=np.ascontiguousarray(arr, dtype=np.float32), affine=_lps_to_ras(lps),
                  modality=info.modality, meta=meta, issues=tuple(findings))
