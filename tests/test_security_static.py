"""F2: a static check that no code path deserialises untrusted data unsafely."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("medfusion", "pipelines") for p in (ROOT / d).rglob("*.py"))

FORBIDDEN = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcPickle\b|\bdill\b|\bjoblib\.load\("), "pickle-based loader"),
    (re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"\byaml\.unsafe_load\("), "yaml.unsafe_load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
]


def test_there_is_code_to_check() -> None:
    assert len(SOURCES) > 5


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for pattern, what in FORBIDDEN:
        assert not pattern.search(text), f"{what} in {path.relative_to(ROOT)}"
    for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
        assert "weights_only=True" in match.group(1), f"unsafe torch.load in {path}"


def test_checker_catches_a_planted_violation(tmp_path: Path) -> None:
    bad = "import pickle\nobj = pickle.load(open('x', 'rb'))\nimport yaml\nyaml.load(s)\n"
    hits = [what for pattern, what in FORBIDDEN if pattern.search(bad)]
    assert "pickle.load" in hits and "yaml.load without SafeLoader" in hits
