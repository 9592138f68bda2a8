"""The input domain a model was trained on, and the check that flags studies outside it.

The feature-shift score (:mod:`medfusion.uncertainty.shift`) looks at what the encoders make
of an input. It cannot see what preprocessing hides: a 360 mm radiograph and a 36 mm one
look alike once both are resized to a 64x64 grid, and a single CT slice stretched to a
24-slice grid is just a smooth volume. So the package also records, per imaging role, the
range of plain acquisition quantities over the training split, measured on the volume as
loaded (before preprocessing):

=============  ========================================================================
``extent_mm``  the physical size of the field of view, largest to smallest axis (mm)
``spacing_mm`` the voxel size, smallest to largest axis (mm)
``slices``     the number of slices (the volume's third array axis)
``p01``        1st / 50th / 99th intensity percentiles, in the scanner's units
``p50``        (HU for CT)
``p99``
=============  ========================================================================

and, for every numeric clinical variable, the range of its training values. A study whose
quantity lies outside the training range widened by a stated tolerance is flagged
``INPUT_OUT_OF_RANGE:<role>:<quantity>`` (``<role>`` is ``clinical`` for a clinical
variable, then the variable's name); a flagged study abstains. The tolerances are stored
in the card with the ranges, so the check a package makes never depends on the version of
this module that reads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfusion.types import Volume

__all__ = [
    "DOMAIN_FORMAT",
    "FLAG_INPUT_RANGE",
    "InputDomain",
    "QuantityRange",
    "volume_quantities",
]

#: The flag prefix of a study outside the training domain (one flag per quantity).
FLAG_INPUT_RANGE = "INPUT_OUT_OF_RANGE"
#: Version of the card section this module writes and reads.
DOMAIN_FORMAT = 1

#: Geometric quantities are compared by ratio: the allowed range is [lo / f, hi * f].
_RATIO_TOLERANCE = {"extent_mm": 1.5, "spacing_mm": 2.0, "slices": 2.0}
#: Intensities and clinical values by margin: [lo - m, hi + m], m = share * (hi - lo) +
#: floor * max(|lo|, |hi|, 1) (the floor keeps a constant training value from pinning the
#: range to a point).
_INTENSITY_MARGIN = (0.5, 0.1)
_CLINICAL_MARGIN = (0.25, 0.05)
# Percentiles are estimated on about this many voxels at most (a lattice, so deterministic).
_MAX_SAMPLES = 1_000_000


def volume_quantities(volume: Volume) -> dict[str, float]:
    """The acquisition quantities of one volume as loaded (see the module docstring)."""
    shape = volume.spatial_shape
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    extent = np.sort(spacing * np.asarray(shape, dtype=np.float64))[::-1]
    out: dict[str, float] = {}
    for i, value in enumerate(extent):
        out[f"extent_mm_{i}"] = float(value)
    for i, value in enumerate(np.sort(spacing)):
        out[f"spacing_mm_{i}"] = float(value)
    out["slices"] = float(shape[2])
    array = np.asarray(volume.array)
    # Subsampled on a lattice of voxel indices (every s-th voxel along each axis longer than
    # one), so the samples are the same voxels whatever the memory layout; they are then
    # gathered in memory order. (A C-order stride over a Fortran-ordered 512x512x200 DICOM
    # stack jumps a megabyte per sample: 110-135 ms of a study's preparation.)
    ratio = array.size / _MAX_SAMPLES
    if ratio > 1:
        long_axes = sum(1 for n in array.shape if n > 1)
        s = math.ceil(ratio ** (1.0 / max(1, long_axes)))
        array = array[tuple(slice(None, None, s) if n > 1 else slice(None)
                            for n in array.shape)]
    flat = array.ravel(order="K")
    finite = flat[np.isfinite(flat)]
    if finite.size:
        p01, p50, p99 = np.percentile(finite.astype(np.float64), [1.0, 50.0, 99.0])
        out.update(p01=float(p01), p50=float(p50), p99=float(p99))
    return out


def _family(quantity: str) -> str:
    """``extent_mm_0`` -> ``extent_mm``: the tolerance family of a quantity."""
    for family in _RATIO_TOLERANCE:
        if quantity == family or quantity.startswith(family + "_"):
            return family
    return quantity


@dataclass(frozen=True)
class QuantityRange:
    """The training range of one quantity and the allowed range derived from it."""

    observed: tuple[float, float]
    allowed: tuple[float, float]

    def contains(self, value: float) -> bool:
        return math.isfinite(value) and self.allowed[0] <= value <= self.allowed[1]

    def to_dict(self) -> dict[str, list[float]]:
        return {"observed": list(self.observed), "allowed": list(self.allowed)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> QuantityRange:
        lo, hi = (float(x) for x in data["observed"])
        a_lo, a_hi = (float(x) for x in data["allowed"])
        return cls((lo, hi), (a_lo, a_hi))

    @classmethod
    def fit(cls, values: Iterable[float], *, ratio: float | None = None,
            margin: tuple[float, float] = _INTENSITY_MARGIN) -> QuantityRange | None:
        data = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not data:
            return None
        lo, hi = min(data), max(data)
        if ratio is not None and lo > 0:
            allowed = (lo / ratio, hi * ratio)
        else:
            m = margin[0] * (hi - lo) + margin[1] * max(abs(lo), abs(hi), 1.0)
            allowed = (lo - m, hi + m)
        return cls((lo, hi), allowed)


@dataclass(frozen=True)
class InputDomain:
    """Per-role and clinical training ranges; :meth:`check_volume` / :meth:`check_clinical`
    name the quantities of a study that fall outside them."""

    roles: Mapping[str, Mapping[str, QuantityRange]] = field(default_factory=dict)
    clinical: Mapping[str, QuantityRange] = field(default_factory=dict)
    n_studies: int = 0

    # -- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, role_quantities: Mapping[str, Sequence[Mapping[str, float]]],
            clinical_rows: Sequence[Mapping[str, Any]] = (),
            numeric_columns: Sequence[str] = ()) -> InputDomain:
        """Ranges over the training studies: ``role_quantities[role]`` holds the
        :func:`volume_quantities` of every training study that has the role;
        ``clinical_rows`` the training records (numeric values as numbers, None missing)."""
        roles: dict[str, dict[str, QuantityRange]] = {}
        for role, rows in role_quantities.items():
            names = sorted({q for row in rows for q in row})
            ranges: dict[str, QuantityRange] = {}
            for name in names:
                fitted = QuantityRange.fit(
                    (row[name] for row in rows if name in row),
                    ratio=_RATIO_TOLERANCE.get(_family(name)),
                    margin=_INTENSITY_MARGIN,
                )
                if fitted is not None:
                    ranges[name] = fitted
            if ranges:
                roles[role] = ranges
        clinical: dict[str, QuantityRange] = {}
        for column in numeric_columns:
            values = []
            for record in clinical_rows:
                value = record.get(column)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values.append(float(value))
            fitted = QuantityRange.fit(values, margin=_CLINICAL_MARGIN)
            if fitted is not None:
                clinical[column] = fitted
        n = max((len(rows) for rows in role_quantities.values()), default=0)
        return cls(roles=roles, clinical=clinical, n_studies=max(n, len(clinical_rows)))

    # -- checking ------------------------------------------------------------------------
    def check_quantities(self, role: str, quantities: Mapping[str, float]) -> list[str]:
        """Names of the quantities of ``role`` outside the allowed range (sorted)."""
        ranges = self.roles.get(role)
        if not ranges:
            return []
        out = {_family(name) for name, rng in ranges.items()
               if name in quantities and not rng.contains(quantities[name])}
        return sorted(out)

    def check_volume(self, role: str, volume: Volume) -> list[str]:
        """Flags for one loaded volume of ``role`` (empty when within the domain)."""
        if role not in self.roles:
            return []
        return [f"{FLAG_INPUT_RANGE}:{role}:{q}"
                for q in self.check_quantities(role, volume_quantities(volume))]

    def check_clinical(self, record: Mapping[str, Any] | None) -> list[str]:
        """Flags for a clinical record's numeric values outside the training range."""
        if not record:
            return []
        flags = []
        for column, rng in sorted(self.clinical.items()):
            value = record.get(column)
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and not rng.contains(float(value)):
                flags.append(f"{FLAG_INPUT_RANGE}:clinical:{column}")
        return flags

    # -- the card ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DOMAIN_FORMAT,
            "n_studies": self.n_studies,
            "tolerance": {"ratio": dict(_RATIO_TOLERANCE),
                          "intensity_margin": list(_INTENSITY_MARGIN),
                          "clinical_margin": list(_CLINICAL_MARGIN)},
            "roles": {role: {q: r.to_dict() for q, r in ranges.items()}
                      for role, ranges in self.roles.items()},
            "clinical": {c: r.to_dict() for c, r in self.clinical.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputDomain:
        fmt = int(data.get("format", 0))
        if fmt != DOMAIN_FORMAT:
            raise ValueError(f"input_domain format {fmt} is not {DOMAIN_FORMAT}")
        return cls(
            roles={role: {q: QuantityRange.from_dict(r) for q, r in ranges.items()}
                   for role, ranges in data.get("roles", {}).items()},
            clinical={c: QuantityRange.from_dict(r)
                      for c, r in data.get("clinical", {}).items()},
            n_studies=int(data.get("n_studies", 0)),
        )


def is_input_range_flag(flag: str) -> bool:
    return flag.startswith(FLAG_INPUT_RANGE + ":")
