"""``score_folder``: a folder of studies in, one row per study out (``medfusion score``).

The run, in order:

1. fatal checks before anything is scored (exit 1): options, the model package, the
   clinical table, discovery of the studies, the output folder (writable, empty unless
   ``resume``, same configuration as the interrupted run when resuming);
2. the studies still missing from the journal are prepared by a preparer (inline, local
   worker processes or Ray tasks; bounded in flight) while the parent runs inference on
   what is ready, one study at a time with a per-study seed;
3. each finished study (a scored row or a failure row) is appended to the journal and
   fsync'ed; scores.csv / failures.csv / run.json are rebuilt from it atomically every few
   seconds and at the end.

Exit code: 0 every study scored, 2 some failed (see failures.csv), 1 fatal (raised as a
:class:`~medfusion.errors.MedfusionError` before scoring; the CLI maps it to 1).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from medfusion import __version__
from medfusion.errors import ClinicalSchemaError, MedfusionError, OutputError
from medfusion.explain.api import CAM_METHODS, DEFAULT_CAM_METHOD
from medfusion.explain.dicom import ModelIdentity, write_dicom_results
from medfusion.explain.export import write_explanation
from medfusion.inference.table import prediction_row
from medfusion.io.clinical import FLAG_COLUMNS_MISSING, read_clinical_csv
from medfusion.keys import pseudonym, safe_component
from medfusion.scoring import outputs as O
from medfusion.scoring.discovery import Discovery, StudyRef, discover_studies
from medfusion.scoring.pool import InlinePreparer, LocalPool, ScorerFactory
from medfusion.scoring.ray_engine import RayPreparer
from medfusion.scoring.scorer import (
    Scorer,
    failure,
    load_fusion_scorer,
    quiet_libraries,
    worker_factory,
)
from medfusion.seeding import seed_everything, study_seed
from medfusion.stages import STAGES, collect
from medfusion.types import Prediction

__all__ = ["RunOptions", "RunSummary", "score_folder", "score_row", "study_seed"]

log = logging.getLogger("medfusion.scoring")

REBUILD_EVERY_S = 10.0  # snapshots of the CSVs while running; the journal is the truth
ENGINES = ("local", "ray")
DICOM = "dicom"  # OUT/dicom/<study>/: identity-bearing DICOM result objects (--dicom)
FLAG_NO_CLINICAL = "no_clinical_record"


@dataclass
class RunSummary:
    """What a run did. ``exit_code`` is what ``medfusion score`` exits with."""

    out_dir: str
    n_studies: int
    n_scored: int
    n_failed: int
    n_resumed: int
    n_skipped_files: int
    n_unsafe_links: int
    elapsed_s: float
    studies_per_s: float
    exit_code: int
    failure_codes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunOptions:
    """Everything a scoring run is given (see :func:`score_folder` for each option)."""

    studies_root: str
    model_dir: str
    out_path: Path
    clinical_csv: str | os.PathLike[str] | None = None
    workers: int = 1
    resume: bool = False
    explain: bool = False
    alpha: float = 0.1
    engine: str = "local"
    ray_address: str | None = None
    seed: int = 0
    time_budget_s: float | None = None
    memory_budget_mb: float | None = None
    progress: bool = True
    command_line: Sequence[str] | None = None
    allow_missing_clinical: bool = False
    dicom: bool = False
    dicom_deidentified: bool = False
    cam_method: str = DEFAULT_CAM_METHOD


# --------------------------------------------------------------------------------------
# helpers


def _bad_option(message: str) -> MedfusionError:
    return MedfusionError(message, code="BAD_OPTION")


def _check_options(opts: RunOptions) -> None:
    workers, alpha, engine = opts.workers, opts.alpha, opts.engine
    time_budget_s, memory_budget_mb = opts.time_budget_s, opts.memory_budget_mb
    if not isinstance(workers, int) or workers < 0:
        raise _bad_option("--workers must be 0 (inline) or a positive number of processes")
    if not 0.0 < float(alpha) < 1.0:
        raise _bad_option("--alpha must be between 0 and 1 (e.g. 0.1 for 90% coverage)")
    if engine not in ENGINES:
        raise _bad_option(f"--engine must be one of {', '.join(ENGINES)}")
    if (opts.dicom or opts.dicom_deidentified) and not opts.explain:
        raise _bad_option("--dicom and --dicom-deidentified need --explain (the parametric "
                          "maps are the saliency maps)")
    if opts.cam_method not in CAM_METHODS:
        raise _bad_option(f"--cam-method must be one of {', '.join(CAM_METHODS)}")
    for name, value in (("time budget", time_budget_s), ("memory budget", memory_budget_mb)):
        if value is not None and float(value) <= 0:
            raise _bad_option(f"the {name} must be positive")


def _file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _versions() -> dict[str, str]:
    out = {"medfusion": __version__, "python": platform.python_version()}
    for dist in ("torch", "monai", "numpy", "pydicom", "nibabel", "SimpleITK", "scikit-learn",
                 "scipy", "safetensors", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def safe_command_line(argv: Sequence[str]) -> list[str]:
    """The command line with every path-like argument replaced by a pseudonym: paths can
    hold patient or site names; options and numbers stay readable."""
    out = []
    for token in argv:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        looks_like_path = os.sep in value or os.path.exists(value)
        if token.startswith("-") and "=" not in token:
            out.append(token)
        elif looks_like_path:
            prefix = token.split("=", 1)[0] + "=" if token.startswith("--") else ""
            out.append(prefix + pseudonym(os.path.abspath(value), prefix="path-"))
        else:
            out.append(token)
    if out:
        out[0] = os.path.basename(argv[0]) if argv[0] and "medfusion" in argv[0] else out[0]
    return out


def score_row(
    study_id: str,
    pred: Prediction,
    labels: Sequence[str],
    modalities: Sequence[str],
    extra_flags: Sequence[str],
    saliency: Mapping[str, str] | None,
    *,
    explain: bool,
) -> dict[str, str]:
    """One scores.csv row: the predictions table's cells (Shapley values with ``explain``)
    plus the scoring bookkeeping (``status``, ``saliency_<role>`` paths)."""
    row = prediction_row(study_id, pred, labels, modalities, shapley=explain,
                         extra_flags=extra_flags)
    row["status"] = "scored"
    for role, path in (saliency or {}).items():
        row[f"saliency_{role}"] = path
    return row


def write_dicom(
    out: Path, study_id: str, study_key: str, pred: Prediction, sources: Mapping[str, Any],
    model: ModelIdentity, *, alpha: float, deidentify: bool,
) -> dict[str, Any]:
    """Write one study's DICOM result objects to ``OUT/dicom/<study_id>/`` in one atomic
    rename (same folder naming as saliency). Returns the PHI-free summary for run.json."""
    root = out / DICOM
    staging = root / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    folder_name = safe_component(study_id, prefix="st-")
    final = O.path_under(root, folder_name)
    tmp = O.path_under(staging, folder_name)
    shutil.rmtree(tmp, ignore_errors=True)
    results = write_dicom_results(pred, pred.explanation, sources, tmp, model=model,
                                  study_key=study_key, alpha=alpha, deidentify=deidentify)
    if results.sr is not None:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    summary = results.summary()
    summary["folder"] = f"{DICOM}/{folder_name}" if results.sr is not None else None
    summary["deidentified"] = bool(deidentify)
    return summary


def write_saliency(
    out: Path, study_id: str, explanation: Any, images: Mapping[str, Any] | None = None,
    study_key: str | None = None,
) -> dict[str, str]:
    """Write one study's saliency to ``OUT/saliency/<study_id>/`` in one atomic rename.

    Paths come only from the study id (or its pseudonym when the id is not a plain name)
    and role names; the target is checked to stay under OUT. Returns role -> path
    relative to OUT."""
    if explanation is None or not getattr(explanation, "saliency", None):
        return {}
    sal_root = out / O.SALIENCY
    staging = sal_root / ".staging"  # hidden: never mistaken for a study's folder
    staging.mkdir(parents=True, exist_ok=True)
    folder_name = safe_component(study_id, prefix="st-")
    final = O.path_under(sal_root, folder_name)
    tmp = O.path_under(staging, folder_name)
    shutil.rmtree(tmp, ignore_errors=True)
    paths = write_explanation(explanation, staging, folder_name, images=images,
                              study_key=study_key)
    written = {}
    for role in sorted(explanation.saliency):
        path = paths.get(f"{role}.nii.gz")
        if path is not None:
            written[str(role)] = Path(path).name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {role: f"{O.SALIENCY}/{folder_name}/{rel}" for role, rel in written.items()}


def stage_summary(timings: Iterable[Mapping[str, Any]], workers: int) -> dict[str, Any]:
    """Where the run's time went, from the per-study stage times (``<stage>_s``).

    Per stage: how many studies recorded it, the total seconds and per-study percentiles.
    ``worker_side_s`` (read + decode + preprocess) runs in ``workers`` processes at once,
    ``parent_side_s`` (infer + explain + write) in the parent one study at a time, so
    ``limited_by`` names the side whose time per lane is larger (``one process`` with
    ``workers`` = 0, where everything runs in turn) and ``largest_stage`` the stage with
    the largest total."""
    rows = [t for t in timings if t]
    per_stage: dict[str, dict[str, float | int]] = {}
    for stage in STAGES:
        values = np.array([float(t[f"{stage}_s"]) for t in rows if f"{stage}_s" in t])
        if values.size == 0:
            continue
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        per_stage[stage] = {"studies": int(values.size),
                            "total_s": round(float(values.sum()), 3),
                            "mean_s": round(float(values.mean()), 4),
                            "p50_s": round(float(p50), 4), "p90_s": round(float(p90), 4),
                            "p99_s": round(float(p99), 4), "max_s": round(float(values.max()), 4)}

    def total(names: Sequence[str]) -> float:
        return round(sum(float(per_stage[n]["total_s"]) for n in names if n in per_stage), 3)

    worker_side = total(("read", "decode", "preprocess"))
    parent_side = total(("infer", "explain", "write"))
    if workers <= 0:
        limited_by = "one process"
    elif worker_side / workers >= parent_side:
        limited_by = "workers (read + decode + preprocess)"
    else:
        limited_by = "parent (infer + explain + write)"
    largest = max(per_stage, key=lambda n: float(per_stage[n]["total_s"]), default=None)
    return {"per_stage": per_stage, "worker_side_s": worker_side, "parent_side_s": parent_side,
            "workers": int(workers), "limited_by": limited_by if per_stage else None,
            "largest_stage": largest}


# --------------------------------------------------------------------------------------
# progress (PHI-free: counts, rate and ETA only)


class _Progress:
    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled = enabled
        self.failed = 0
        self._progress = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("scoring", total=total, completed=done, failed=0,
                                             rate="")
        self._start = time.monotonic()
        self._count = 0

    def advance(self, failed: bool) -> None:
        if self._progress is None:
            return
        self.failed += int(failed)
        self._count += 1
        rate = self._count / max(1e-9, time.monotonic() - self._start)
        self._progress.update(self._task, advance=1, failed=self.failed,
                              rate=f"{rate:.2f} studies/s")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# --------------------------------------------------------------------------------------
# the run


@dataclass
class _Clinical:
    """The clinical CSV as the run uses it: valid rows, rows set aside for a bad cell
    (``{study_id: message}``, each becomes that study's failure row) and the flags every
    scored row carries (schema columns accepted as absent)."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()


def _read_clinical(path: str | os.PathLike[str], scorer: Scorer,
                   allow_missing: bool) -> _Clinical:
    """Clinical rows keyed by ``study_id``, read with the model's schema. The file's
    structure (id column, duplicate ids, columns matching the schema) is checked here and
    refused before scoring; a bad cell only fails its own study."""
    schema = getattr(scorer, "clinical_schema", None) or None
    table = read_clinical_csv(path, schema=schema, id_column="study_id",
                              allow_missing_clinical=allow_missing, bad_values="collect")
    return _Clinical(
        records={str(k): dict(v) for k, v in table.items()},
        errors={str(k): str(v) for k, v in table.errors.items()},
        flags=(FLAG_COLUMNS_MISSING,) if table.absent else (),
    )


def _clinical_failure(ref: StudyRef, message: str) -> dict[str, Any]:
    """The journal record of a study whose clinical row has a bad cell: it is not loaded."""
    fail = failure(ref, "clinical", ClinicalSchemaError(message))
    return {"study_id": ref.study_id, "key": ref.key, "digest": None, "n_files": None,
            "skipped_files": 0, "unsafe_links": 0, "issues": [], "timings": {},
            "status": "failed", "failure": fail, "stage": "clinical", "code": fail["code"]}


def _make_preparer(opts: RunOptions, scorer: Scorer, factory: ScorerFactory) -> Any:
    engine, workers, model_dir, ray_address = (opts.engine, opts.workers, opts.model_dir,
                                               opts.ray_address)
    time_budget_s, memory_budget_mb = opts.time_budget_s, opts.memory_budget_mb
    if engine == "ray":
        return RayPreparer(max(1, workers), model_dir, factory=worker_factory(factory),
                           ray_address=ray_address,
                           time_budget_s=time_budget_s, memory_budget_mb=memory_budget_mb)
    if workers == 0:
        return InlinePreparer(scorer, time_budget_s=time_budget_s,
                              memory_budget_mb=memory_budget_mb)
    return LocalPool(workers, model_dir, factory=worker_factory(factory),
                     time_budget_s=time_budget_s,
                     memory_budget_mb=memory_budget_mb)


def score_folder(
    studies_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    clinical_csv: str | os.PathLike[str] | None = None,
    workers: int = 1,
    resume: bool = False,
    explain: bool = False,
    alpha: float = 0.1,
    engine: str = "local",
    ray_address: str | None = None,
    seed: int = 0,
    time_budget_s: float | None = None,
    memory_budget_mb: float | None = None,
    progress: bool = True,
    command_line: Sequence[str] | None = None,
    scorer_factory: ScorerFactory = load_fusion_scorer,
    allow_missing_clinical: bool = False,
    dicom: bool = False,
    dicom_deidentified: bool = False,
    cam_method: str = DEFAULT_CAM_METHOD,
) -> RunSummary:
    """Score every study of ``studies_dir`` with the model in ``model_dir`` into ``out_dir``.

    ``workers`` processes load and preprocess studies (0 = in this process) while this
    process runs inference. ``time_budget_s`` / ``memory_budget_mb`` bound the loading of
    one study (memory: growth of the worker's resident memory); a study over budget becomes
    a ``BUDGET_EXCEEDED`` failure row and its worker is replaced. Fatal problems found
    before scoring raise :class:`MedfusionError` (the CLI exits 1); per-study problems
    become failure rows (exit code 2 in the returned summary).

    The clinical CSV must hold every clinical variable of the model (``CLINICAL_SCHEMA``
    otherwise) unless ``allow_missing_clinical``: absent ones are then missing for every
    study and each scored row is flagged ``CLINICAL_COLUMNS_MISSING``. A study whose row
    has an invalid cell gets a failure row (stage ``clinical``) and the others are scored.

    ``dicom`` (with ``explain``) also writes each DICOM-sourced study's structured report
    and parametric maps to ``OUT/dicom/<study_id>/`` (:mod:`medfusion.explain.dicom`). These
    carry the patient's identity (they belong in the patient's study) and are kept apart
    from the PHI-free outputs; ``dicom_deidentified`` writes them with the pseudonymous study
    key instead. A study read from NIfTI gets none; run.json says so under ``dicom``.
    ``cam_method``: ``gradcam`` or ``gradcam++``.
    """
    t_start = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    opts = RunOptions(
        studies_root=os.path.abspath(os.fspath(studies_dir)),
        model_dir=os.path.abspath(os.fspath(model_dir)),
        out_path=Path(os.path.abspath(os.fspath(out_dir))),
        clinical_csv=clinical_csv, workers=workers, resume=resume, explain=explain,
        alpha=alpha, engine=engine, ray_address=ray_address, seed=seed,
        time_budget_s=time_budget_s, memory_budget_mb=memory_budget_mb, progress=progress,
        command_line=command_line, allow_missing_clinical=allow_missing_clinical,
        dicom=dicom or dicom_deidentified, dicom_deidentified=dicom_deidentified,
        cam_method=cam_method,
    )
    _check_options(opts)
    model_dir = opts.model_dir

    # 1. fatal checks, cheapest and side-effect free first.
    if not os.path.isdir(model_dir):
        raise MedfusionError("--model must be a model folder (written by `medfusion train`)",
                             code="MODEL_PACKAGE")
    early = None
    if engine == "local" and workers > 0:
        # Start the workers first: their imports and model loading overlap the parent's.
        early = LocalPool(workers, model_dir, factory=worker_factory(scorer_factory),
                          time_budget_s=time_budget_s, memory_budget_mb=memory_budget_mb)
    # Inference in this process runs on one thread: the bytes then do not depend on the
    # machine or on --workers, and torch's thread pool does not spin against the workers
    # (measured: 114 s of CPU instead of ~10 s for 200 studies on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(opts, early, scorer_factory, t_start, started_at)
    finally:
        torch.set_num_threads(threads)
        if early is not None:
            early.close()


def _run(
    opts: RunOptions,
    early: LocalPool | None,
    scorer_factory: ScorerFactory,
    t_start: float,
    started_at: str,
) -> RunSummary:
    """The body of :func:`score_folder` once options are checked (see its docstring)."""
    studies_root, model_dir, out_path = opts.studies_root, opts.model_dir, opts.out_path
    clinical_csv, workers, resume, explain = (opts.clinical_csv, opts.workers, opts.resume,
                                              opts.explain)
    alpha, engine, seed = opts.alpha, opts.engine, opts.seed
    time_budget_s, memory_budget_mb = opts.time_budget_s, opts.memory_budget_mb
    allow_missing_clinical, command_line = opts.allow_missing_clinical, opts.command_line
    scorer = scorer_factory(model_dir)
    labels = tuple(scorer.labels)
    roles = tuple(scorer.roles)
    modalities = tuple(getattr(scorer, "modalities", roles))
    table = _Clinical()
    clinical_sha = None
    if clinical_csv is not None:
        if not os.path.isfile(clinical_csv):
            raise MedfusionError("--clinical must be a CSV file with a study_id column",
                                 code="CLINICAL_SCHEMA")
        table = _read_clinical(clinical_csv, scorer, allow_missing_clinical)
        clinical_sha = _file_sha256(clinical_csv)
    clinical = table.records
    found: Discovery = discover_studies(studies_root, exclude=os.fspath(out_path))
    out = O.prepare_output_dir(out_path, resume=resume)
    model_info = scorer.describe()
    columns = O.score_columns(labels, roles, explain, modalities=modalities)
    header = {
        "format": 1,
        "model_card_sha256": model_info.get("card_sha256"),
        "model_file_sha256": model_info.get("file_sha256"),
        "columns": columns,
        "explain": bool(explain),
        "alpha": float(alpha),
        "seed": int(seed),
        "clinical_sha256": clinical_sha,
    }
    if opts.dicom:  # only when asked: journals of runs without it resume unchanged
        header["dicom"] = "deidentified" if opts.dicom_deidentified else "identified"
    if opts.cam_method != DEFAULT_CAM_METHOD:
        header["cam_method"] = opts.cam_method
    # The engine starts before the journal is opened: a Ray cluster that cannot be reached
    # is a fatal error that leaves OUT empty (a plain re-run needs no --resume).
    preparer = early or _make_preparer(opts, scorer, scorer_factory)
    try:
        journal = O.Journal(out / O.JOURNAL)
        if resume:
            journal.load()
        journal.open(header)
    except BaseException:
        preparer.close()
        raise
    # Clinical rows are keyed by folder name; a study's public id may be its pseudonym.
    with_clinical = {ref.study_id for ref in found.studies if ref.clinical_id in clinical}
    n_resumed = sum(1 for ref in found.studies if ref.study_id in journal.entries)
    todo = deque(ref for ref in found.studies if ref.study_id not in journal.entries)
    for ref in todo:  # saliency renamed into place by a killed run, before its journal line
        for folder in (O.SALIENCY, DICOM):
            stale = out / folder / safe_component(ref.study_id, prefix="st-")
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    run_info: dict[str, Any] = {
        "status": "running",
        "started_at": started_at,
        "versions": _versions(),
        "platform": {"system": platform.system(), "machine": platform.machine()},
        "model": model_info,
        "options": {
            "workers": workers, "engine": engine, "explain": bool(explain),
            "alpha": float(alpha), "resume": bool(resume),
            "time_budget_s": time_budget_s, "memory_budget_mb": memory_budget_mb,
            "clinical_sha256": clinical_sha, "ray_cluster": bool(opts.ray_address),
            "allow_missing_clinical": bool(allow_missing_clinical),
            "cam_method": opts.cam_method,
            "dicom": ("deidentified" if opts.dicom_deidentified else "identified")
            if opts.dicom else None,
        },
        "seeds": {"seed": int(seed), "per_study": "sha256(seed:study_id)[:4]"},
        "command_line": safe_command_line(list(command_line if command_line is not None
                                               else sys.argv)),
        "discovery": {"studies": len(found.studies), "skipped_files": found.skipped_files,
                      "unsafe_links": found.unsafe_links},
    }

    def totals() -> dict[str, Any]:
        entries = journal.entries.values()
        return {
            "studies": len(found.studies),
            "scored": sum(1 for e in entries if e.status == "scored"),
            "failed": sum(1 for e in entries if e.status != "scored"),
            "resumed": n_resumed,
            "skipped_files": found.skipped_files + sum(e.skipped_files for e in entries),
            "unsafe_links": found.unsafe_links + sum(e.unsafe_links for e in entries),
        }

    def snapshot(status: str) -> None:
        O.rebuild_tables(out, journal, columns)
        info = dict(run_info, status=status, totals=totals())
        info["studies"] = {
            rec["key"]: {k: rec.get(k) for k in ("status", "digest", "timings", "n_files",
                                                   "skipped_files", "unsafe_links", "issues",
                                                   "stage", "code", "dicom")
                if k in rec or k != "dicom"}
            for rec in journal.iter_sorted()
        }
        elapsed = time.monotonic() - t_start
        info["timings"] = {"elapsed_s": round(elapsed, 3),
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           **clock}
        info["stages"] = stage_summary(
            (rec.get("timings") or {} for rec in journal.iter_sorted()), workers)
        O.write_json(out / O.RUN_JSON, info)

    dicom_model = None
    if opts.dicom:
        dicom_model = ModelIdentity(
            name=os.path.basename(os.path.normpath(model_dir)) or "medfusion-model",
            version=str(model_info.get("medfusion_version") or "unknown"),
            card_sha256=str(model_info.get("card_sha256") or ""))
    bar = _Progress(False, 0, 0)
    newly = 0
    # This run's clock (not summed over resumed runs): set-up before the first study is
    # handed out, the first study's finish, and the parent's idle time waiting for workers.
    clock: dict[str, float] = {"setup_s": 0.0, "parent_idle_s": 0.0}
    try:
        snapshot("running")
        bar = _Progress(opts.progress, total=len(found.studies), done=n_resumed)
        ready: deque[dict[str, Any]] = deque()
        max_ready = max(1, workers)  # prepared studies waiting for inference (bounded)
        last_snapshot = time.monotonic()
        interval = REBUILD_EVERY_S

        clock["setup_s"] = round(time.monotonic() - t_start, 3)

        def finish(record: dict[str, Any]) -> None:
            nonlocal newly
            journal.add(record)
            newly += 1
            clock.setdefault("first_study_s", round(time.monotonic() - t_start, 3))
            bar.advance(record["status"] != "scored")

        # A bad clinical cell fails its own study before any loading; the batch goes on.
        for ref in [r for r in todo if r.clinical_id in table.errors]:
            finish(_clinical_failure(ref, table.errors[ref.clinical_id]))
        todo = deque(r for r in todo if r.clinical_id not in table.errors)

        while todo or preparer.busy() or ready:
            # Refill the workers *before* running inference, so they load the next studies
            # while this process computes; prepared studies waiting are bounded too.
            while todo and preparer.capacity() > 0 and len(ready) <= max_ready:
                ref = todo.popleft()
                preparer.submit((ref, clinical.get(ref.clinical_id), bool(explain)))
            t_poll = time.monotonic()
            polled = preparer.poll(0.0 if ready else 0.2)
            if not ready and not isinstance(preparer, InlinePreparer):
                clock["parent_idle_s"] = round(clock["parent_idle_s"] + time.monotonic()
                                               - t_poll, 3)
            for record in polled:
                if record.get("ok"):
                    ready.append(record)
                else:
                    finish(_failure_record(record))
            while todo and preparer.capacity() > 0 and len(ready) <= max_ready:
                ref = todo.popleft()
                preparer.submit((ref, clinical.get(ref.clinical_id), bool(explain)))
            if ready:
                record = ready.popleft()
                finish(_predict_record(record, scorer, labels, modalities, out, explain, alpha,
                                       seed, clinical_csv is not None
                                       and record["study_id"] not in with_clinical,
                                       table.flags, dicom_model, opts))
            if time.monotonic() - last_snapshot > interval:
                t_snap = time.monotonic()
                snapshot("running")
                last_snapshot = time.monotonic()
                # Rebuilding costs O(studies done): keep it under ~5% of the run's time.
                interval = max(REBUILD_EVERY_S, 20 * (last_snapshot - t_snap))
    except KeyboardInterrupt:
        snapshot("interrupted")
        raise
    finally:
        bar.close()
        preparer.close()
        journal.close()
    snapshot("complete")
    for folder in (O.SALIENCY, DICOM):
        staging = out / folder / ".staging"
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
    elapsed = time.monotonic() - t_start
    total = totals()
    codes: dict[str, int] = {}
    for entry in journal.entries.values():
        if entry.status != "scored":
            codes[str(entry.code)] = codes.get(str(entry.code), 0) + 1
    return RunSummary(
        out_dir=os.fspath(out),
        n_studies=len(found.studies),
        n_scored=total["scored"],
        n_failed=total["failed"],
        n_resumed=n_resumed,
        n_skipped_files=total["skipped_files"],
        n_unsafe_links=total["unsafe_links"],
        elapsed_s=round(elapsed, 3),
        studies_per_s=round(newly / elapsed, 3) if elapsed > 0 else 0.0,
        exit_code=0 if total["failed"] == 0 else 2,
        failure_codes=dict(sorted(codes.items())),
    )


def _base_record(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("study_id", "key", "digest", "n_files", "skipped_files",
                                       "unsafe_links", "issues", "timings")}


def _failure_record(record: Mapping[str, Any]) -> dict[str, Any]:
    out = _base_record(record)
    fail = dict(record["failure"])
    out.update(status="failed", failure=fail, stage=fail["stage"], code=fail["code"])
    return out


def _predict_record(
    record: dict[str, Any],
    scorer: Scorer,
    labels: Sequence[str],
    modalities: Sequence[str],
    out: Path,
    explain: bool,
    alpha: float,
    seed: int,
    no_clinical: bool,
    clinical_flags: Sequence[str] = (),
    dicom_model: ModelIdentity | None = None,
    opts: RunOptions | None = None,
) -> dict[str, Any]:
    """Inference (and saliency) for one prepared study, as a journal record."""
    ref = StudyRef(study_id=record["study_id"], key=record["key"], root="")
    base = _base_record(record)
    timings = dict(base.get("timings") or {})
    stage = "predict"
    t0 = time.perf_counter()
    try:
        seed_everything(study_seed(seed, ref.study_id))
        with quiet_libraries():
            cam_method = opts.cam_method if opts is not None else DEFAULT_CAM_METHOD
            with collect() as seconds:  # the model marks its saliency time as "explain"
                pred = scorer.predict(record["prepared"], explain=explain, alpha=alpha,
                                      cam_method=cam_method)
            predict_s = time.perf_counter() - t0
            explain_s = seconds.get("explain", 0.0)
            timings["infer_s"] = round(max(0.0, predict_s - explain_s), 4)
            if explain:
                timings["explain_s"] = round(explain_s, 4)
            stage = "explain"
            saliency = None
            t_write = time.perf_counter()
            if explain:
                sources = getattr(record["prepared"], "sources", None) or None
                saliency = write_saliency(out, ref.study_id, pred.explanation, sources,
                                          study_key=ref.key)
            if explain and dicom_model is not None and opts is not None:
                try:
                    base["dicom"] = write_dicom(
                        out, ref.study_id, ref.key, pred, sources or {}, dicom_model,
                        alpha=alpha, deidentify=opts.dicom_deidentified)
                except OutputError:
                    raise
                except MedfusionError as error:  # the row stands; the objects are missing
                    base["dicom"] = {"sr": None, "maps": {}, "folder": None,
                                     "skipped": {"study": f"not written ({error.code})"}}
            if explain:
                timings["write_s"] = round(time.perf_counter() - t_write, 4)
        flags = [*([FLAG_NO_CLINICAL] if no_clinical else []), *clinical_flags]
        row = score_row(ref.study_id, pred, labels, modalities, flags, saliency,
                        explain=explain)
    except OutputError:
        raise  # the disk, not the study: stop (resume later)
    except OSError as error:
        raise OutputError(
            f"writing saliency failed ({error.strerror}); free space, then run again with "
            "--resume",
            code="OUTPUT_WRITE_FAILED",
        ) from None
    except Exception as error:  # noqa: BLE001 - one bad study never stops the batch
        fail = failure(ref, stage, error)
        base.update(status="failed", failure=fail, stage=stage, code=fail["code"],
                    timings=timings)
        return base
    finally:
        record.pop("prepared", None)  # drop the tensors now: memory stays flat
    base.update(status="scored", row=row, timings=timings)
    return base
