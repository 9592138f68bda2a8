"""The ``medfusion`` command: a thin typer/rich shell over the Python API.

Each command parses arguments, calls one API function and renders its result. No logic of
its own lives here; errors with a stable code are shown as one clean line (exit 1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medfusion.errors import MedfusionError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="medfusion: multimodal medical-imaging diagnosis (load, train, predict, score, report).",
    # a traceback's locals hold paths, manifest rows and study ids: never printed
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)

_CAM_HELP = ("Saliency method with --explain: occlusion (default; finds the evidence, a few "
             "seconds per study), gradcam or gradcam++ (one pass, may light up a decoy).")
_DICOM_HELP = (
    "With --explain: also write, per study read from DICOM, a DICOM structured report "
    "(TID 1500) and parametric saliency maps to {where}. THESE CARRY THE PATIENT'S NAME, "
    "ID AND STUDY (they belong in the patient's study in a PACS) and are kept apart from "
    "the PHI-free outputs. Studies read from NIfTI get none.")
_DEID_HELP = ("Like --dicom, but the objects carry the pseudonymous study key instead of "
              "the patient's identity, and new UIDs in place of the source's (research).")


def _version(value: bool) -> None:
    if value:
        from medfusion import __version__

        typer.echo(f"medfusion {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the medfusion version and exit."),
) -> None:
    """medfusion: multimodal medical-imaging diagnosis (load, train, predict, score, report)."""


def _fail(error: MedfusionError) -> None:
    console.print(f"[red]error[/red] {error}")
    raise typer.Exit(code=1)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A study folder, DICOM series folder or file, or NIfTI."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    note: Optional[list[str]] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--note",
        help="A text role whose <role>.txt note to report (present, length in tokens; never "
             "its content). Repeatable."),
) -> None:
    """Show what was found (studies, series, modality, shape, spacing, issues), PHI-free."""
    from medfusion.io.inspect import inspect_path, render_inspection

    try:
        report = inspect_path(path, notes=tuple(note or ()))
    except MedfusionError as error:
        _fail(error)
        return
    except Exception as error:  # noqa: BLE001 - a traceback could show paths/locals (PHI)
        console.print(f"[red]error[/red] [INTERNAL] unexpected {type(error).__name__} while "
                      "inspecting; please report it (no file names are shown here)")
        raise typer.Exit(code=1) from None
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_inspection(report, Console())


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_output"), help="Where to write the demo outputs."),
) -> None:
    """The main job on the bundled samples in data_samples/."""
    from medfusion.demo import run_demo

    try:
        code = run_demo(out)
    except MedfusionError as error:
        _fail(error)
        return
    raise typer.Exit(code=code)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (labels, modalities, clinical, fusion)."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV (study_id, label, ...)."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (model.json + weights)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same model)."),
    quiet: bool = typer.Option(False, "--no-progress", "--quiet",
                               help="No progress bar (--quiet is the same)."),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Replace the package files in a non-empty --out (other files are kept)."),
) -> None:
    """Train a fusion model from a recipe and a manifest into a model package."""
    from medfusion.training.trainer import train as train_model

    try:
        path = train_model(recipe, manifest, out, seed=seed, progress=not quiet,
                           overwrite=overwrite)
    except MedfusionError as error:
        _fail(error)
        return
    card = json.loads((path / "model.json").read_text(encoding="utf-8"))
    if not quiet:
        _print_training_summary(card)
    metrics = {split: {k: v for k, v in m.items() if k in ("n", "auroc", "accuracy")}
               for split, m in card.get("metrics", {}).items()}
    console.print(f"model written to {path}  metrics: {json.dumps(metrics)}")
    for warning in card.get("training", {}).get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)


def _print_training_summary(card: dict) -> None:
    """Per-epoch validation metrics and the chosen calibration, from the card."""
    from rich.table import Table

    history = card.get("training", {}).get("history", [])
    if history:
        keys = [k for k in ("train_loss", "val_loss", "val_auroc", "val_accuracy")
                if any(k in r for r in history)]
        keys += sorted({k for r in history for k in r
                        if k.startswith(("val_auroc_", "val_accuracy_"))})
        table = Table(title="validation per epoch", show_edge=False)
        for column in ("member", "stage", "epoch", *keys):
            table.add_column(column, justify="right")
        for r in history:
            cells = [str(r.get("member", 0)), str(r.get("stage", "joint")), str(r["epoch"])]
            cells += ["" if r.get(k) is None else f"{r[k]:.3f}" for k in keys]
            if r.get("val_collapsed") or any(k.startswith("val_collapsed") for k in r):
                cells[2] += " (collapsed)"
            table.add_row(*cells)
        console.print(table)
    topped_up = card.get("training", {}).get("validation_from_train") or {}
    if topped_up.get("moved"):
        console.print(f"validation split: {topped_up['moved']} studies moved from the training "
                      f"split (validation_from_train {topped_up['setting']}, "
                      f"{topped_up['fraction']:.2f}), for the calibration")
    calibration = card.get("calibration") or {}
    fit = calibration.get("fit") or {}
    scaler = calibration.get("temperature") or {}
    if scaler:
        line = (f"calibration: {scaler.get('kind', 'temperature')}, T = "
                f"{scaler.get('temperature', 1.0):.3f}")
        if fit:
            line += (f"; validation NLL {fit['nll_raw']:.3f} raw -> {fit['nll_calibrated']:.3f}"
                     f", accuracy {fit['accuracy_calibrated']:.3f} (majority rate "
                     f"{fit['majority_rate']:.3f})")
        console.print(line)


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A model folder written by `medfusion train`."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV of studies to score."),
    out: Path = typer.Option(..., "--out", help="Predictions CSV to write."),
    alpha: float = typer.Option(0.1, "--alpha", help="Conformal error rate for prediction sets."),
    explain: bool = typer.Option(False, "--explain", help="Also compute explanations."),
    saliency_dir: Optional[Path] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--saliency-dir", help="With --explain: write saliency maps here."
    ),
    allow_missing_clinical: bool = typer.Option(
        False, "--allow-missing-clinical",
        help="Accept model clinical columns absent from the manifest as missing for every "
             "study (rows flagged CLINICAL_COLUMNS_MISSING); refused otherwise."),
    cam_method: str = typer.Option("occlusion", "--cam-method", help=_CAM_HELP),
    dicom: bool = typer.Option(
        False, "--dicom", help=_DICOM_HELP.format(where="dicom/<study_id>/ next to --out")),
    dicom_deidentified: bool = typer.Option(False, "--dicom-deidentified", help=_DEID_HELP),
) -> None:
    """Score every study of a manifest: study_id, predicted, prob_<label>, weight_<role>."""
    from medfusion.explain.api import CAM_METHODS
    from medfusion.inference import predict_manifest

    if cam_method not in CAM_METHODS:
        _fail(MedfusionError(f"--cam-method must be one of {', '.join(CAM_METHODS)}",
                             code="BAD_OPTION"))
    dicom_dir = out.parent / "dicom" if (dicom or dicom_deidentified) else None
    try:
        path = predict_manifest(model_dir, manifest, out, explain=explain,
                                saliency_dir=saliency_dir, alpha=alpha,
                                allow_missing_clinical=allow_missing_clinical,
                                cam_method=cam_method, dicom_dir=dicom_dir,
                                dicom_deidentified=dicom_deidentified)
    except MedfusionError as error:
        _fail(error)
        return
    console.print(f"predictions written to {path}")


@app.command()
def score(
    studies_dir: Path = typer.Argument(..., help="Folder with one subfolder per study."),
    model: Path = typer.Option(..., "--model", help="Model folder (FusionModel package)."),
    out: Path = typer.Option(..., "--out", help="Output folder (empty, or --resume)."),
    clinical: Optional[Path] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--clinical", help="Clinical CSV keyed by study_id (the study folder name)."
    ),
    workers: int = typer.Option(1, "--workers", help="Loader processes (0 = in-process)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT."),
    explain: bool = typer.Option(False, "--explain", help="Write saliency maps per study."),
    alpha: float = typer.Option(0.1, "--alpha", help="Conformal error rate (0.1 = 90% sets)."),
    engine: str = typer.Option("local", "--engine", help="local or ray."),
    ray_address: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--ray-address", help="Existing Ray cluster (e.g. auto); local Ray otherwise."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for any randomness at inference."),
    time_budget: Optional[float] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--time-budget", help="Seconds allowed to load one study."
    ),
    memory_budget: Optional[float] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--memory-budget", help="MiB a worker may grow while loading one study."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    allow_missing_clinical: bool = typer.Option(
        False, "--allow-missing-clinical",
        help="Accept model clinical columns absent from --clinical as missing for every "
             "study (rows flagged CLINICAL_COLUMNS_MISSING); refused otherwise."),
    cam_method: str = typer.Option("occlusion", "--cam-method", help=_CAM_HELP),
    dicom: bool = typer.Option(False, "--dicom",
                               help=_DICOM_HELP.format(where="OUT/dicom/<study_id>/")),
    dicom_deidentified: bool = typer.Option(False, "--dicom-deidentified", help=_DEID_HELP),
) -> None:
    """Score every study of a folder: scores.csv, failures.csv, saliency/, run.json.

    Exit 0 when every study scored, 2 when some failed (see failures.csv), 1 on a fatal
    problem found before scoring.
    """
    if engine == "local" and workers > 0:
        # The workers' fork server imports torch and the loaders on another core while
        # this process imports its own (start-up overlaps instead of adding up).
        from medfusion.scoring.procs import start_server

        start_server()
    from medfusion.scoring.engine import score_folder

    try:
        summary = score_folder(
            studies_dir, model, out, clinical_csv=clinical, workers=workers, resume=resume,
            explain=explain, alpha=alpha, engine=engine, ray_address=ray_address, seed=seed,
            time_budget_s=time_budget, memory_budget_mb=memory_budget,
            progress=not no_progress, command_line=sys.argv,
            allow_missing_clinical=allow_missing_clinical, dicom=dicom,
            dicom_deidentified=dicom_deidentified, cam_method=cam_method,
        )
    except MedfusionError as error:
        _fail(error)
        return
    except Exception as error:  # noqa: BLE001 - a traceback could show paths/locals (PHI)
        console.print(f"[red]error[/red] [INTERNAL] unexpected {type(error).__name__}; "
                      "run again with --resume after reporting it")
        raise typer.Exit(code=1) from None
    line = (f"scored {summary.n_scored}/{summary.n_studies} studies "
            f"({summary.n_resumed} resumed), {summary.n_failed} failed, "
            f"{summary.n_skipped_files} files skipped")
    if summary.n_failed:
        line += "; see failures.csv"
    console.print(line, soft_wrap=True)
    raise typer.Exit(code=summary.exit_code)


@app.command()
def report(
    scores: Path = typer.Option(..., "--scores", help="scores.csv written by `medfusion score`."),
    labels: Path = typer.Option(
        ..., "--labels", help="CSV with study_id, label [, patient_id, subgroup columns]."
    ),
    out: Path = typer.Option(..., "--out", help="Report folder (report.html, report.json)."),
    subgroups: str = typer.Option("", "--subgroups", help="Comma-separated labels.csv columns."),
    compare: Optional[Path] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--compare", help="Another scores.csv to compare with (paired DeLong)."
    ),
    model: Optional[Path] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--model", help="Model folder: its model.json becomes the model card."
    ),
    saliency: Optional[Path] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--saliency", help="Saliency folder (default: saliency/ next to scores.csv)."
    ),
    positive_label: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--positive-label", help="Positive class (default: the second label)."
    ),
    threshold: Optional[float] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, "--threshold", help="Decision threshold on the positive class (default 0.5)."
    ),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", help="Bootstrap replicates."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    accept_model_mismatch: bool = typer.Option(
        False, "--accept-model-mismatch",
        help="Write the report even when --model is not the model run.json recorded."),
) -> None:
    """Validation report of a scored batch: report.html (self-contained) and report.json."""
    from medfusion.report.builder import validation_report

    try:
        result = validation_report(
            scores, labels, out, subgroups=[s for s in subgroups.split(",") if s.strip()],
            compare=compare, model_dir=model, saliency_dir=saliency,
            positive_label=positive_label, threshold=threshold, n_bootstrap=n_bootstrap,
            seed=seed, accept_model_mismatch=accept_model_mismatch,
        )
    except MedfusionError as error:
        _fail(error)
        return
    for check in result.get("audit_failures") or []:
        console.print(f"[bold red]run audit failed:[/] {check}", soft_wrap=True)
    auroc = result["auroc"]

    def fmt(x: object) -> str:
        return f"{x:.3f}" if isinstance(x, float) else "n/a"

    console.print(
        f"{result['n']} studies: AUROC {fmt(auroc['value'])} "
        f"[{fmt(auroc['ci_low'])}, {fmt(auroc['ci_high'])}]; report written to "
        f"{Path(out) / 'report.html'} and report.json"
    )


def main(argv: Optional[list[str]] = None) -> None:  # noqa: UP045 - typer needs Optional
    """The ``medfusion`` command. An unexpected error of any command is one line naming only
    its type: its text or a traceback could quote a path, a manifest row or a study id."""
    # Compressed DICOM series are decoded across the idle cores (medfusion.io.dicom.parallel;
    # a library caller opts in, this command's __main__ is safe to re-import).
    os.environ.setdefault("MEDFUSION_DECODE_PROCESSES", "auto")
    try:
        app(args=argv)
    except Exception as error:  # noqa: BLE001 - see the docstring
        console.print(f"[red]error[/red] [INTERNAL] unexpected {type(error).__name__}; please "
                      "report it (no file names or values are shown here)")
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
