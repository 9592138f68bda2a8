"""Typed objects that cross module borders. No I/O here.

Conventions (the contract the rest of medfusion relies on):

* ``Volume.array`` is float32 with shape (I, J, K) (an X-ray has K == 1), or (I, J, K, T)
  for several time points / phases. Axis i of the array is axis i of the affine.
* ``Volume.affine`` maps voxel indices (i, j, k, 1) to RAS+ millimetres (NIfTI / nibabel
  convention). Spacing and orientation are *derived* from it, never stored separately.
* Every spatial preprocessing step keeps the affine exact, so any map on a processed grid
  can be brought back to the source grid by resampling in world space.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Finding:
    """A non-fatal observation about an input (duplicate slices removed, tilt resampled,
    series skipped...). ``code`` is stable; ``message`` is PHI-free."""

    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


@dataclass(frozen=True)
class Step:
    """One preprocessing step applied to a volume: its name and JSON-serialisable params,
    plus the shape and affine of the grid *before* the step (enough to invert it)."""

    name: str
    params: Mapping[str, Any]
    input_shape: tuple[int, ...]
    input_affine: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": dict(self.params),
            "input_shape": list(self.input_shape),
            "input_affine": [list(r) for r in self.input_affine],
        }


@dataclass(frozen=True)
class SourceInstance:
    """One DICOM instance a volume was read from: its SOP class and instance UIDs and, for a
    single-frame slice, its ImagePositionPatient (LPS mm)."""

    sop_class_uid: str
    sop_instance_uid: str
    position: tuple[float, float, float] | None = None


@dataclass(frozen=True, eq=False)
class DicomSource:
    """The few header facts of a DICOM series that a result object written back into the
    patient's study needs (no pixel data): UIDs of the study, series, frame of reference and
    every instance, the slice geometry, and the Patient / General Study attributes.

    ``identity`` holds patient identifiers: it is read only by the DICOM result writer
    (``medfusion.explain.dicom``), never logged, summarised or written to any other output;
    it is left out of ``repr``.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    rows: int
    columns: int
    #: ImageOrientationPatient (row direction, column direction), LPS
    orientation: tuple[float, ...] | None
    #: PixelSpacing in DICOM order (between rows, between columns), mm
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    instances: tuple[SourceInstance, ...]
    #: an enhanced multi-frame or mosaic file: the instances are not one slice each
    multiframe: bool = False
    series_number: int | None = None
    identity: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class Volume:
    """An image in world space. See the module docstring for conventions."""

    array: np.ndarray
    affine: np.ndarray
    modality: str = "unknown"
    meta: Mapping[str, Any] = field(default_factory=dict)
    issues: tuple[Finding, ...] = ()
    history: tuple[Step, ...] = ()
    #: DICOM header facts of the series it was read from (None for NIfTI); see DicomSource
    dicom: DicomSource | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {affine.shape}")
        object.__setattr__(self, "affine", affine)
        if self.array.ndim not in (3, 4):
            raise ValueError(f"array must be 3D or 4D, got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return int(s[0]), int(s[1]), int(s[2])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: the column norms of the affine's 3x3 part."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Closest anatomical axis codes (e.g. ``('R', 'A', 'S')``) of the array axes."""
        import nibabel as nib

        codes = nib.orientations.aff2axcodes(self.affine)
        return tuple(str(c) for c in codes)  # type: ignore[return-value]

    def replace(self, **changes: Any) -> Volume:
        return dataclasses.replace(self, **changes)

    def with_step(self, step_name: str, params: Mapping[str, Any], **changes: Any) -> Volume:
        """A new volume with ``changes`` applied and this step appended to ``history``."""
        step = Step(
            name=step_name,
            params=dict(params),
            input_shape=self.shape,
            input_affine=tuple(tuple(float(x) for x in row) for row in self.affine),
        )
        return dataclasses.replace(self, history=(*self.history, step), **changes)

    def summary(self) -> dict[str, Any]:
        """PHI-free description for ``medfusion inspect`` and logs."""
        return {
            "modality": self.modality,
            "shape": list(self.shape),
            "spacing": [round(s, 4) for s in self.spacing],
            "orientation": "".join(self.orientation),
            "issues": [f.to_dict() for f in self.issues],
        }


@dataclass(frozen=True, eq=False)
class Study:
    """Everything known about one study. ``key`` is pseudonymous (a keyed digest), never PHI.

    ``volumes`` maps an imaging role (``ct``, ``mr``, ``xray`` or a recipe role) to a Volume;
    ``clinical`` maps clinical variable names to values (None = missing); ``notes`` maps a
    text role (``history``...) to the note's text (absent = missing). Notes are left out
    of ``repr`` and must never be logged or written anywhere but to the model.
    """

    key: str
    volumes: Mapping[str, Volume] = field(default_factory=dict)
    clinical: Mapping[str, Any] | None = None
    issues: tuple[Finding, ...] = ()
    notes: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(sorted(self.volumes))


@dataclass(frozen=True, eq=False)
class Explanation:
    """Why a prediction came out as it did.

    ``saliency`` maps a role to a Volume on exactly the *source* volume's grid (same shape
    and affine as what ``load_volume`` returned), values in [0, 1].
    """

    saliency: Mapping[str, Volume] = field(default_factory=dict)
    modality_weights: Mapping[str, float] | None = None
    shapley: Mapping[str, float] | None = None
    clinical_attributions: Mapping[str, float] | None = None
    method: str = "occlusion"


@dataclass(frozen=True, eq=False)
class Prediction:
    """One study's diagnosis with its uncertainty. Probabilities are keyed by label name."""

    study_key: str
    labels: tuple[str, ...]
    probabilities: Mapping[str, float]
    raw_probabilities: Mapping[str, float]
    predicted: str
    modalities_used: tuple[str, ...]
    modality_weights: Mapping[str, float] | None = None
    entropy: float | None = None
    mutual_info: float | None = None
    prob_std: float | None = None
    prediction_set: tuple[str, ...] | None = None
    abstain: bool | None = None
    shapley: Mapping[str, float] | None = None
    explanation: Explanation | None = None
    flags: tuple[str, ...] = ()
    #: encoder feature-statistics shift (<= ~1 for training-like studies; docs/trust.md)
    feature_shift: float | None = None
    #: conformal p-value of feature_shift against the validation studies (small = unusual)
    shift_pvalue: float | None = None


@dataclass(frozen=True)
class StudyFailure:
    """A study that could not be scored: a stable code and a PHI-free message."""

    study_id: str
    stage: str
    code: str
    message: str
