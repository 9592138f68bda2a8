"""A classic cross-sectional series (one single-frame file per slice): localizers set aside,
each file's header turned into a slice, pixels read and rescaled, then stacked by
:mod:`medfusion.io.dicom.stack`. Siemens mosaics are handed to :mod:`.mosaic`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medfusion.errors import (
    CorruptFileError,
    UnsupportedInputError,
)
from medfusion.io.dicom.headers import SeriesInfo, _FileHeader, _float, _floats, _int, _json_value
from medfusion.io.dicom.meta import _meta
from medfusion.io.dicom.mosaic import _is_mosaic, _load_mosaic
from medfusion.io.dicom.parallel import decode_parallel
from medfusion.io.dicom.pixels import _check_pixel_module, _max_stored, _read_stored
from medfusion.io.dicom.stack import _assemble_stack, _Slice
from medfusion.io.limits import check_declared_size
from medfusion.types import Finding, Volume


def _slices_from_header(h: _FileHeader, file_index: int) -> list[_Slice]:
    ds = h.ds
    rows = _int(ds.get("Rows"), 0) or 0
    cols = _int(ds.get("Columns"), 0) or 0
    slope = _float(ds.get("RescaleSlope"), 1.0)
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    keys: dict[str, Any] = {}
    for tag in ("TemporalPositionIdentifier", "AcquisitionNumber", "TriggerTime", "EchoTime",
                "EchoNumbers", "DiffusionBValue"):
        value = ds.get(tag)
        if value is not None and value != "":
            keys[tag] = _json_value(value)
    for tag in ("AcquisitionTime", "ContentTime"):
        value = ds.get(tag)
        if value:
            keys["_" + tag] = str(value)
    return [
        _Slice(
            file_index=file_index,
            frame=f,
            ipp=_floats(ds.get("ImagePositionPatient"), 3),
            iop=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
            rows=rows,
            cols=cols,
            slope=1.0 if slope is None else slope,
            intercept=0.0 if intercept is None else intercept,
            thickness=_float(ds.get("SliceThickness")),
            instance_number=_int(ds.get("InstanceNumber")),
            time_keys=keys,
            n_temporal=_int(ds.get("NumberOfTemporalPositions")),
        )
        for f in range(h.n_frames)
    ]


def _load_stack(
    headers: Sequence[_FileHeader], info: SeriesInfo, *, strict: bool, what: str
) -> Volume:
    ds0 = headers[0].ds
    if _is_mosaic(ds0):
        return _load_mosaic(headers, info, what=what)
    pre_findings: list[Finding] = []
    localizer = [_is_localizer(h.ds) for h in headers]
    if any(localizer) and not all(localizer):
        # Some scanners file the scout images in the axial series: they are not part of
        # the stack (other orientation or size), so they are set aside and recorded.
        headers = [h for h, loc in zip(headers, localizer, strict=True) if not loc]
        ds0 = headers[0].ds
        pre_findings.append(
            Finding(
                "LOCALIZER_EXCLUDED",
                f"{sum(localizer)} localizer image(s) in the series were not stacked.",
                {"count": int(sum(localizer))},
            )
        )
    slices: list[_Slice] = []
    for n, h in enumerate(headers):
        _check_pixel_module(h, f"{what}, file #{n + 1}")
        if h.n_frames > 1:
            raise UnsupportedInputError(
                f"{what}: a multi-frame file without per-frame geometry cannot be stacked. "
                "Convert it to single-frame or enhanced DICOM.",
            )
        slices.extend(_slices_from_header(h, n))
    total = sum(s.rows * s.cols for s in slices)
    check_declared_size((total,), 4, what)
    compressed_zero: list[bool] = []

    def read_plane(indices: list[int], out: np.ndarray) -> list[bool]:
        compressed_zero.clear()
        # Compressed files decoded across processes when this process has idle cores.
        files = sorted({slices[i].file_index for i in indices})
        decoded = decode_parallel([headers[f] for f in files], what, strict=strict)
        ready = dict(zip(files, decoded, strict=True)) if decoded is not None else {}
        for n, i in enumerate(indices):
            s = slices[i]
            h = headers[s.file_index]
            if s.file_index in ready:
                stored, compressed = ready[s.file_index]
            else:
                stored, compressed = _read_stored(h, f"{what}, file #{s.file_index + 1}",
                                                  strict=strict)
            plane = stored[s.frame]
            if plane.shape != (s.rows, s.cols):
                raise CorruptFileError(f"{what}: a decoded slice has the wrong size.")
            dst = out[n]
            if s.slope == 1.0:  # one pass: convert and add the intercept together
                np.add(plane, np.float32(s.intercept), out=dst, dtype=np.float32)
            else:
                np.multiply(plane, np.float32(s.slope), out=dst, dtype=np.float32)
                if s.intercept != 0.0:
                    dst += np.float32(s.intercept)
            compressed_zero.append(bool(compressed and not plane.any()))
        return list(compressed_zero)

    arr, affine, findings, extra = _assemble_stack(
        slices, read_plane, strict=strict, what=what, modality=info.modality,
        max_stored=max(_max_stored(h.ds) for h in headers),
    )
    meta = _meta(ds0, info)
    meta.update(extra)
    return Volume(array=arr, affine=affine, modality=info.modality, meta=meta,
                  issues=(*pre_findings, *findings))


def _is_localizer(ds: Any) -> bool:
    value = ds.get("ImageType") or []
    values = [value] if isinstance(value, str) else list(value)
    return "LOCALIZER" in [str(v).upper() for v in values]
