"""The one missing-value vocabulary for clinical cells.

The clinical CSV reader, the manifest reader and the model's clinical preprocessing all ask
:func:`is_missing`, so a cell means the same thing whichever path reads it."""

from __future__ import annotations

import math
from typing import Any

#: Cell texts read as a missing value (compared case-insensitively, after stripping).
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "none", "null"})


def is_missing(value: Any) -> bool:
    """True for None, NaN and the :data:`MISSING_TOKENS` texts (any case, any spacing)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TOKENS
