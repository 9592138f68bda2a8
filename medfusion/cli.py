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


def main(argv: Optional[list[str]] = None) -> None:  # noqa: UP045 - typer needs Optional
    app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()
