"""A study folder to a :class:`~medfusion.types.Study`: every image found, one per role.

What :func:`load_study` does, in order:

1. **Discover** (:func:`discover_study_files`): every file under the folder, any nesting.
   Symbolic links are followed only while they stay inside the folder; a link loop is
   skipped and reported (``SYMLINK_LOOP`` finding; a study folder that is itself a loop
   raises ``SYMLINK_LOOP``); hidden files,
   OS litter and obvious non-images (``.csv``, ``.json``, ``.txt``, ``.pdf``...) are
   skipped and counted. ``.nii`` / ``.nii.gz`` files are NIfTI; the rest are DICOM
   candidates, sorted into series by the DICOM reader (header-only pass), which lists
   non-DICOM files it skipped.
2. **Assign roles**. A DICOM series takes its role from its Modality: CT -> ``ct``, MR ->
   ``mr``, CR/DX/DR/MG/RG/PX/IO -> ``xray``; other modalities (SR, PR, SEG, PT, OT...) are
   not used. A NIfTI file takes the role its file name states (``ct.nii.gz``, ``mr.nii``,
   ``xray.nii.gz``, or any role named in ``roles``, e.g. ``t1.nii.gz``), else the role of
   the modality its header states, else it is not used.
   With ``roles={"t1": "MR", "t2": "MR"}`` the roles replace the defaults; when several
   roles share a modality a DICOM series goes to the role whose name is a word of its
   SeriesDescription.
3. **Choose one image per role** when several exist, by this stated rule:
   a NIfTI named for the role (the user's explicit choice) first; then ORIGINAL/PRIMARY
   before DERIVED/SECONDARY and localizers; then axial before other orientations; then the
   most slices (frames); ties by series key. Every other candidate is listed as a
   ``SERIES_NOT_USED`` finding (pseudonymous key, modality, slice count, reason).
4. **Load** only the chosen images. A chosen image that fails raises its typed error (a
   batch turns it into one failure row); a study without any usable image raises
   ``NO_IMAGES``. Volume findings are copied into the study's ``issues`` with their role.

``Study.key`` is ``st-`` + a keyed digest of the StudyInstanceUID (of the folder's resolved
path for NIfTI-only studies), never patient data.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import MedfusionError, NoImagesError, UnsupportedInputError
from medfusion.io.dicom import load_series, scan_dicom
from medfusion.io.nifti import is_nifti_name, load_nifti
from medfusion.io.notes import NOTE_EMPTY, note_file, read_note
from medfusion.io.walk import OK, link_loop_error, walk_files
from medfusion.keys import pseudonym
from medfusion.types import Finding, Study, Volume

__all__ = [
    "DEFAULT_ROLES",
    "Candidate",
    "choose",
    "discover_study_files",
    "load_study",
    "plan_study",
]

#: Role -> the DICOM modalities it takes (the default when ``roles`` is not given).
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "ct": ("CT",),
    "mr": ("MR",),
    "xray": ("CR", "DX", "DR", "MG", "RG", "PX", "IO"),
}
_NIFTI_MODALITY_ROLE = {"CT": "ct", "MR": "mr", "DX": "xray", "CR": "xray"}
_ROLE_MODALITY = {"ct": "CT", "mr": "MR", "xray": "DX"}
_NOISE_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
_NOT_IMAGE_SUFFIXES = {
    ".csv", ".tsv", ".json", ".txt", ".md", ".pdf", ".xml", ".html", ".htm", ".yaml",
    ".yml", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".zip", ".tar", ".tgz", ".7z",
    ".py", ".sh", ".log", ".doc", ".docx", ".xls", ".xlsx", ".bval", ".bvec",
}


# --------------------------------------------------------------------------------------
# discovery

def discover_study_files(
    folder: str | Path,
) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """All files under ``folder``: ``(dicom_candidates, nifti_files, skipped)``.

    ``skipped`` pairs a path with a reason code (``HIDDEN``, ``NOT_IMAGE``,
    ``LINK_OUTSIDE``, ``NOT_REGULAR`` (a dangling link, a socket...), ``SYMLINK_LOOP`` (a
    link that resolves back to itself), ``DUPLICATE_LINK``: a link to a DICOM file already
    found). A folder that is itself a link loop raises ``SYMLINK_LOOP``
    (:class:`~medfusion.errors.UnsupportedInputError`). Paths are returned sorted, as found under
    ``folder`` (links not resolved); never print them, they may hold names.
    """
    root = Path(folder)
    try:
        root_is_dir = stat.S_ISDIR(os.stat(root).st_mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise link_loop_error("the study folder") from exc
        root_is_dir = False
    if not root_is_dir:
        raise NoImagesError("the study folder does not exist or is not a folder; check the path.")
    dicom: list[Path] = []
    nifti: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path, status in walk_files(root):
        if status != OK:
            skipped.append((path, status))
            continue
        name = path.name.lower()
        if name.startswith(".") or name in _NOISE_NAMES:
            skipped.append((path, "HIDDEN"))
        elif is_nifti_name(name):
            nifti.append(path)
        elif Path(name).suffix in _NOT_IMAGE_SUFFIXES:
            skipped.append((path, "NOT_IMAGE"))
        else:
            dicom.append(path)
    # A link to a DICOM file that is also present under the folder is the same image twice.
    unique: list[Path] = []
    seen_files: set[str] = set()
    for path in sorted(dicom, key=lambda q: (q.is_symlink(), str(q))):
        real_file = os.path.realpath(path)
        if real_file in seen_files:
            skipped.append((path, "DUPLICATE_LINK"))
            continue
        seen_files.add(real_file)
        unique.append(path)
    return sorted(unique), sorted(nifti), sorted(skipped)


# --------------------------------------------------------------------------------------
# candidates and the choice rule
@dataclass(frozen=True, eq=False)
class Candidate:
    """One image that could fill a role: a DICOM series (``info``) or a NIfTI file."""

    key: str
    source: str  # "dicom" | "nifti"
    modality: str
    n_slices: int
    original: bool
    axial: bool
    named: bool  # a NIfTI whose file name states the role
    info: Any = None
    path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """PHI-free description (series keys and counts, never names or UIDs)."""
        out: dict[str, Any] = {
            "key": self.key,
            "source": self.source,
            "modality": self.modality,
            "n_slices": self.n_slices,
        }
        if self.info is not None and hasattr(self.info, "summary"):
            info = self.info.summary()  # the DICOM reader's PHI-free summary
            for field_name in ("description", "orientation", "image_type", "n_frames"):
                if info.get(field_name) not in (None, "", []):
                    out[field_name] = info[field_name]
        return out


def _rank(c: Candidate) -> tuple[int, int, int, int, str]:
    """Sort key of the choice rule (smaller wins); see the module docstring."""
    return (0 if c.named else 1, 0 if c.original else 1, 0 if c.axial else 1, -c.n_slices, c.key)


def choose(candidates: Sequence[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The candidate the rule picks, and the others in rule order."""
    ordered = sorted(candidates, key=_rank)
    return ordered[0], ordered[1:]


def _is_original(image_type: Any) -> bool:
    if not image_type:
        return True  # unknown: do not penalise a series that omits ImageType
    values = [str(v).upper() for v in (image_type if not isinstance(image_type, str)
                                       else image_type.split("\\"))]
    if any(v in ("LOCALIZER", "SCOUT") for v in values):
        return False
    return len(values) < 2 or (values[0] == "ORIGINAL" and values[1] == "PRIMARY")


def _is_axial(orientation: Any) -> bool:
    """Axial when the slice normal is within ~37 degrees of S-I (or stated as axial)."""
    if orientation is None:
        return False
    if isinstance(orientation, str):
        return orientation.upper().startswith("AX")
    try:
        values = np.asarray(orientation, dtype=float).ravel()
    except (TypeError, ValueError):
        return False
    if values.size == 6:
        normal = np.cross(values[:3], values[3:])
    elif values.size == 3:  # a slice normal
        normal = values
    else:
        return False
    norm = float(np.linalg.norm(normal))
    return norm > 0 and abs(float(normal[2])) / norm > 0.8


def _role_words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w}


def _normalise_roles(roles: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    if roles is None:
        return dict(DEFAULT_ROLES)
    if not isinstance(roles, Mapping) or not roles:
        raise UnsupportedInputError(
            "`roles` must map role names to a modality or list of modalities, e.g. "
            "{'t1': 'MR', 'ct': 'CT'}."
        )
    out: dict[str, tuple[str, ...]] = {}
    for role, mods in roles.items():
        if not isinstance(role, str) or not role.isidentifier():
            raise UnsupportedInputError(f"role name {role!r} must be a plain identifier.")
        if isinstance(mods, str):
            mods = (mods,)
        if not isinstance(mods, Sequence) or not all(isinstance(m, str) for m in mods):
            raise UnsupportedInputError(
                f"role {role!r} must name its modality (e.g. 'MR') or a list of modalities."
            )
        out[role] = tuple(m.upper() for m in mods)
    return out


def _nifti_role(path: Path, roles: Mapping[str, tuple[str, ...]]) -> str | None:
    """The role a NIfTI file name states: its stem equals a role name (any case)."""
    name = path.name.lower()
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    for role in roles:
        if stem == role.lower():
            return role
    return None


def _dicom_role(info: Any, roles: Mapping[str, tuple[str, ...]]) -> str | None:
    modality = str(getattr(info, "modality", "") or "").upper()
    matching = [role for role, mods in roles.items() if modality in mods]
    if len(matching) <= 1:
        return matching[0] if matching else None
    words = _role_words(str(getattr(info, "description", "") or ""))
    named = [role for role in matching if role.lower() in words]
    return named[0] if len(named) == 1 else None


@dataclass
class StudyPlan:
    """What :func:`plan_study` found, before any pixel is decoded."""

    folder: Path
    roles: dict[str, tuple[str, ...]]
    candidates: dict[str, list[Candidate]]
    unassigned: list[Candidate]
    study_keys: list[str]
    skipped: list[tuple[Path, str]]
    dicom_skipped: list[tuple[Path, str]]


def _scan(dicom_files: list[Path]) -> tuple[list[Any], list[tuple[Path, str]]]:
    if not dicom_files:
        return [], []
    scan = scan_dicom(dicom_files)
    return list(scan.series), list(getattr(scan, "skipped", ()) or ())


def plan_study(folder: str | Path, *, roles: Mapping[str, Any] | None = None) -> StudyPlan:
    """Discover and assign roles without decoding pixels (header-only pass)."""
    root = Path(folder)
    role_map = _normalise_roles(roles)
    dicom_files, nifti_files, skipped = discover_study_files(root)
    series, dicom_skipped = _scan(dicom_files)
    candidates: dict[str, list[Candidate]] = {role: [] for role in role_map}
    unassigned: list[Candidate] = []
    study_keys: list[str] = []
    for info in series:
        n_inst = int(getattr(info, "n_instances", 0) or 0)
        n_frames = int(getattr(info, "n_frames", 0) or 0)
        cand = Candidate(
            key=str(info.key),
            source="dicom",
            modality=str(getattr(info, "modality", "") or "unknown"),
            n_slices=max(n_inst, n_frames),
            original=_is_original(getattr(info, "image_type", None)),
            axial=_is_axial(getattr(info, "orientation", None)),
            named=False,
            info=info,
        )
        role = _dicom_role(info, role_map)
        if role is None:
            unassigned.append(cand)
        else:
            candidates[role].append(cand)
            study_key = getattr(info, "study_key", None)
            if study_key and study_key not in study_keys:
                study_keys.append(str(study_key))
    real_root = os.path.realpath(root)
    for path in nifti_files:
        rel = os.path.relpath(os.path.realpath(path), real_root)
        named_role = _nifti_role(path, role_map)
        cand = Candidate(
            key=pseudonym(rel, prefix="nii-"),
            source="nifti",
            modality="unknown",
            n_slices=0,
            original=True,
            axial=True,
            named=named_role is not None,
            path=path,
        )
        if named_role is not None:
            candidates[named_role].append(cand)
        else:
            # Role from the header's modality word: needs the header, read lazily below.
            unassigned.append(cand)
    return StudyPlan(root, role_map, candidates, unassigned, sorted(study_keys), skipped,
                     dicom_skipped)


def _load(cand: Candidate, strict: bool) -> Volume:
    if cand.source == "nifti":
        assert cand.path is not None
        return load_nifti(cand.path, strict=strict)
    return load_series(cand.info, strict=strict)


def _not_used(cand: Candidate, reason: str, role: str | None = None) -> Finding:
    details = {**cand.summary(), "reason": reason}
    if role is not None:
        details["role"] = role
    return Finding(
        "SERIES_NOT_USED",
        f"a {cand.modality} {cand.source} image was not used ({reason}).",
        details,
    )


def _study_key(plan: StudyPlan) -> str:
    if len(plan.study_keys) == 1:
        return plan.study_keys[0]  # already pseudonym(StudyInstanceUID, prefix="st-")
    if plan.study_keys:
        return pseudonym("|".join(plan.study_keys), prefix="st-")
    return pseudonym(os.path.realpath(plan.folder), prefix="st-")


def load_study(
    folder: str | Path,
    clinical: Mapping[str, Any] | None = None,
    *,
    strict: bool = False,
    roles: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Study:
    """Load every role of the study in ``folder`` (see the module docstring for the rules).

    ``clinical`` is stored as the study's clinical record (a copy; validate it with
    :func:`medfusion.io.clinical.validate_record` when you have a schema). ``roles`` maps
    role names to DICOM modalities, replacing the default ``ct``/``mr``/``xray``.
    ``notes`` names text roles: ``<role>.txt`` directly in the folder is that role's note
    (:mod:`medfusion.io.notes`: UTF-8, at most ``MAX_NOTE_BYTES``; an empty one is missing,
    with a ``NOTE_EMPTY`` finding); a study with a note and no image is valid.
    Raises :class:`~medfusion.errors.MedfusionError` subclasses only.
    """
    plan = plan_study(folder, roles=roles)
    issues: list[Finding] = []
    volumes: dict[str, Volume] = {}
    loaded: dict[str, Volume] = {}

    # NIfTI files not named for a role: their header may state a modality.
    still_unassigned: list[Candidate] = []
    for cand in plan.unassigned:
        if cand.source != "nifti":
            still_unassigned.append(cand)
            continue
        assert cand.path is not None
        try:
            vol = load_nifti(cand.path, strict=strict)
        except MedfusionError as error:
            # Not named for a role: an unreadable extra file must not sink the study.
            issues.append(_not_used(cand, f"unreadable ({error.code})"))
            continue
        wanted = _NIFTI_MODALITY_ROLE.get(vol.modality)
        role = next(
            (r for r, mods in plan.roles.items() if vol.modality in mods),
            wanted if wanted in plan.roles else None,
        )
        if role is None:
            still_unassigned.append(cand)
            continue
        loaded[cand.key] = vol
        plan.candidates[role].append(
            Candidate(cand.key, "nifti", vol.modality, 0, True, True, False, path=cand.path)
        )
    for cand in still_unassigned:
        reason = "no role for its modality" if cand.source == "dicom" else "no role in its name"
        issues.append(_not_used(cand, reason))

    for role in plan.roles:
        cands = plan.candidates.get(role) or []
        if not cands:
            continue
        chosen, rest = choose(cands)
        for other in rest:
            issues.append(_not_used(other, "another image was chosen for the role", role))
        vol = loaded.get(chosen.key) or _load(chosen, strict)
        if chosen.source == "nifti" and vol.modality == "unknown" and role in _ROLE_MODALITY:
            vol = vol.replace(modality=_ROLE_MODALITY[role])  # the file name states it
        # Which image filled the role, by pseudonymous key (for inspect and logs).
        vol = vol.replace(meta={**dict(vol.meta), "source": chosen.source,
                                "series_key": chosen.key})
        volumes[role] = vol
        for finding in vol.issues:
            issues.append(Finding(finding.code, finding.message,
                                  {**dict(finding.details), "role": role}))
    texts: dict[str, str] = {}
    note_paths: set[str] = set()
    for role in notes:
        path = note_file(plan.folder, role)
        if path is None:
            continue
        note_paths.add(os.path.realpath(path))
        text = read_note(path, role)
        if text is None:
            issues.append(Finding(NOTE_EMPTY, f"the `{role}` note is empty; the text modality "
                                  "is missing for this study.", {"role": role}))
        else:
            texts[role] = text
    if not volumes and not note_paths:  # an empty note still says the study was given
        raise NoImagesError(
            "no usable image in this study folder (no CT, MR or radiograph DICOM series and "
            "no NIfTI named for a role such as ct.nii.gz); check the folder or pass roles=."
        )
    if len(plan.study_keys) > 1:
        issues.append(Finding(
            "MULTIPLE_STUDIES",
            "images from more than one DICOM study were combined; check that they belong to "
            "the same patient and visit.",
            {"n_studies": len(plan.study_keys)},
        ))
    n_loops = sum(1 for _, reason in plan.skipped if reason == "SYMLINK_LOOP")
    if n_loops:
        # Reported on its own: a loop is a broken link to fix, not a stray non-image file.
        issues.append(Finding(
            "SYMLINK_LOOP",
            f"{n_loops} symbolic link(s) in the study folder point back to themselves (a link "
            "loop) and were skipped; remove or fix them.",
            {"count": n_loops},
        ))
    skipped = [(p, r) for p, r in plan.skipped if os.path.realpath(p) not in note_paths]
    n_skipped = len(skipped) + len(plan.dicom_skipped) - n_loops
    if n_skipped:
        reasons: dict[str, int] = {}
        for _, reason in skipped:
            if reason == "SYMLINK_LOOP":
                continue
            reasons[reason] = reasons.get(reason, 0) + 1
        for _, reason in plan.dicom_skipped:  # the DICOM reader's words ("not DICOM", ...)
            code = reason.upper().replace(" ", "_")
            reasons[code] = reasons.get(code, 0) + 1
        issues.append(Finding("FILES_SKIPPED", f"{n_skipped} file(s) were not images and were "
                                               "skipped.", {"counts": reasons}))
    return Study(
        key=_study_key(plan),
        volumes=volumes,
        clinical=None if clinical is None else dict(clinical),
        issues=tuple(issues),
        notes=texts,
    )

