"""Pseudonymous keys for the readers (defined on the ground floor, :mod:`medfusion.keys`,
so that every layer, the report included, derives the same keys)."""

from __future__ import annotations

from medfusion.keys import pseudonym

__all__ = ["pseudonym"]
