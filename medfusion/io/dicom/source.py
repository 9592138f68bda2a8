"""The header facts of a loaded series that a DICOM result object needs (``Volume.dicom``).

A parametric map or structured report written back into the patient's study has to name the
study, series, frame of reference and instances it was computed from and copy the Patient
and General Study attributes (DICOM requires them). :func:`dicom_source` keeps exactly those
from the header pass, as a :class:`~medfusion.types.DicomSource`: no pixel data, no other
tag. Nothing here is logged or summarised; only ``medfusion.explain.dicom`` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfusion.io.dicom.headers import (
    IDENTITY_TAGS,
    SeriesInfo,
    _FileHeader,
    _float,
    _floats,
    _header_iop,
    _int,
    _is_enhanced,
)
from medfusion.io.dicom.mosaic import _is_mosaic
from medfusion.io.dicom.series import _is_localizer
from medfusion.types import DicomSource, SourceInstance

__all__ = ["dicom_source"]


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def dicom_source(headers: Sequence[_FileHeader], info: SeriesInfo) -> DicomSource | None:
    """The series' UIDs, geometry and identity, or None when the headers lack the UIDs a
    result object must reference (no StudyInstanceUID, SeriesInstanceUID or SOP UIDs)."""
    if not headers:
        return None
    localizer = [_is_localizer(h.ds) for h in headers]
    if any(localizer) and not all(localizer):  # set aside by the stack reader too
        headers = [h for h, loc in zip(headers, localizer, strict=True) if not loc]
    ds0 = headers[0].ds
    study_uid = _text(ds0.get("StudyInstanceUID"))
    series_uid = _text(ds0.get("SeriesInstanceUID"))
    if not study_uid or not series_uid:
        return None
    instances: list[SourceInstance] = []
    for h in headers:
        sop_class = _text(h.ds.get("SOPClassUID"))
        sop_uid = _text(h.ds.get("SOPInstanceUID"))
        if not sop_class or not sop_uid:
            return None
        ipp = _floats(h.ds.get("ImagePositionPatient"), 3)
        position = None if ipp is None else (float(ipp[0]), float(ipp[1]), float(ipp[2]))
        instances.append(SourceInstance(sop_class, sop_uid, position))
    iop = _header_iop(ds0)
    multiframe = bool(_is_enhanced(ds0) or _is_mosaic(ds0)
                      or any(h.n_frames > 1 for h in headers))
    if iop is not None and not multiframe and all(i.position is not None for i in instances):
        # in slice order: along the normal, as the stack reader orders them
        normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
        instances.sort(key=lambda i: (float(np.dot(normal, i.position or (0, 0, 0))),
                                      i.sop_instance_uid))
    spacing = _floats(ds0.get("PixelSpacing"), 2)
    identity = {tag: _text(ds0.get(tag)) for tag in IDENTITY_TAGS}
    return DicomSource(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=_text(ds0.get("FrameOfReferenceUID")) or None,
        modality=info.modality,
        rows=_int(ds0.get("Rows"), 0) or 0,
        columns=_int(ds0.get("Columns"), 0) or 0,
        orientation=None if iop is None else tuple(float(v) for v in iop),
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        slice_thickness=_float(ds0.get("SliceThickness")),
        instances=tuple(instances),
        multiframe=multiframe,
        series_number=_int(ds0.get("SeriesNumber")),
        identity=identity,
    )
