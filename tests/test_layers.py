"""Every import in medfusion/ looks down the layer table (docs/architecture.md), and
medfusion modules are imported lazily only in the entry points and package ``__init__``s."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfusion.testing.layers import (
    ALLOWED,
    Import,
    counts,
    imports_of,
    layer_of,
    package_imports,
    violations,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return package_imports(ROOT)


def test_no_import_breaks_the_layer_table(imports: list[Import]) -> None:
    assert len(imports) > 100  # the walker found the package's imports at all
    problems = violations(imports)
    assert problems == [], "\n".join(problems)
    assert counts(imports)["function_local"] == 0 and counts(imports)["upward"] == 0


def test_models_import_nothing_above_them(imports: list[Import]) -> None:
    above = {"training", "inference", "uncertainty", "explain", "scoring", "report"}
    bad = [i for i in imports if i.importer_layer == "models" and i.target_layer in above]
    assert bad == []


def test_report_reads_files_and_imports_the_ground_floor_only(imports: list[Import]) -> None:
    assert {i.target_layer for i in imports if i.importer_layer == "report"} <= {
        "ground", "report"}
    assert ALLOWED["report"] == frozenset({"ground"})


def test_the_walker_sees_hidden_and_lazy_imports(tmp_path: Path) -> None:
    """The checker itself must fail on what it is there to catch."""
    pkg = tmp_path / "medfusion"
    (pkg / "models").mkdir(parents=True)
    (pkg / "training").mkdir()
    for init in (pkg / "__init__.py", pkg / "models" / "__init__.py",
                 pkg / "training" / "__init__.py", pkg / "training" / "trainer.py"):
        init.write_text("_EXPORTS = {}\n" if init == pkg / "__init__.py" else "")
    module = pkg / "models" / "bad.py"
    module.write_text(
        "import importlib\n"
        "from medfusion.errors import MedfusionError\n"
        "def f():\n"
        "    from medfusion.training import trainer\n"
        "    return importlib.import_module('medfusion.scoring.engine')\n"
        "from ..training.trainer import x\n"
    )
    found = imports_of(module, tmp_path, {"medfusion.training.trainer"}, {})
    targets = {(i.target, i.local) for i in found}
    assert ("medfusion.training.trainer", True) in targets
    assert ("medfusion.scoring.engine", True) in targets
    assert ("medfusion.training.trainer", False) in targets
    assert ("medfusion.errors", False) in targets
    problems = violations(found)
    assert sum("inside a function" in p for p in problems) == 2
    assert sum("(models) imports" in p for p in problems) == 3
    assert layer_of("medfusion.cli") == "entry" and layer_of("medfusion.errors") == "ground"
