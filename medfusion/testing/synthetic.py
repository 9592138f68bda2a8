"""Deterministic synthetic cohorts with a planted, learnable and locatable signal.

Used by ``data_samples/`` (via ``pipelines/make_samples.py``), the demo model's training,
explanation tests (saliency must land on the planted lesion) and benchmarks.

One *subject* is a CT volume (Hounsfield units: air -1000, soft tissue about 40, a spine),
an MR volume (arbitrary scanner units, smooth bias field) and a radiograph (a frontal
projection, dense is bright). An **abnormal** subject (label 1) carries a lesion: a bright
blob (+200..350 HU in CT, +40..60 % in MR, a bright spot in the radiograph) at one world
position shared by CT and MR. The clinical record (age, sex, smoker, CRP in mg/L) carries a
weaker part of the signal, so a fusion model gains from both.

Geometry (RAS+ mm, nibabel convention, as ``Volume.affine``):

* CT and MR are axial, as a DICOM series with ImageOrientationPatient ``[1,0,0, 0,1,0]``
  loads: array axis i runs to the patient's left, j to posterior, k to superior, so the
  affine is ``diag(-di, -dj, +dk)`` plus an origin that centres the field of view on world 0.
* The radiograph (K = 1, 0.6 mm) is a frontal projection (columns run to the patient's
  left, rows towards the feet) in the frame medfusion's DICOM reader gives a projection
  without ImageOrientationPatient (ITK's: identity in LPS, origin at the first pixel).
  Its ``lesion_world`` is in that frame, not the CT/MR one (a projection has no patient
  position).

Everything is a pure function of ``seed`` (numpy PCG64), so files written twice are
byte-identical (DICOM UIDs are derived from the seed, NIfTI gzip has mtime 0).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import UnsupportedInputError
from medfusion.testing.dicom_factory import write_radiograph, write_series
from medfusion.types import Volume

#: Clinical schema of the synthetic records, in the form ``ClinicalSchema.from_dict`` reads.
CLINICAL_SCHEMA: dict[str, dict[str, Any]] = {
    "age": {"type": "numeric", "unit": "years", "range": [0, 120]},
    "sex": {"type": "categorical", "levels": ["F", "M"]},
    "smoker": {"type": "categorical", "levels": ["no", "yes"]},
    "crp": {"type": "numeric", "unit": "mg/L", "range": [0, 500]},
}
CLINICAL_COLUMNS: tuple[str, ...] = tuple(CLINICAL_SCHEMA)

ROLES: tuple[str, ...] = ("ct", "mr", "xray")
_ROLE_MODALITY = {"ct": "CT", "mr": "MR", "xray": "DX"}
DEFAULT_FORMATS: Mapping[str, str] = {"ct": "dicom", "mr": "nifti", "xray": "dicom"}

XRAY_SPACING = (0.6, 0.6)
MR_SPACING = (1.2, 1.2, 3.0)
@dataclass(frozen=True, eq=False)
class SyntheticSubject:
    """One synthetic subject: images per role, where the lesion is, and a clinical record.

    ``arrays[role]`` is float32 (I, J, K) holding integer-valued intensities: CT in HU and
    MR in scanner units (exactly what the loaders return after writing), the radiograph as
    stored 12-bit pixel values (K = 1; the DICOM reader maps it to [0, 1] by the full
    stored range, i.e. ``value / 4095``, when no VOI window is set, as here).
    ``affines[role]`` is the 4x4 voxel-to-RAS+ mm matrix the loaders return.
    ``lesion_world[role]`` is the lesion centre in world mm (None for a normal subject) and
    ``lesion_voxel[role]`` the same point in (fractional) voxel indices.
    """

    seed: int
    label: int
    arrays: Mapping[str, np.ndarray]
    affines: Mapping[str, np.ndarray]
    lesion_world: Mapping[str, tuple[float, float, float] | None]
    lesion_voxel: Mapping[str, tuple[float, float, float] | None]
    lesion_radius_mm: float | None
    clinical: Mapping[str, Any] = field(default_factory=dict)

    def volume(self, role: str) -> Volume:
        """The role's image as a :class:`Volume` (modality CT, MR or DX)."""
        return Volume(
            array=self.arrays[role],
            affine=self.affines[role],
            modality=_ROLE_MODALITY[role],
        )


@dataclass(frozen=True)
class CohortPaths:
    """Where :func:`write_cohort` put things. Paths in ``images`` are absolute; the manifest
    holds them relative to itself."""

    root: Path
    studies_dir: Path
    manifest: Path
    clinical: Path
    labels: Path
    schema: Path
    truth: Path
    study_ids: tuple[str, ...]
    images: Mapping[str, Mapping[str, Path]]
    subjects_labels: Mapping[str, str]
    subject_seeds: Mapping[str, int] = field(default_factory=dict)

    def subject(self, study_id: str) -> SyntheticSubject:
        """Recompute the study's subject (arrays, affines, lesion) without reading files.
        Only valid for cohorts written with the default ``subject_kwargs``."""
        label = 1 if self.subjects_labels[study_id] == self.label_names[1] else 0
        return make_subject(self.subject_seeds[study_id], label)

    label_names: tuple[str, str] = ("normal", "abnormal")

    def study_dir(self, study_id: str) -> Path:
        return self.studies_dir / study_id


# --------------------------------------------------------------------------------------
# geometry helpers
def axial_affine(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine of an axial grid (DICOM IOP [1,0,0,0,1,0]) centred on world 0."""
    di, dj, dk = (float(s) for s in spacing)
    affine = np.diag([-di, -dj, dk, 1.0])
    centre = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _to_voxel(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(affine) @ np.append(world, 1.0))[:3]


def _to_world(affine: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    return (affine @ np.append(voxel, 1.0))[:3]


def _world_grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (3, I, J, K) of every voxel centre."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return world.reshape(3, *shape)


def _ellipse_body(world: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    return (world[0] / half_x) ** 2 + (world[1] / half_y) ** 2 <= 1.0


def _blob(world: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """A smooth sphere profile in [0, 1]: flat core, soft 1.5 mm edge."""
    dist = np.sqrt(((world - centre.reshape(3, *([1] * (world.ndim - 1)))) ** 2).sum(axis=0))
    return np.clip((radius + 0.75 - dist) / 1.5, 0.0, 1.0)


# --------------------------------------------------------------------------------------
# one subject
def make_subject(
    seed: int,
    label: int,
    *,
    ct_shape: tuple[int, int, int] = (40, 40, 24),
    ct_spacing: tuple[float, float, float] = (0.9, 0.9, 2.5),
    mr_shape: tuple[int, int, int] = (32, 32, 20),
    xray_shape: tuple[int, int] = (64, 64),
) -> SyntheticSubject:
    """A deterministic synthetic subject; ``label`` 1 plants a lesion, 0 does not.

    The same ``(seed, label)`` always gives the same arrays. The lesion centre is drawn
    inside the body, away from the spine and the field-of-view border, at one world point
    for CT and MR; the radiograph shows its frontal projection.
    """
    if label not in (0, 1):
        raise UnsupportedInputError(
            f"label must be 0 (normal) or 1 (abnormal), got {label!r}; pass 0 or 1."
        )
    rng = np.random.default_rng([int(seed), 0x5EED])
    ct_affine = axial_affine(ct_shape, ct_spacing)
    fov = np.abs(np.diag(ct_affine)[:3]) * (np.asarray(ct_shape) - 1)  # mm extent per axis
    half_x, half_y = 0.42 * fov[0], 0.36 * fov[1]

    # Lesion: inside the body ellipse (radius fraction <= 0.55) and the middle of the z range.
    radius = float(rng.uniform(3.5, 5.5))
    ang = rng.uniform(0, 2 * np.pi)
    frac = rng.uniform(0.1, 0.55)
    centre = np.array(
        [
            frac * half_x * np.cos(ang),
            # keep it anterior of the spine (posterior is +y in LPS, -y in RAS)
            frac * half_y * abs(np.sin(ang)) * 0.8,
            rng.uniform(-0.25, 0.25) * fov[2],
        ]
    )
    has_lesion = label == 1

    # ---- CT (HU) ----
    ct_world = _world_grid(ct_shape, ct_affine)
    body = _ellipse_body(ct_world, half_x, half_y)
    ct = np.full(ct_shape, -1000.0)
    ct[body] = 40.0
    spine_c = np.array([0.0, -0.65 * half_y, 0.0])  # posterior midline
    spine = ((ct_world[0] - spine_c[0]) ** 2 + (ct_world[1] - spine_c[1]) ** 2) <= (
        0.18 * half_y
    ) ** 2
    ct[spine] = 700.0
    if has_lesion:
        amp = float(rng.uniform(200, 350))
        ct += amp * _blob(ct_world, centre, radius) * body
    ct += rng.normal(0.0, 12.0, ct_shape)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.float32)

    # ---- MR (scanner units, positive) ----
    mr_affine = axial_affine(mr_shape, MR_SPACING)
    mr_world = _world_grid(mr_shape, mr_affine)
    mr_body = _ellipse_body(mr_world, half_x, half_y)
    bias = 1.0 + 0.15 * (mr_world[0] / (half_x + 1e-6)) + 0.1 * (mr_world[2] / (fov[2] + 1e-6))
    mr = np.where(mr_body, 400.0 * bias, 10.0)
    mr_spine = ((mr_world[0] - spine_c[0]) ** 2 + (mr_world[1] - spine_c[1]) ** 2) <= (
        0.18 * half_y
    ) ** 2
    mr[mr_spine] = 150.0
    if has_lesion:
        mr += float(rng.uniform(0.4, 0.6)) * 400.0 * _blob(mr_world, centre, radius) * mr_body
    mr += np.abs(rng.normal(0.0, 15.0, mr_shape))
    mr = np.rint(mr).astype(np.float32)

    # ---- radiograph: frontal projection (i to the left = world x, j down = -world z) ----
    xi, xj = xray_shape
    sx, sy = XRAY_SPACING
    centred = axial_affine((xi, xj, 1), (sx, sy, 1.0))  # to place the projection
    # The radiograph's own frame, as medfusion's DICOM reader returns a projection without
    # ImageOrientationPatient (ITK's identity in LPS): origin at the first pixel.
    x_affine = np.diag([-sx, -sy, 1.0, 1.0])
    ii, jj = np.meshgrid(np.arange(xi, dtype=np.float64), np.arange(xj, dtype=np.float64),
                         indexing="ij")
    wx = centred[0, 3] - ii * sx  # subject world x of column i (RAS: left is -)
    wz = (jj - (xj - 1) / 2.0) * -sy  # image rows run from head (top) to feet
    thickness = np.sqrt(np.clip(1.0 - (wx / half_x) ** 2, 0.0, None))  # chord through body
    xr = 300.0 + 1400.0 * thickness
    xr += 250.0 * (np.cos(wz / 3.0) > 0.7) * thickness  # ribs
    x_lesion_voxel = None
    if has_lesion:
        li = (centred[0, 3] - centre[0]) / sx
        lj = (xj - 1) / 2.0 - centre[2] / sy
        x_lesion_voxel = np.array([li, lj, 0.0])
        dist2 = ((ii - li) * sx) ** 2 + ((jj - lj) * sy) ** 2
        xr += float(rng.uniform(500, 700)) * np.exp(-dist2 / (2 * (radius * 0.8) ** 2))
    xr += rng.normal(0.0, 20.0, (xi, xj))
    xr = np.clip(np.rint(xr), 0, 4095).astype(np.float32)[:, :, None]

    # ---- clinical record: part of the signal ----
    age = int(np.clip(np.rint(rng.normal(55.0 + 7.0 * label, 10.0)), 18, 95))
    sex = "F" if rng.random() < 0.5 else "M"
    smoker = "yes" if rng.random() < (0.25 + 0.3 * label) else "no"
    crp = float(np.round(rng.lognormal(1.0 + 0.9 * label, 0.6), 1))
    clinical = {"age": age, "sex": sex, "smoker": smoker, "crp": crp}

    affines = {"ct": ct_affine, "mr": mr_affine, "xray": x_affine}
    if has_lesion:
        lw = {
            "ct": tuple(float(v) for v in centre),
            "mr": tuple(float(v) for v in centre),
            "xray": tuple(float(v) for v in _to_world(x_affine, x_lesion_voxel)),
        }
        lv = {
            "ct": tuple(float(v) for v in _to_voxel(ct_affine, centre)),
            "mr": tuple(float(v) for v in _to_voxel(mr_affine, centre)),
            "xray": tuple(float(v) for v in x_lesion_voxel),
        }
    else:
        lw = {r: None for r in ROLES}
        lv = {r: None for r in ROLES}
    return SyntheticSubject(
        seed=int(seed),
        label=int(label),
        arrays={"ct": ct, "mr": mr, "xray": xr},
        affines=affines,
        lesion_world=lw,
        lesion_voxel=lv,
        lesion_radius_mm=radius if has_lesion else None,
        clinical=clinical,
    )


# --------------------------------------------------------------------------------------
# writers
def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, modality: str) -> Path:
    """Write an int16 NIfTI with sform = qform = ``affine`` and the modality in ``descrip``."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array).astype(np.int16), affine)
    img.header["descrip"] = f"{modality} synthetic medfusion".encode()
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_dicom_series(
    folder: Path, array: np.ndarray, affine: np.ndarray, modality: str, *, seed: int
) -> list[Path]:
    """Write a DICOM series (one file per k, shuffled names) with the DICOM factory; the
    headers carry the factory's sentinel identifiers."""
    return write_series(
        folder,
        array,
        affine=affine,
        modality=modality,
        rescale=(1.0, -1024.0) if modality == "CT" else (1.0, 0.0),
        series_description=f"SYNTHETIC {modality}",
        series_number=1 if modality == "CT" else 2,
        seed=seed,
        file_names="instance",
    )


def write_dicom_radiograph(
    path: Path, array_ij: np.ndarray, spacing: tuple[float, float], *, seed: int
) -> Path:
    """Write a DX radiograph (MONOCHROME2, 12-bit, no VOI window so values load as stored)."""
    row_col = (float(spacing[1]), float(spacing[0]))  # DICOM order: row spacing, column spacing
    return write_radiograph(
        path,
        np.asarray(array_ij).astype(np.uint16),
        modality="DX",
        pixel_spacing=row_col,
        imager_pixel_spacing=row_col,
        seed=seed,
    )


def _assign(n: int, rng: np.random.Generator) -> tuple[list[int], list[int], list[str]]:
    """Balanced shuffled labels, patient index per study (about 1 in 6 patients has two
    studies, so splits must group by patient), and a split per patient."""
    labels = [i % 2 for i in range(n)]
    labels = [labels[i] for i in rng.permutation(n)]
    patients: list[int] = []
    p = 0
    i = 0
    while i < n:
        patients.append(p)
        if i + 1 < n and rng.random() < 1 / 6:
            patients.append(p)
            i += 1
        p += 1
        i += 1
    n_pat = p
    order = rng.permutation(n_pat)
    n_test = max(1, round(0.15 * n_pat)) if n_pat >= 3 else 0
    n_val = max(1, round(0.15 * n_pat)) if n_pat >= 3 else 0
    split_of = {}
    for rank, pat in enumerate(order):
        split_of[int(pat)] = (
            "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        )
    return labels, patients, [split_of[pat] for pat in patients]


def write_cohort(
    out_dir: str | Path,
    n_studies: int,
    *,
    seed: int = 0,
    roles: Iterable[str] = ("ct", "mr", "xray"),
    formats: Mapping[str, str] | None = None,
    missing_rate: float = 0.0,
    label_names: tuple[str, str] = ("normal", "abnormal"),
    subject_kwargs: Mapping[str, Any] | None = None,
) -> CohortPaths:
    """Write a synthetic cohort of ``n_studies`` studies under ``out_dir``.

    Layout::

        out_dir/studies/study-000/ct/IM0000.dcm ...   CT DICOM series (format "dicom")
        out_dir/studies/study-000/mr.nii.gz           MR NIfTI (format "nifti")
        out_dir/studies/study-000/xray.dcm            DX radiograph (format "dicom")
        out_dir/manifest.csv    study_id,label,patient_id,split,<roles...>,<clinical...>
        out_dir/clinical.csv    study_id,<clinical...>      (empty cell = missing)
        out_dir/labels.csv      study_id,label,patient_id,site,sex
        out_dir/clinical_schema.json   the schema (CLINICAL_SCHEMA)
        out_dir/truth.json      per study: label and lesion centre per role (world mm)

    ``formats`` maps a role to "dicom" or "nifti" (a DICOM role other than xray is a
    series folder). ``missing_rate`` drops each imaging role (keeping at least one) and
    each clinical value independently with that probability. Study ids are
    ``study-NNN``; the DICOM headers carry sentinel identifiers (PatientName etc.).
    """
    out = Path(out_dir)
    roles = tuple(roles)
    fmt = {**DEFAULT_FORMATS, **(formats or {})}
    for role in roles:
        if role not in ROLES:
            raise UnsupportedInputError(f"unknown role {role!r}; use one of {', '.join(ROLES)}.")
        if fmt[role] not in ("dicom", "nifti"):
            raise UnsupportedInputError(
                f"unknown format {fmt[role]!r} for {role}; use 'dicom' or 'nifti'."
            )
    if not 0.0 <= missing_rate < 1.0:
        raise UnsupportedInputError("missing_rate must be in [0, 1).")
    if n_studies < 1:
        raise UnsupportedInputError("n_studies must be at least 1.")
    rng = np.random.default_rng([int(seed), 0xC0407])
    labels, patients, splits = _assign(n_studies, rng)
    studies_dir = out / "studies"
    studies_dir.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(n_studies - 1)))

    manifest_rows: list[list[str]] = []
    clinical_rows: list[list[str]] = []
    label_rows: list[list[str]] = []
    truth: dict[str, Any] = {}
    images: dict[str, dict[str, Path]] = {}
    label_of: dict[str, str] = {}
    seeds: dict[str, int] = {}
    study_ids: list[str] = []
    for n in range(n_studies):
        sid = f"study-{n:0{width}d}"
        study_ids.append(sid)
        subj_seed = int(seed) * 100_003 + n
        seeds[sid] = subj_seed
        subject = make_subject(subj_seed, labels[n], **dict(subject_kwargs or {}))
        # sex belongs to the patient, not the study: patients with two studies agree.
        patient_sex = "F" if np.random.default_rng([int(seed), patients[n]]).random() < 0.5 else "M"
        subject = dataclasses.replace(subject, clinical={**subject.clinical, "sex": patient_sex})
        present = [r for r in roles if not (missing_rate and rng.random() < missing_rate)]
        if not present:
            present = [roles[int(rng.integers(len(roles)))]]
        sdir = studies_dir / sid
        rel: dict[str, str] = {}
        images[sid] = {}
        for role in roles:
            if role not in present:
                rel[role] = ""
                continue
            arr, aff = subject.arrays[role], subject.affines[role]
            if fmt[role] == "nifti":
                path = write_nifti(sdir / f"{role}.nii.gz", arr, aff, _ROLE_MODALITY[role])
            elif role == "xray":
                path = write_dicom_radiograph(
                    sdir / "xray.dcm", arr[:, :, 0], XRAY_SPACING, seed=subj_seed
                )
            else:
                write_dicom_series(sdir / role, arr, aff, _ROLE_MODALITY[role], seed=subj_seed)
                path = sdir / role
            images[sid][role] = path
            rel[role] = path.relative_to(out).as_posix()
        clin = {
            k: (None if missing_rate and rng.random() < missing_rate else v)
            for k, v in subject.clinical.items()
        }
        clin_cells = ["" if clin[c] is None else str(clin[c]) for c in CLINICAL_COLUMNS]
        label = label_names[labels[n]]
        label_of[sid] = label
        patient_id = f"patient-{patients[n]:0{width}d}"
        site = "site-a" if patients[n] % 2 == 0 else "site-b"
        manifest_rows.append(
            [sid, label, patient_id, splits[n], *(rel[r] for r in roles), *clin_cells]
        )
        clinical_rows.append([sid, *clin_cells])
        label_rows.append([sid, label, patient_id, site, subject.clinical["sex"]])
        truth[sid] = {
            "label": label,
            "subject_seed": subj_seed,
            "lesion_radius_mm": subject.lesion_radius_mm,
            "lesion_world": {r: subject.lesion_world[r] for r in present},
            "lesion_voxel": {r: subject.lesion_voxel[r] for r in present},
        }

    def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        return path

    manifest = _csv(
        out / "manifest.csv",
        ["study_id", "label", "patient_id", "split", *roles, *CLINICAL_COLUMNS],
        manifest_rows,
    )
    clinical_csv = _csv(out / "clinical.csv", ["study_id", *CLINICAL_COLUMNS], clinical_rows)
    labels_csv = _csv(
        out / "labels.csv", ["study_id", "label", "patient_id", "site", "sex"], label_rows
    )
    schema = out / "clinical_schema.json"
    schema.write_text(json.dumps(CLINICAL_SCHEMA, indent=2) + "\n", encoding="utf-8")
    truth_path = out / "truth.json"
    truth_path.write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return CohortPaths(
        root=out,
        studies_dir=studies_dir,
        manifest=manifest,
        clinical=clinical_csv,
        labels=labels_csv,
        schema=schema,
        truth=truth_path,
        study_ids=tuple(study_ids),
        images=images,
        subjects_labels=label_of,
        subject_seeds=seeds,
        label_names=tuple(label_names),  # type: ignore[arg-type]
    )
