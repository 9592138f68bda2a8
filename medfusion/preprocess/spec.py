"""RoleSpec: how one imaging role is prepared for a model (a JSON-round-trippable dataclass)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from medfusion.errors import RecipeError

NORMALIZATIONS = ("ct", "mr", "xray", "none", "auto")
FITS = ("resize", "crop_pad")
CHANNEL_RULES = ("refuse", "first")

#: ``normalization="auto"``: DICOM Modality value -> preset.
MODALITY_PRESET: Mapping[str, str] = {
    "CT": "ct",
    "MR": "mr",
    "CR": "xray",
    "DX": "xray",
    "DR": "xray",
    "MG": "xray",
    "RG": "xray",
    "PX": "xray",
    "IO": "xray",
}
#: ``auto`` fallback when the modality is unknown (e.g. a NIfTI): the role name decides.
ROLE_PRESET: Mapping[str, str] = {"ct": "ct", "mr": "mr", "xray": "xray"}


@dataclass(frozen=True)
class RoleSpec:
    """Model-input preparation for one imaging role.

    * ``grid``: the model input shape (I, J, K); an X-ray role uses depth 1, e.g. (128, 128, 1).
    * ``spacing``: target voxel size in mm for ``fit="crop_pad"`` (None = keep the canonical
      volume's own spacing). Ignored by ``fit="resize"``, which always maps the whole field
      of view onto the grid (the resulting spacing is recorded in the history).
    * ``normalization``: ``"ct"`` (HU window ``ct_window`` -> [0, 1]), ``"mr"`` (robust
      z-score), ``"xray"`` (percentiles -> [0, 1]), ``"none"``, or ``"auto"`` (from the
      volume's modality: CT -> ct, MR -> mr, CR/DX/DR/MG -> xray; an unknown modality falls
      back on the role name given to ``prepare_volume``).
    * ``ct_window``: (lo, hi) HU mapped to [0, 1] (air -1000 -> 0 with the default).
    * ``fit``: ``"resize"`` the whole field of view to the grid, or ``"crop_pad"`` around the
      centre at ``spacing``.
    * ``channel_rule``: 4D input (time points / phases): ``"refuse"`` (error ``NOT_3D``) or
      ``"first"`` (use the first volume, recorded in the history).
    """

    grid: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    normalization: str = "auto"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    fit: str = "resize"
    channel_rule: str = "refuse"

    def __post_init__(self) -> None:
        grid = _int_triple(self.grid, "grid")
        object.__setattr__(self, "grid", grid)
        if self.spacing is not None:
            spacing = _float_tuple(self.spacing, 3, "spacing")
            if any(s <= 0 for s in spacing):
                raise RecipeError(f"RoleSpec spacing must be positive mm, got {list(spacing)}.")
            object.__setattr__(self, "spacing", spacing)
        window = _float_tuple(self.ct_window, 2, "ct_window")
        if not window[0] < window[1]:
            raise RecipeError(
                f"RoleSpec ct_window must be (lo, hi) with lo < hi in HU, got {list(window)}."
            )
        object.__setattr__(self, "ct_window", window)
        _choice(self.normalization, NORMALIZATIONS, "normalization")
        _choice(self.fit, FITS, "fit")
        _choice(self.channel_rule, CHANNEL_RULES, "channel_rule")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["spacing"] = None if self.spacing is None else list(self.spacing)
        d["ct_window"] = list(self.ct_window)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoleSpec:
        """Inverse of :meth:`to_dict`; unknown keys are refused (a typo must not pass)."""
        if not isinstance(data, Mapping):
            raise RecipeError("A RoleSpec must be a mapping (JSON object).")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(
                f"Unknown RoleSpec keys {unknown}; allowed: {sorted(known)}."
            )
        if "grid" not in data:
            raise RecipeError("A RoleSpec needs 'grid' (the model input shape, e.g. [64,64,64]).")
        return cls(**dict(data))


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise RecipeError(f"RoleSpec {name} must be one of {list(allowed)}, got {value!r}.")


def _float_tuple(value: Any, n: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RecipeError(f"RoleSpec {name} must be {n} numbers, got {value!r}.") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise RecipeError(f"RoleSpec {name} must be {n} finite numbers, got {value!r}.")
    return out


def _int_triple(value: Any, name: str) -> tuple[int, int, int]:
    try:
        items = list(value)
    except TypeError:
        raise RecipeError(f"RoleSpec {name} must be 3 positive integers, got {value!r}.") from None
    if len(items) != 3 or not all(
        (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1)
        or (isinstance(v, float) and v.is_integer() and v >= 1)
        for v in items
    ):
        raise RecipeError(f"RoleSpec {name} must be 3 positive integers, got {value!r}.")
    return int(items[0]), int(items[1]), int(items[2])
