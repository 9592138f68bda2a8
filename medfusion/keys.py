"""Pseudonymous keys: the only identifiers medfusion ever prints or writes.

A key is a keyed digest (HMAC-SHA256) of a source identifier (a StudyInstanceUID, a folder
name, a file path). Set ``MEDFUSION_KEY_SECRET`` to a site secret so keys cannot be reversed
by hashing guessed UIDs; the default secret keeps keys stable across runs on one install.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

_DEFAULT_SECRET = b"medfusion-pseudonym-v1"


def _secret() -> bytes:
    env = os.environ.get("MEDFUSION_KEY_SECRET")
    return env.encode("utf-8") if env else _DEFAULT_SECRET


def pseudonym(value: str, *, prefix: str = "", length: int = 12) -> str:
    """A stable, non-reversible short key for ``value`` (e.g. ``s-3fa9c2...``)."""
    digest = hmac.new(_secret(), value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]
    return f"{prefix}{digest}"


_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_component(name: str, *, prefix: str = "k-") -> str:
    """``name`` if it is a harmless single path component, else its pseudonym: output
    folders named after a study never hold a path separator, a dot-dot or a long name."""
    if _SAFE_COMPONENT.match(name) and name not in {".", ".."}:
        return name
    return pseudonym(name, prefix=prefix)
