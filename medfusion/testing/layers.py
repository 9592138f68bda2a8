"""The package's layers and a static check that every import looks down.

Every module under ``medfusion/`` is parsed with :mod:`ast` (nothing is imported, so the
check runs in milliseconds and sees function-local imports as well as module-level ones,
plus ``importlib.import_module("medfusion....")`` calls with a literal name). Each import of
a medfusion module is classified by the floor of the importing and the imported module; the
table is documented in docs/architecture.md and enforced by ``tests/test_layers.py``.

This module imports nothing of medfusion, so any layer may be checked with it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "medfusion"

#: the layer (a name used in messages) of each sub-package; top-level modules are "ground"
#: except the entry points below.
SUBPACKAGE_LAYER = {
    "io": "io",
    "preprocess": "preprocess",
    "models": "models",
    "uncertainty": "uncertainty",
    "explain": "explain",
    "inference": "inference",
    "training": "training",
    "scoring": "scoring",
    "report": "report",
    "testing": "testing",
}
#: top-level modules that start the program: they may import anything, also lazily
ENTRY_MODULES = {"medfusion.cli": "entry", "medfusion.demo": "entry"}

#: layer -> the other layers it may import ("ground" = top-level modules such as errors)
ALLOWED: dict[str, frozenset[str]] = {
    "ground": frozenset(),
    "io": frozenset({"ground"}),
    "preprocess": frozenset({"ground"}),
    "models": frozenset({"ground", "preprocess"}),
    "uncertainty": frozenset({"ground", "models"}),
    "explain": frozenset({"ground", "preprocess", "models"}),
    "inference": frozenset({"ground", "io", "preprocess", "models", "uncertainty", "explain"}),
    "training": frozenset({"ground", "io", "preprocess", "models", "uncertainty", "explain",
                           "inference"}),
    "scoring": frozenset({"ground", "io", "preprocess", "models", "uncertainty", "explain",
                          "inference"}),
    "report": frozenset({"ground"}),
    # test fixtures build inputs with the real readers and writers; nothing imports them
    "testing": frozenset({"ground", "io", "preprocess", "models", "uncertainty", "explain",
                          "inference", "training", "scoring", "report"}),
    "entry": frozenset(SUBPACKAGE_LAYER.values()) | {"ground", "entry"},
}
#: floor numbers, for counting "upward" imports (higher imports lower)
FLOOR = {"ground": 0, "io": 1, "preprocess": 1, "models": 2, "uncertainty": 3, "explain": 3,
         "inference": 4, "training": 5, "scoring": 5, "report": 5, "testing": 6, "entry": 6}
#: where a function-local import of a medfusion module is allowed (lazy start-up), besides
#: package ``__init__`` files
LAZY_IMPORT_OK = ("medfusion.cli", "medfusion.demo")


@dataclass(frozen=True)
class Import:
    """One import of a medfusion module found in the source."""

    importer: str  # dotted module name of the file
    target: str  # dotted module name imported (best resolution without importing)
    line: int
    local: bool  # inside a function (or class body) rather than at module level
    init: bool = False  # the importing file is a package's ``__init__.py``

    @property
    def importer_layer(self) -> str:
        return layer_of(self.importer)

    @property
    def target_layer(self) -> str:
        return layer_of(self.target)


def module_name(path: Path, root: Path) -> str:
    """``root/medfusion/io/study.py`` -> ``medfusion.io.study`` (``__init__`` -> package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of a dotted medfusion module name."""
    if module in ENTRY_MODULES:
        return ENTRY_MODULES[module]
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in SUBPACKAGE_LAYER:
        return SUBPACKAGE_LAYER[parts[1]]
    return "ground"


def _exports(init: Path) -> dict[str, str]:
    """The lazy ``_EXPORTS`` of the top-level ``__init__`` (name -> module)."""
    tree = ast.parse(init.read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS"
                                                 for t in node.targets)):
            value = ast.literal_eval(node.value)
            return {k: v.split(":")[0] for k, v in value.items()}
    return {}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it sits inside a function or class body."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, local = stack.pop()
        yield node, local
        inner = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef
                                    | ast.Lambda | ast.ClassDef)
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def imports_of(path: Path, root: Path, modules: set[str], exports: dict[str, str]
               ) -> list[Import]:
    """The medfusion imports of one file."""
    importer = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    seen: set[tuple[int, str]] = set()

    def add(target: str, node: ast.AST, local: bool) -> None:
        key = (id(node), target)  # ``from m import a, b`` is one import of m
        if (target == PACKAGE or target.startswith(PACKAGE + ".")) and key not in seen:
            seen.add(key)
            found.append(Import(importer, target, getattr(node, "lineno", 0), local,
                                is_package))

    for node, local in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, local)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, importer, is_package)
            if base is None:
                continue
            for alias in node.names:
                # ``from medfusion.x import y``: y may be a module or a name of x
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    add(sub, node, local)
                elif base == PACKAGE and alias.name in exports:
                    add(exports[alias.name], node, local)  # a lazy export hides a module
                else:
                    add(base, node, local)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name)
                       and node.func.id in ("import_module", "__import__")))):
            add(node.args[0].value, node, local)
    return found


def package_imports(root: Path) -> list[Import]:
    """Every medfusion import of every module under ``root/medfusion``."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    exports = _exports(root / PACKAGE / "__init__.py")
    out: list[Import] = []
    for path in files:
        out.extend(imports_of(path, root, modules, exports))
    return out


def violations(imports: list[Import]) -> list[str]:
    """Every import that breaks the layer table or the lazy-import rule, as a message."""
    problems = []
    for imp in imports:
        src, dst = imp.importer_layer, imp.target_layer
        where = f"{imp.importer}:{imp.line}"
        if src != dst and dst not in ALLOWED[src]:
            problems.append(f"{where} ({src}) imports {imp.target} ({dst})")
        elif dst == "testing" and src != "testing":
            problems.append(f"{where} imports the test fixtures {imp.target}")
        if imp.local and not _lazy_ok(imp):
            problems.append(f"{where} imports {imp.target} inside a function")
    return problems


def _lazy_ok(imp: Import) -> bool:
    """Entry points and package ``__init__`` files may defer imports (start-up time)."""
    return imp.importer in LAZY_IMPORT_OK or imp.init


def counts(imports: list[Import]) -> dict[str, int]:
    """Function-local medfusion imports outside the entry points, and upward imports
    (to a higher floor, or between layers the table keeps apart)."""
    local = sum(1 for i in imports if i.local and not _lazy_ok(i))
    upward = sum(1 for i in imports if i.importer_layer != i.target_layer
                 and i.target_layer not in ALLOWED[i.importer_layer])
    return {"imports": len(imports), "function_local": local, "upward": upward}
