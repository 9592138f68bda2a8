"""``medfusion demo``: the main job on the bundled samples in ``data_samples/``.

For now: inspect every sample study (load each CT series, MR NIfTI and radiograph with the
exact-geometry loaders), print the table and write ``OUT/inspection.json``. Later issues
extend it to scoring and a report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from medfusion.atomic import write_text
from medfusion.errors import NoImagesError, OutputError
from medfusion.io.inspect import inspect_path, render_inspection

REPO_ROOT = Path(__file__).resolve().parents[1]


def samples_dir() -> Path:
    """The bundled samples (``$MEDFUSION_SAMPLES`` overrides ``<repo>/data_samples``)."""
    env = os.environ.get("MEDFUSION_SAMPLES")
    path = Path(env) if env else REPO_ROOT / "data_samples"
    if not (path / "studies").is_dir():
        raise NoImagesError(
            "the bundled samples were not found; run `python pipelines/make_samples.py` from "
            "the repository root, or set MEDFUSION_SAMPLES to a samples folder."
        )
    return path


def run_demo(out: Path, *, console: Console | None = None) -> int:
    """Inspect the sample studies, print the table, write ``out/inspection.json``; 0 = ok."""
    console = console or Console()
    report = inspect_path(samples_dir() / "studies")
    render_inspection(report, console)
    try:
        out.mkdir(parents=True, exist_ok=True)
        target = out / "inspection.json"
        write_text(target, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(
            f"cannot write to the output folder ({type(exc).__name__}); choose a writable "
            "--out folder."
        ) from exc
    console.print(f"{report['n_studies']} sample studies inspected; wrote {target}")
    code = 0 if not report["n_failed"] else 2
    return max(code, _score_samples(out, console))


def _score_samples(out: Path, console: Console) -> int:
    """Score the samples with the bundled demo model into ``out/scores`` (with saliency),
    then build the validation report into ``out/report`` when the report module exists.
    Returns the scoring exit code (0 all scored, 2 some failed); 0 without a demo model."""
    import shutil

    from medfusion.scoring.engine import score_folder

    samples = samples_dir()
    model = samples / "demo_model"
    if not (model / "model.json").exists():
        console.print("no demo model in the samples folder; scoring skipped")
        return 0
    scores = out / "scores"
    if (scores / "journal.jsonl").exists():  # an earlier demo run's outputs: start afresh
        shutil.rmtree(scores)
    summary = score_folder(samples / "studies", model, scores,
                           clinical_csv=samples / "clinical.csv", workers=1, explain=True,
                           progress=False, command_line=["demo"])
    console.print(f"scored {summary.n_scored} of {summary.n_studies} sample studies "
                  f"({summary.n_failed} failed); wrote {scores / 'scores.csv'}")
    try:
        from medfusion.report.builder import validation_report
    except ImportError:
        return summary.exit_code
    if summary.n_scored and (samples / "labels.csv").exists():
        validation_report(scores / "scores.csv", samples / "labels.csv", out / "report",
                          model_dir=model, n_bootstrap=200)
        console.print(f"validation report: {out / 'report' / 'report.html'}")
    return summary.exit_code
