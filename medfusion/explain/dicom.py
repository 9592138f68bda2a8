"""DICOM result objects for a PACS: a TID 1500 structured report and parametric maps.

:func:`write_dicom_results` writes, for one study whose images came from DICOM:

* ``sr.dcm``: a Comprehensive 3D SR (TID 1500 Measurement Report, written with highdicom)
  holding the predicted label, the calibrated probability of every label, the conformal
  prediction set and its error rate, abstain, flags, modality weights and Shapley values,
  the model's name, version and card digest (TID 4019 algorithm identification), and
  references to every source instance (the measurement group's source images and the
  evidence sequences);
* ``<role>_map.dcm`` per imaging role with a saliency map: a Parametric Map with float
  frames on the source series' own grid: one frame per source slice position, at that
  slice's ImagePositionPatient with its orientation and pixel spacing (highdicom matches
  each frame to its source instance). The map is sampled on each source plane from the
  saliency volume (exact where the loader's grid is the series' own; interpolated where the
  loader resampled a tilted or unevenly spaced series). A radiograph gets one frame.

Every object has new SOP instance and series UIDs and the Patient and General Study
attributes of its source, as DICOM requires, so it files into the patient's study. These
objects therefore carry identity; they are written only on request, never mixed into the
PHI-free outputs. With ``deidentify=True`` the patient name and ID become the study's
pseudonymous key, the other identity attributes (dates included) are emptied, and every
source UID (study, series, frame of reference, instances) is replaced by a keyed digest
(``2.25.<int>``), consistently across the objects of a run, so they still reference each
other but no longer the hospital's instances.

A role read from NIfTI has no DICOM source: no object is made for it; a study with no DICOM
role gets nothing (the caller records why). Enhanced multi-frame and mosaic sources get the
report but no parametric map (their frames are not one instance each).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfusion import __version__
from medfusion.atomic import atomic_path
from medfusion.errors import ExplanationError, OutputError
from medfusion.keys import pseudonym
from medfusion.models.card import ModelCard
from medfusion.types import DicomSource, Explanation, Prediction, Volume

__all__ = [
    "CODING_SCHEME",
    "DicomResults",
    "ModelIdentity",
    "card_digest",
    "write_dicom_results",
]

#: private coding scheme of medfusion's concept names (DICOM private schemes start "99")
CODING_SCHEME = "99MEDFUSION"
SR_NAME = "sr.dcm"
PARAMETRIC_MAP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SR_SERIES_NUMBER = 9900
MAP_SERIES_NUMBER = 9901
MANUFACTURER = "medfusion"
#: why a study or role gets no DICOM object (recorded by the caller, e.g. in run.json)
NO_DICOM_SOURCE = "no DICOM source (read from NIfTI)"
MULTIFRAME_SOURCE = "multi-frame or mosaic source: parametric map not written"
NO_GEOMETRY = "source slices lack position or orientation: parametric map not written"


def card_digest(card: ModelCard) -> str:
    """sha256 of the model card as ``medfusion score`` records it in run.json."""
    text = json.dumps(card.to_dict(), sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(text).hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """What the report says about the model: a name (the package folder's name), the
    medfusion version that trained it and the sha256 of its card."""

    name: str
    version: str
    card_sha256: str

    @classmethod
    def of(cls, card: ModelCard, directory: str | Path | None) -> ModelIdentity:
        name = Path(directory).name if directory is not None else "medfusion-model"
        version = str(card.get("medfusion_version") or "unknown")
        return cls(name=name or "medfusion-model", version=version,
                   card_sha256=card_digest(card))


@dataclass(frozen=True)
class DicomResults:
    """What :func:`write_dicom_results` wrote: the report, the maps by role, and the
    roles (or ``"study"``) that got no object, with the reason."""

    sr: Path | None = None
    maps: Mapping[str, Path] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """PHI-free: file names and reasons only."""
        return {"sr": self.sr.name if self.sr else None,
                "maps": {r: p.name for r, p in sorted(self.maps.items())},
                "skipped": dict(sorted(self.skipped.items()))}


# --- identity and UIDs ----------------------------------------------------------------------
class _Identity:
    """The source's identity as written: as read, or de-identified (see module docstring)."""

    def __init__(self, study_key: str, deidentify: bool) -> None:
        self.study_key = study_key
        self.deidentify = deidentify

    def uid(self, value: str) -> str:
        if not self.deidentify:
            return value
        return "2.25." + str(int(pseudonym("dicom-uid:" + value, length=32), 16))

    def attributes(self, source: DicomSource) -> dict[str, str]:
        if not self.deidentify:
            return {k: str(v) for k, v in source.identity.items()}
        out = dict.fromkeys(source.identity, "")
        out["PatientName"] = self.study_key + "^"  # one name component, said explicitly
        out["PatientID"] = self.study_key
        return out


def _source_datasets(source: DicomSource, ident: _Identity,
                     planar: Volume | None = None) -> list[Any]:
    """Header-only stand-ins of the source instances (what highdicom reads from its source
    images: UIDs, identity, geometry). No pixel data.

    ``planar``: a radiograph's volume as loaded. A projection image has no patient frame of
    reference, but a parametric map must have one: its stand-in gets a frame of reference of
    its own (a keyed digest of the series UID, referenced by the map only) and the plane
    geometry of the loaded radiograph, so the map's one frame lies exactly over the image.
    """
    from pydicom.dataset import Dataset

    out = []
    for inst in source.instances:
        ds = Dataset()
        ds.SOPClassUID = inst.sop_class_uid
        ds.SOPInstanceUID = ident.uid(inst.sop_instance_uid)
        ds.StudyInstanceUID = ident.uid(source.study_instance_uid)
        ds.SeriesInstanceUID = ident.uid(source.series_instance_uid)
        ds.Modality = source.modality if source.modality != "unknown" else "OT"
        for keyword, value in ident.attributes(source).items():
            setattr(ds, keyword, value)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName"):
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.Rows = source.rows
        ds.Columns = source.columns
        if source.frame_of_reference_uid and inst.position is not None \
                and source.orientation is not None and not source.multiframe:
            ds.FrameOfReferenceUID = ident.uid(source.frame_of_reference_uid)
            ds.ImageOrientationPatient = [float(v) for v in source.orientation]
            ds.ImagePositionPatient = [float(v) for v in inst.position]
            if source.pixel_spacing is not None:
                ds.PixelSpacing = [float(v) for v in source.pixel_spacing]
            ds.SliceThickness = (None if source.slice_thickness is None
                                 else float(source.slice_thickness))
        elif planar is not None:
            lps = np.array(planar.affine, dtype=np.float64)
            lps[:2, :] *= -1.0
            spacing = np.linalg.norm(lps[:3, :3], axis=0)
            row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
            ds.FrameOfReferenceUID = "2.25." + str(int(pseudonym(
                "projection-frame:" + ds.SeriesInstanceUID, length=32), 16))
            ds.PositionReferenceIndicator = ""
            ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
            ds.ImagePositionPatient = [float(v) for v in lps[:3, 3]]
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
            ds.SliceThickness = float(spacing[2])
        elif source.pixel_spacing is not None:
            ds.PixelSpacing = [float(v) for v in source.pixel_spacing]
        out.append(ds)
    return out


# --- the parametric map ---------------------------------------------------------------------
def _unique_planes(datasets: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """One instance per slice position (the first), and the rest (time points, echoes at
    the same position): the map has one frame per position."""
    seen: set[tuple[float, ...]] = set()
    first, rest = [], []
    for ds in datasets:
        key = tuple(round(float(v), 2) for v in ds.ImagePositionPatient)
        (rest if key in seen else first).append(ds)
        seen.add(key)
    return first, rest


def _plane_frame(saliency: Volume, ds: Any) -> np.ndarray:
    """The saliency sampled on the pixels of one source plane, shape (rows, columns)."""
    from scipy.ndimage import map_coordinates

    rows, cols = int(ds.Rows), int(ds.Columns)
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    r, c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                       indexing="ij")
    lps = (ipp[:, None, None] + row_dir[:, None, None] * (c * dc)[None]
           + col_dir[:, None, None] * (r * dr)[None])
    ras = lps.reshape(3, -1).copy()
    ras[:2] *= -1.0
    inv = np.linalg.inv(saliency.affine)
    ijk = inv[:3, :3] @ ras + inv[:3, 3:4]
    arr = np.asarray(saliency.array, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[..., 0]
    rounded = np.rint(ijk)
    shape = np.asarray(arr.shape)[:, None]
    if np.abs(ijk - rounded).max() < 1e-3 and (rounded >= 0).all() and (rounded < shape).all():
        idx = rounded.astype(np.intp)  # the loader's grid is the series' own: exact values
        values = arr[idx[0], idx[1], idx[2]]
    else:
        values = map_coordinates(arr, ijk, order=1, mode="constant", cval=0.0)
    return np.clip(values, 0.0, 1.0).astype(np.float32).reshape(rows, cols)


def _parametric_map(saliency: Volume, source: DicomSource, ident: _Identity, role: str,
                    method: str, instance_number: int) -> tuple[Any | None, str | None]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if source.multiframe:
        return None, MULTIFRAME_SOURCE
    planar = (saliency if not source.frame_of_reference_uid and len(source.instances) == 1
              and saliency.spatial_shape[2] == 1 else None)
    datasets = _source_datasets(source, ident, planar)
    if "ImagePositionPatient" not in datasets[0]:
        return None, NO_GEOMETRY
    planes, further = _unique_planes(datasets)
    frames = np.stack([_plane_frame(saliency, ds) for ds in planes])
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SALIENCY",
        lut_explanation=f"{method} saliency, 0 to 1",
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=planes,
        further_source_images=further or None,
        pixel_array=frames,
        series_instance_uid=hd.UID(),
        series_number=MAP_SERIES_NUMBER + instance_number - 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="medfusion",
        software_versions=__version__,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5,
                                                         window_width=1.0)],
        content_label="SALIENCY",
        content_description=f"{role} saliency ({method})"[:64],
        series_description=f"medfusion saliency {role}"[:64],
    )
    return pm, None


# --- the structured report ------------------------------------------------------------------
def _concept(value: str, meaning: str) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value[:64], scheme_designator=CODING_SCHEME,
                              meaning=meaning[:64])


def _short(prefix: str, text: str) -> str:
    """A code value of at most 16 characters (SH) that stays unique for any label text."""
    code = f"{prefix}-{text}"
    return code if len(code) <= 16 else f"{prefix}-{pseudonym(text, length=8)}"


def _report(prediction: Prediction, model: ModelIdentity, alpha: float | None,
            evidence: Sequence[Any]) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    none = codes.UCUM.NoUnits
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name[:64], version=model.version[:64],
        parameters=[f"model card sha256 {model.card_sha256}",
                    f"written by medfusion {__version__}"])
    labels = list(prediction.labels)
    measurements = [
        hd.sr.Measurement(name=_concept(_short("prob", lab), f"Calibrated probability of {lab}"),
                          value=float(prediction.probabilities[lab]), unit=none)
        for lab in labels if lab in prediction.probabilities
    ]
    for name, values in (("weight", prediction.modality_weights),
                         ("shapley", prediction.shapley)):
        meaning = "Modality weight of" if name == "weight" else "Shapley value of"
        for modality, value in sorted((values or {}).items()):
            if value is not None and np.isfinite(value):
                measurements.append(hd.sr.Measurement(
                    name=_concept(_short(name, modality), f"{meaning} {modality}"),
                    value=float(value), unit=none))
    if alpha is not None and prediction.prediction_set is not None:
        measurements.append(hd.sr.Measurement(
            name=_concept("alpha", "Conformal error rate"), value=float(alpha), unit=none))
    evaluations = [hd.sr.QualitativeEvaluation(
        name=_concept("predicted", "Predicted label"),
        value=_concept(_short("label", prediction.predicted), prediction.predicted))]
    if prediction.prediction_set is not None:
        members = set(prediction.prediction_set)
        for lab in labels:
            if lab in members:
                evaluations.append(hd.sr.QualitativeEvaluation(
                    name=_concept("set-member", "Conformal prediction set member"),
                    value=_concept(_short("label", lab), lab)))
    if prediction.abstain is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_concept("abstain", "Abstain"),
            value=codes.SCT.Yes if prediction.abstain else codes.SCT.No))
    for flag in sorted(set(prediction.flags)):
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_concept("flag", "Flag"), value=_concept(_short("flag", flag), flag)))
    sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in evidence]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(),
                                                      identifier="medfusion prediction"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=sources,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="medfusion", manufacturer_name=MANUFACTURER,
            model_name=model.name[:64]))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept(value="363679005", scheme_designator="SCT",
                                              meaning="Imaging"),
        imaging_measurements=[group],
    )


# --- writing ------------------------------------------------------------------------------
def _save(dataset: Any, path: Path) -> None:
    if "Laterality" not in dataset and "ImageLaterality" not in dataset \
            and dataset.get("SOPClassUID") == PARAMETRIC_MAP_CLASS:
        dataset.Laterality = ""  # General Series type 2C: unknown (a map of any body part)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)


def _build(prediction: Prediction, explanation: Explanation | None,
           dicom_roles: Mapping[str, DicomSource], ident: _Identity, model: ModelIdentity,
           alpha: float | None, method: str, skipped: dict[str, str]
           ) -> tuple[dict[str, Any], Any]:
    """The parametric maps by role and the report (not yet written)."""
    import highdicom as hd

    try:
        maps_ds: dict[str, Any] = {}
        for n, (role, source) in enumerate(dicom_roles.items(), start=1):
            saliency = explanation.saliency.get(role) if explanation is not None else None
            if saliency is None:
                skipped[role] = "no saliency map for this role"
                continue
            pm, reason = _parametric_map(saliency, source, ident, role, method, n)
            if pm is None:
                skipped[role] = str(reason)
            else:
                maps_ds[role] = pm
        evidence = [ds for role in dicom_roles
                    for ds in _source_datasets(dicom_roles[role], ident)]
        report = _report(prediction, model, alpha, evidence)
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=hd.UID(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description="medfusion AI result",
        )
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as error:
        raise ExplanationError(
            f"the DICOM result objects could not be built ({type(error).__name__}); the "
            "source headers may lack a required attribute."
        ) from None
    return maps_ds, sr


def write_dicom_results(
    prediction: Prediction,
    explanation: Explanation | None,
    sources: Mapping[str, Volume],
    directory: str | Path,
    *,
    model: ModelIdentity,
    study_key: str,
    alpha: float | None = None,
    deidentify: bool = False,
) -> DicomResults:
    """Write the report and parametric maps of one study into ``directory`` (created).

    ``sources`` are the volumes as loaded, by role (their ``dicom`` headers are what the
    objects reference); ``study_key`` is the pseudonymous key used when ``deidentify``.
    Nothing is written, and the reason returned in ``skipped["study"]``, when no role came
    from DICOM. Raises OutputError when the folder cannot be written.
    """
    dicom_roles = {r: v.dicom for r, v in sorted(sources.items()) if v.dicom is not None}
    skipped = {r: NO_DICOM_SOURCE for r in sorted(sources) if r not in dicom_roles}
    if not dicom_roles:
        return DicomResults(skipped={"study": NO_DICOM_SOURCE, **skipped})
    ident = _Identity(study_key, deidentify)
    out_dir = Path(directory)
    method = explanation.method if explanation is not None else "none"
    # highdicom warns with the offending value (a patient name, say): never shown
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps_ds, sr = _build(prediction, explanation, dicom_roles, ident, model, alpha,
                             method, skipped)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        maps: dict[str, Path] = {}
        for role, pm in maps_ds.items():
            path = out_dir / f"{role}_map.dcm"
            _save(pm, path)
            maps[role] = path
        sr_path = out_dir / SR_NAME
        _save(sr, sr_path)
    except OSError as error:
        raise OutputError(
            f"could not write the DICOM result objects ({type(error).__name__}); check that "
            "the output folder is writable and the disk has space."
        ) from None
    return DicomResults(sr=sr_path, maps=maps, skipped=skipped)
