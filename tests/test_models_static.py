"""F2: a static check that no shipped code can deserialise executable payloads.

Parses every module of the package and of pipelines/ and refuses calls that can run code
from a file: ``torch.load`` without ``weights_only=True``, ``pickle``/``dill``/``joblib``
loads, ``np.load(allow_pickle=True)``, ``yaml.load``/``yaml.unsafe_load``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

_UNSAFE_MODULE_LOADS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, description) of every unsafe deserialisation call in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr = node.func.attr
        owner = node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        if (owner_name, attr) in _UNSAFE_MODULE_LOADS:
            found.append((node.lineno, f"{owner_name}.{attr}"))
        elif owner_name == "torch" and attr == "load":
            if not _is_true(_kw(node, "weights_only")):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif owner_name in ("np", "numpy") and attr == "load":
            if _kw(node, "allow_pickle") is not None and not (
                isinstance(_kw(node, "allow_pickle"), ast.Constant)
                and _kw(node, "allow_pickle").value is False
            ):
                found.append((node.lineno, "np.load with allow_pickle"))
    return found


def test_the_checker_catches_unsafe_calls() -> None:
    bad = (
        "import pickle, torch, numpy as np, yaml\n"
        "pickle.load(f)\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\n"
        "yaml.load(s)\n"
    )
    assert [line for line, _ in unsafe_calls(bad)] == [2, 3, 4, 5, 6]
    good = "torch.load(p, weights_only=True)\nnp.load(p)\nyaml.safe_load(s)\npickle.dumps(x)\n"
    assert unsafe_calls(good) == []


def test_no_shipped_module_deserialises_executable_payloads() -> None:
    roots = [REPO_ROOT / "medfusion", REPO_ROOT / "pipelines"]
    problems = []
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            try:
                source = path.read_text(encoding="utf-8")
                calls = unsafe_calls(source)
            except (SyntaxError, UnicodeDecodeError):
                continue  # a half-written file of a colleague; ruff reports it
            problems += [f"{path.relative_to(REPO_ROOT)}:{line}: {what}" for line, what in calls]
    assert problems == []
