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
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        tmp.replace(target)  # atomic: never a half-written file
    except OSError as exc:
        raise OutputError(
            f"cannot write to the output folder ({type(exc).__name__}); choose a writable "
            "--out folder."
        ) from exc
    console.print(f"{report['n_studies']} sample studies inspected; wrote {target}")
    return 0 if not report["n_failed"] else 2
