"""The two halves of scoring one study, and the glue that runs the first half anywhere.

A :class:`Scorer` splits the work so that the batch can overlap I/O with compute:

* ``prepare(study)`` runs in a worker process (or a Ray task): it turns a loaded
  :class:`~medfusion.types.Study` into small model tensors (a 96^3 tensor ships between
  processes in a fraction of the time a full 512x512x200 volume does);
* ``predict(prepared, explain, alpha)`` runs in the parent, one study at a time.

:class:`FusionModelScorer` adapts :class:`medfusion.inference.FusionModel`.
:func:`prepare_task` is what a worker runs for one :class:`StudyRef`; it never raises:
every failure comes back as a PHI-free failure record.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from medfusion.errors import (
    BudgetExceededError,
    MedfusionError,
    MixedSeriesError,
    ModelPackageError,
    NoImagesError,
)
from medfusion.explain.api import DEFAULT_CAM_METHOD
from medfusion.explain.dicom import card_digest
from medfusion.inference import FusionModel, PreparedInputs
from medfusion.io.notes import note_file
from medfusion.io.study import load_study
from medfusion.scoring.discovery import StudyRef, input_digest, study_files
from medfusion.stages import collect
from medfusion.types import Prediction, Study, Volume


@runtime_checkable
class Scorer(Protocol):
    """What the batch engine needs from a model."""

    labels: Sequence[str]
    roles: Sequence[str]  # imaging roles (saliency columns)
    text_roles: Sequence[str]  # note roles: ``<role>.txt`` in a study folder
    modalities: Sequence[str]  # roles plus e.g. "clinical" (modality-weight columns)

    def prepare(self, study: Study, *, explain: bool) -> Any:
        """Study -> small, picklable model inputs (runs in workers). With ``explain`` the
        source volumes travel too (saliency is mapped back onto them)."""

    def predict(self, prepared: Any, *, explain: bool, alpha: float,
                cam_method: str = DEFAULT_CAM_METHOD) -> Prediction:
        """Prepared inputs -> Prediction (runs in the parent); ``cam_method`` is the
        saliency method with ``explain`` (``gradcam`` or ``gradcam++``)."""

    def describe(self) -> dict[str, Any]:
        """PHI-free description for run.json (card hash, recipe...)."""


@runtime_checkable
class WarmsUp(Protocol):
    """A scorer that can run its preparation once on made-up input before real studies.

    Workers call it before they report ready: the first ``prepare`` of a process allocates
    caches and pools once (tens of MiB), and a memory budget must measure what a *study*
    costs, not that one-time start (``docs/scoring.md``)."""

    def warm_up(self) -> bool:
        """Prepare one synthetic study; True when it went through. Never raises."""


#: DICOM modality of a synthetic warm-up volume by role; other roles use the role name
_WARM_UP_MODALITY = {"ct": "CT", "mr": "MR", "xray": "CR"}


class FusionModelScorer:
    """A :class:`Scorer` over a saved model package (``FusionModel.load(dir)``)."""

    def __init__(self, model: FusionModel, model_dir: str) -> None:
        self.model = model
        self.model_dir = model_dir
        self.labels = tuple(model.labels)
        self.roles = tuple(model.roles)
        self.text_roles = tuple(model.text_roles)
        self.modalities = tuple(model.modalities)

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], *,
             networks: bool = True) -> FusionModelScorer:
        """Load the package; any problem is a :class:`ModelPackageError` (fatal, exit 1).
        ``networks=False``: a scorer that only prepares (what workers run)."""
        try:
            model = FusionModel.load(model_dir, networks=networks)
        except MedfusionError:
            raise
        except Exception as error:  # unexpected reader failure: still a clean refusal
            raise ModelPackageError(
                f"could not load the model package ({type(error).__name__}); check --model "
                "points at a folder written by `medfusion train`",
            ) from None
        return cls(model, os.fspath(model_dir))

    def prepare(self, study: Study, *, explain: bool) -> PreparedInputs:
        # Without explanations neither the full-size source volumes nor the model-grid
        # Volumes are needed in the parent: shipping only the tensors is several times
        # cheaper between processes (design.md).
        prepared = self.model.prepare(study, keep_sources=explain)
        return prepared if explain else prepared.tensors_only()

    def warm_up(self) -> bool:
        # A smooth ramp over -1000..1000 passes every normalisation (HU window, robust
        # z-score, percentiles) on a volume twice the model grid, so resampling runs too.
        volumes: dict[str, Volume] = {}
        for role in self.roles:
            grid = tuple(self.model.role_specs[role].grid)
            shape = tuple(2 * g if g > 1 else 1 for g in grid)
            ramp = np.linspace(-1000.0, 1000.0, int(np.prod(shape)), dtype=np.float32)
            array = ramp.reshape(shape).astype(np.int16)
            volumes[role] = Volume(array=array, affine=np.eye(4),
                                   modality=_WARM_UP_MODALITY.get(role, "unknown"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.model.prepare(Study(key="warm-up", volumes=volumes), keep_sources=False)
            except Exception:  # noqa: BLE001 - a warm-up only; real studies report errors
                return False
        return True

    def predict(self, prepared: PreparedInputs, *, explain: bool, alpha: float,
                cam_method: str = DEFAULT_CAM_METHOD) -> Prediction:
        # One study per call: batching would make the floats depend on which studies
        # happened to be ready together, and rows must not depend on the worker count.
        return self.model.predict_prepared([prepared], explain=explain, alpha=alpha,
                                           cam_method=cam_method)[0]

    @property
    def clinical_schema(self) -> dict[str, dict[str, Any]] | None:
        """The clinical schema the model was trained with (None when it has none)."""
        return self.model.clinical_schema or None

    @property
    def uses_clinical(self) -> bool:
        return self.model.card.uses_clinical

    def describe(self) -> dict[str, Any]:
        card = self.model.card.to_dict()
        files = {}
        for name in sorted(os.listdir(self.model_dir)):
            path = os.path.join(self.model_dir, name)
            if os.path.isfile(path):
                with open(path, "rb") as handle:
                    files[name] = hashlib.file_digest(handle, "sha256").hexdigest()
        return {
            "card_sha256": card_digest(self.model.card),
            "medfusion_version": card.get("medfusion_version"),
            "file_sha256": files,
            "labels": list(self.labels),
            "roles": list(self.roles),
            **({"text_roles": list(self.text_roles)} if self.text_roles else {}),
            "modalities": list(self.modalities),
            "recipe": card.get("recipe"),
        }


def load_fusion_scorer(model_dir: str) -> Scorer:
    """Default scorer factory (a top-level function so spawned workers can import it)."""
    return FusionModelScorer.load(model_dir)


def load_fusion_preparer(model_dir: str) -> Scorer:
    """The default factory's worker half: the same package, checked the same way, without
    its networks (workers only ``prepare``; building an encoder costs seconds of imports)."""
    return FusionModelScorer.load(model_dir, networks=False)


def worker_factory(factory: Callable[[str], Scorer]) -> Callable[[str], Scorer]:
    """What workers build: :func:`load_fusion_preparer` for the default factory, otherwise
    ``factory`` itself (a custom scorer decides what its ``prepare`` needs)."""
    return load_fusion_preparer if factory is load_fusion_scorer else factory


# --------------------------------------------------------------------------------------
# memory accounting (Linux /proc; elsewhere budgets fall back to time only)


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of a process in MiB, or None where /proc is unavailable."""
    return _proc_status_mb("VmRSS", pid)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since the last :func:`reset_peak_rss`."""
    return _proc_status_mb("VmHWM", None)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux >= 4.0); False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str, pid: int | None) -> float | None:
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------------------
# the worker half

_CHATTY_LOGGERS = ("pydicom", "nibabel", "monai", "PIL", "matplotlib")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library warnings and loggers for the duration: pydicom, for one, logs the
    offending *value* of an invalid header element, which may be a patient name."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    before = [lg.disabled for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.disabled = True
        try:
            yield
        finally:
            for lg, was in zip(loggers, before, strict=True):
                lg.disabled = was


# A name or path matches only as a whole token, not glued to a letter or digit: a file
# "CT1" leaves "CT12" alone and the root "/data/b" leaves "/data/b2" alone.
_EDGE_BEFORE = r"(?<![A-Za-z0-9])"
_EDGE_AFTER = r"(?![A-Za-z0-9])"
# What may follow a root or study folder path before the next blank or quote: a path below it.
_PATH_TAIL = r"(?:[/\\][^\s'\"`<>|:;,()\[\]]*)?"


def _name_like(name: str) -> bool:
    """A file or folder name that cannot be an ordinary word of a message: it holds a digit
    or punctuation such as ``_ - . ^`` or a blank. A single word of letters ("study",
    "data", "DICOM") is left alone where it stands as a word of the message; inside a path
    it goes with the path."""
    return not name.isalpha()


def scrub(message: str, ref: StudyRef, files: Sequence[str]) -> str:
    """Remove paths and file/folder names from a message: they may hold names.

    * every file path becomes ``<file>``; the batch root and the study folder (as given and
      resolved), with whatever path follows them, become ``<root>`` or ``<study>``;
    * a file's path relative to the study folder or the root becomes ``<file>``;
    * a bare file or folder name (any component of those relative paths) becomes
      ``<name>`` where it stands as a whole token (any case) and is name-like (digits,
      punctuation, blanks: ``Doe_John_1970``, ``IMG0001.dcm``); a name that is one word of
      letters (``study``, ``data``) is left where it is an ordinary word of the message;
    * the study folder's name is always removed when it holds patient identifiers (its
      public ``study_id`` is then the pseudonym, so the two differ).

    Everything is replaced in one pass, longest match first, so a placeholder is never
    rewritten and a full path wins over its components.
    """
    paths: dict[str, str] = {}
    names: dict[str, str] = {}
    base = ref.folder or ref.root
    for root, label in ((ref.root, "<root>"), (ref.folder, "<study>")):
        if root:
            for form in {root, os.path.realpath(root)}:
                paths[form.rstrip("/\\") or form] = label
    base_label = "<study>" if ref.folder else "<root>"
    for path in files:
        paths[path] = "<file>"  # a link's target lies below the resolved root or folder
        # The folders between base and file are whole paths too: a blank in one ("John
        # Smith") would otherwise end the match of the shorter base path before the name.
        folder = os.path.dirname(path)
        while folder not in paths and folder.startswith(base.rstrip("/\\") + os.sep):
            paths[folder] = base_label
            folder = os.path.dirname(folder)
        for start in {base, ref.root}:
            # A prefix test, not os.path.relpath: thousands of files per study stay cheap.
            prefix = start.rstrip("/\\") + os.sep
            if path.startswith(prefix):
                rel = path[len(prefix):]
                if os.sep in rel:  # a bare name is handled with the names below
                    paths[rel] = "<file>"
                for part in rel.split(os.sep):
                    if part and part not in (".", "..") and _name_like(part):
                        names[part.casefold()] = "<name>"
    if ref.folder:
        folder_name = os.path.basename(os.path.normpath(ref.folder))
        if _name_like(folder_name) or (ref.source_name and ref.study_id != ref.source_name):
            names[folder_name.casefold()] = "<name>"
    folded = message.casefold()
    alternatives: list[tuple[int, str, str]] = []  # (literal length, regex, placeholder)
    # Only what occurs at all: a study of thousands of files keeps a small pattern.
    for old, label in paths.items():
        if old in message:
            tail = _PATH_TAIL if label != "<file>" else ""
            alternatives.append((len(old), re.escape(old) + tail + _EDGE_AFTER, label))
    for old, label in names.items():
        if old in folded:
            alternatives.append((len(old), "(?i:" + re.escape(old) + ")" + _EDGE_AFTER, label))
    if not alternatives:
        return message
    # Longest first: regex alternation takes the first branch that matches at a position.
    alternatives.sort(key=lambda item: item[0], reverse=True)
    pattern = re.compile(
        _EDGE_BEFORE + "(?:" + "|".join(f"({rx})" for _, rx, _ in alternatives) + ")"
    )
    labels = [label for _, _, label in alternatives]
    return pattern.sub(lambda m: labels[(m.lastindex or 1) - 1], message)


def failure(ref: StudyRef, stage: str, error: BaseException, files: Sequence[str] = ()) -> dict:
    """A PHI-free failure record for ``error`` (no traceback, ever)."""
    if isinstance(error, MedfusionError):
        code, message = error.code, scrub(error.message, ref, files)
    elif isinstance(error, MemoryError):
        code, message = "BUDGET_EXCEEDED", "ran out of memory; the study is too large"
    else:
        # An unexpected exception's text may quote file contents or paths: only its type.
        code = "INTERNAL"
        message = (
            f"unexpected {type(error).__name__} at the {stage} stage of this study; please "
            "report it with the study key from run.json"
        )
    return {"study_id": ref.study_id, "stage": stage, "code": code, "message": message}


def _mirror(ref: StudyRef, files: Sequence[str], tmp: str) -> str:
    """A folder holding exactly ``files`` of a loose group (hard links, or copies across
    filesystems): the study loader then sees this study's files and nothing else."""
    for n, path in enumerate(files):
        target = os.path.join(tmp, f"{n:06d}.dcm")  # never the original (maybe named) file name
        try:
            os.link(os.path.realpath(path), target)
        except OSError:
            shutil.copyfile(path, target)
    return tmp


def _load_timings(load_s: float, seconds: Mapping[str, float],
                  preprocess_s: float | None = None) -> dict[str, float]:
    """A study's worker-side stage times (``docs/scoring.md``): ``read_s`` is everything
    of loading but the pixel decode (file listing, digest, headers, stacking)."""
    decode_s = float(seconds.get("decode", 0.0))
    out = {"read_s": round(max(0.0, load_s - decode_s), 4), "decode_s": round(decode_s, 4)}
    if preprocess_s is not None:
        out["preprocess_s"] = round(preprocess_s, 4)
    return out


def prepare_task(
    scorer: Scorer,
    ref: StudyRef,
    clinical: Mapping[str, Any] | None,
    *,
    explain: bool = False,
    memory_budget_mb: float | None = None,
) -> dict[str, Any]:
    """Load and prepare one study. Returns a record with ``ok`` and either ``prepared`` or
    ``failure``, plus the input digest, counts and timings. Never raises."""
    t0 = time.perf_counter()
    tracked = memory_budget_mb is not None and reset_peak_rss()
    base_mb = rss_mb() if tracked else None
    out: dict[str, Any] = {"study_id": ref.study_id, "key": ref.key, "ok": False}
    files: list[str] = []
    stage = "discover"
    seconds: dict[str, float] = {}
    try:
        files, skipped, unsafe = study_files(ref)
        # The notes of the model's text roles are inputs too (resume must see an edit).
        notes = [] if ref.folder is None else [
            os.fspath(p) for r in scorer.text_roles if (p := note_file(ref.folder, r))]
        files, skipped = files + notes, max(0, skipped - len(notes))
        out.update(n_files=len(files), skipped_files=skipped, unsafe_links=unsafe)
        out["digest"] = input_digest(files, ref.folder or ref.root)
        if not files:
            raise NoImagesError(
                "no DICOM or NIfTI file (or note of the model) in this study folder; add "
                "inputs or remove the folder"
            )
        stage = "load"
        with quiet_libraries(), tempfile.TemporaryDirectory(prefix="mf-") as tmp, \
                collect() as seconds:
            # A study folder goes to the loader as it is (it skips links leaving the folder
            # too); a loose group of files gets a private folder of its own.
            folder = ref.folder if ref.folder else _mirror(ref, files, tmp)
            study = load_study(folder, clinical=dict(clinical) if clinical else None,
                               notes=scorer.text_roles)
            if any(f.code == "MULTIPLE_STUDIES" for f in study.issues):
                # Two patients or visits in one folder: scoring the mix would be wrong.
                raise MixedSeriesError(
                    "this study folder holds images of more than one DICOM study; put each "
                    "study in its own folder"
                )
            t1 = time.perf_counter()
            stage = "prepare"
            prepared = scorer.prepare(study, explain=explain)
        t2 = time.perf_counter()
        out["issues"] = sorted({f.code for f in study.issues})
        out["roles"] = list(study.roles)
        out["timings"] = _load_timings(t1 - t0, seconds, preprocess_s=t2 - t1)
        if tracked:
            peak = peak_rss_mb()
            if peak is not None and base_mb is not None:
                out["peak_mb"] = round(peak - base_mb, 1)
                if peak - base_mb > float(memory_budget_mb or 0):
                    raise BudgetExceededError(
                        f"preparing this study used {peak - base_mb:.0f} MiB, over the "
                        f"{memory_budget_mb:.0f} MiB budget; raise the budget or check the input"
                    )
        out["ok"] = True
        out["prepared"] = prepared
    except BaseException as error:  # noqa: BLE001 - every failure becomes one row
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise
        out["failure"] = failure(ref, stage, error, files)
        out.setdefault("timings", _load_timings(time.perf_counter() - t0, seconds))
        out["recycle"] = isinstance(error, BudgetExceededError | MemoryError)
    return out
