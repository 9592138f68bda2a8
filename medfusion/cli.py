"""The ``medfusion`` command: a thin typer/rich shell over the Python API.

Each command parses arguments, calls one API function and renders its result. No logic of
its own lives here; errors with a stable code are shown as one clean line (exit 1).
"""

from __future__ import annotations

import json
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
)
console = Console(stderr=True)


def _fail(error: MedfusionError) -> None:
    console.print(f"[red]error[/red] {error}")
    raise typer.Exit(code=1)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A study folder, a DICOM series folder or file, or NIfTI."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what was found (studies, series, modality, shape, spacing, issues), PHI-free."""
    from medfusion.io.inspect import inspect_path, render_inspection

    try:
        report = inspect_path(path)
    except MedfusionError as error:
        _fail(error)
        return
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
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a fusion model from a recipe and a manifest into a model package."""
    from medfusion.training.trainer import train as train_model

    try:
        path = train_model(recipe, manifest, out, seed=seed, progress=not quiet)
    except MedfusionError as error:
        _fail(error)
        return
    card = json.loads((path / "model.json").read_text(encoding="utf-8"))
    metrics = {split: {k: v for k, v in m.items() if k in ("n", "auroc", "accuracy")}
               for split, m in card.get("metrics", {}).items()}
    console.print(f"model written to {path}  metrics: {json.dumps(metrics)}")


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
) -> None:
    """Score every study of a manifest: study_id, predicted, prob_<label>, weight_<role>."""
    from medfusion.models.fusion_model import predict_manifest

    try:
        path = predict_manifest(model_dir, manifest, out, explain=explain,
                                saliency_dir=saliency_dir, alpha=alpha)
    except MedfusionError as error:
        _fail(error)
        return
    console.print(f"predictions written to {path}")


def main(argv: Optional[list[str]] = None) -> None:  # noqa: UP045 - typer needs Optional
    app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()
