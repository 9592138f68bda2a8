"""docs/ingestion.md documents every error and finding code raised in medfusion/io."""

from __future__ import annotations

import re
from pathlib import Path

import medfusion.errors as errors

REPO = Path(__file__).resolve().parents[1]


def _codes_in_io() -> set[str]:
    codes: set[str] = set()
    for path in sorted((REPO / "medfusion" / "io").rglob("*.py")):
        text = path.read_text()
        codes |= set(re.findall(r'code="([A-Z0-9_]+)"', text))
        codes |= set(re.findall(r'Finding\(\s*"([A-Z0-9_]+)"', text))
        for name in re.findall(r"\b(\w+Error)\(", text):
            klass = getattr(errors, name, None)
            if isinstance(klass, type) and issubclass(klass, errors.MedfusionError):
                codes.add(klass.code)
    return codes


def test_every_io_code_is_documented() -> None:
    doc = (REPO / "docs" / "ingestion.md").read_text()
    codes = _codes_in_io()
    assert {"TRUNCATED", "NOT_NIFTI", "SERIES_NOT_USED", "CLINICAL_SCHEMA"} <= codes
    missing = sorted(c for c in codes if f"`{c}`" not in doc)
    assert missing == [], f"add these codes to docs/ingestion.md: {missing}"


def test_index_links_the_ingestion_page() -> None:
    assert "(ingestion.md)" in (REPO / "docs" / "index.md").read_text()
