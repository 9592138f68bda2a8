"""Clinical records: a declared schema, a CSV reader and a record validator (case E8).

A schema declares each variable once (the same mapping a training recipe's ``clinical:``
section holds)::

    age:    {type: numeric, unit: years, range: [0, 120]}
    weight: {type: numeric, unit: kg, range: [1, 400], convert: {lb: 0.45359237}}
    sex:    {type: categorical, levels: [F, M]}
    smoker: {type: categorical}            # any non-empty value is a level

Rules the reader applies (and documents in docs/ingestion.md):

* **Missing is explicit**: an empty cell, ``NA``, ``N/A``, ``NaN`` or ``null`` (any case)
  becomes ``None``; nothing is imputed here. A schema variable absent from the file is
  missing for every row and reported (``CLINICAL_COLUMN_MISSING``).
* **Units**: a header may carry its unit in brackets, ``weight[lb]``. When it differs from
  the schema's ``unit`` the values are converted with the schema's ``convert`` map
  (``{unit: factor}`` or ``{unit: [factor, offset]}``: ``value * factor + offset``) or a
  small built-in table (lb/kg, in/cm/mm/m, months/days/years, mg/dL-mg/L, g/dL-g/L, degF/degC);
  an unknown conversion is refused, never guessed. The range check applies after conversion.
* **Refusals** (:class:`~medfusion.errors.ClinicalSchemaError`, code ``CLINICAL_SCHEMA``)
  name the column and the CSV line, never the offending value or the study id (either may
  be identifying): out of range, not a number, unknown level, duplicate or empty study id.
* **Unknown columns** are ignored and reported once (``CLINICAL_UNKNOWN_COLUMNS``).
* Categorical values match the declared levels exactly, or case-insensitively (returned
  in the declared spelling). Numeric values come back as ``float``.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion.errors import ClinicalSchemaError
from medfusion.types import Finding

__all__ = [
    "MISSING_TOKENS",
    "ClinicalSchema",
    "ClinicalTable",
    "ClinicalVariable",
    "read_clinical_csv",
    "validate_record",
]

#: Cell texts read as a missing value (compared case-insensitively, after stripping).
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null"})

_KINDS = ("numeric", "categorical")
_KEYS = {"type", "unit", "range", "levels", "convert", "description"}
_HEADER_UNIT = re.compile(r"^\s*(?P<name>[^\[\]]+?)\s*\[(?P<unit>[^\[\]]+)\]\s*$")

# (from unit, to unit) -> (factor, offset); value_to = value_from * factor + offset.
_BUILTIN_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("lb", "kg"): (0.45359237, 0.0),
    ("kg", "lb"): (1 / 0.45359237, 0.0),
    ("in", "cm"): (2.54, 0.0),
    ("cm", "in"): (1 / 2.54, 0.0),
    ("mm", "cm"): (0.1, 0.0),
    ("cm", "mm"): (10.0, 0.0),
    ("cm", "m"): (0.01, 0.0),
    ("m", "cm"): (100.0, 0.0),
    ("months", "years"): (1 / 12, 0.0),
    ("years", "months"): (12.0, 0.0),
    ("days", "years"): (1 / 365.25, 0.0),
    ("mg/dl", "mg/l"): (10.0, 0.0),
    ("mg/l", "mg/dl"): (0.1, 0.0),
    ("g/dl", "g/l"): (10.0, 0.0),
    ("g/l", "g/dl"): (0.1, 0.0),
    ("degf", "degc"): (5 / 9, -160 / 9),
    ("degc", "degf"): (9 / 5, 32.0),
}
_UNIT_ALIASES = {
    "year": "years", "yr": "years", "yrs": "years", "y": "years",
    "month": "months", "mo": "months", "day": "days", "d": "days",
    "lbs": "lb", "pound": "lb", "pounds": "lb", "kilogram": "kg", "kgs": "kg",
    "inch": "in", "inches": "in", "f": "degf", "°f": "degf", "c": "degc", "°c": "degc",
}


def _norm_unit(unit: str) -> str:
    u = unit.strip().lower().replace(" ", "")
    return _UNIT_ALIASES.get(u, u)


def _schema_error(message: str) -> ClinicalSchemaError:
    return ClinicalSchemaError(message + " See docs/ingestion.md (clinical records).")


@dataclass(frozen=True)
class ClinicalVariable:
    """One declared clinical variable."""

    name: str
    type: str
    unit: str | None = None
    range: tuple[float, float] | None = None
    levels: tuple[str, ...] | None = None
    convert: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.unit is not None:
            out["unit"] = self.unit
        if self.range is not None:
            out["range"] = [self.range[0], self.range[1]]
        if self.levels is not None:
            out["levels"] = list(self.levels)
        if self.convert:
            out["convert"] = {u: [f, o] if o else f for u, (f, o) in self.convert.items()}
        if self.description is not None:
            out["description"] = self.description
        return out

    def conversion_from(self, unit: str) -> tuple[float, float] | None:
        """(factor, offset) turning values in ``unit`` into this variable's unit; None when
        no conversion is needed; raises when one is needed but unknown."""
        if self.unit is None or _norm_unit(unit) == _norm_unit(self.unit):
            return None
        for declared, pair in self.convert.items():
            if _norm_unit(declared) == _norm_unit(unit):
                return pair
        pair = _BUILTIN_CONVERSIONS.get((_norm_unit(unit), _norm_unit(self.unit)))
        if pair is None:
            raise _schema_error(
                f"column `{self.name}` is given in [{unit}] but the schema expects "
                f"[{self.unit}] and knows no conversion; add `convert: {{{unit}: <factor>}}` "
                "to the schema or convert the column."
            )
        return pair


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _schema_error(f"{what} must be a number.")
    out = float(value)
    if not math.isfinite(out):
        raise _schema_error(f"{what} must be finite.")
    return out


def _variable_from_dict(name: str, spec: Any) -> ClinicalVariable:
    if not isinstance(name, str) or not name.strip():
        raise _schema_error(f"clinical variable names must be non-empty strings, got {name!r}.")
    if isinstance(spec, str):
        spec = {"type": spec}
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise _schema_error(f"`{name}` must be a mapping such as {{type: numeric}}.")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise _schema_error(
            f"`{name}` has unknown key(s) {unknown}; allowed: {sorted(_KEYS)}."
        )
    kind = spec.get("type", "numeric")
    if kind not in _KINDS:
        raise _schema_error(f"`{name}.type` must be numeric or categorical, got {kind!r}.")
    unit = spec.get("unit")
    if unit is not None and (not isinstance(unit, str) or not unit.strip()):
        raise _schema_error(f"`{name}.unit` must be a non-empty string.")
    rng: tuple[float, float] | None = None
    if spec.get("range") is not None:
        raw = spec["range"]
        if not isinstance(raw, (list, tuple)) or len(raw) != 2:
            raise _schema_error(f"`{name}.range` must be [low, high].")
        lo, hi = _number(raw[0], f"`{name}.range` low"), _number(raw[1], f"`{name}.range` high")
        if lo > hi:
            raise _schema_error(f"`{name}.range` low must not exceed high.")
        rng = (lo, hi)
    levels: tuple[str, ...] | None = None
    if spec.get("levels") is not None:
        raw = spec["levels"]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise _schema_error(f"`{name}.levels` must be a non-empty list.")
        levels = tuple(str(v).strip() for v in raw)
        if len(set(levels)) != len(levels) or any(not v for v in levels):
            raise _schema_error(f"`{name}.levels` must be distinct, non-empty values.")
    convert: dict[str, tuple[float, float]] = {}
    if spec.get("convert") is not None:
        raw = spec["convert"]
        if not isinstance(raw, Mapping):
            raise _schema_error(
                f"`{name}.convert` must map a unit to a factor or [factor, offset]."
            )
        for src, pair in raw.items():
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                f, o = _number(pair[0], f"`{name}.convert.{src}`"), _number(pair[1], "offset")
            else:
                f, o = _number(pair, f"`{name}.convert.{src}`"), 0.0
            convert[str(src)] = (f, o)
    if kind == "numeric" and levels is not None:
        raise _schema_error(f"`{name}` is numeric: `levels` belong to categorical variables.")
    if kind == "categorical" and (rng is not None or unit is not None or convert):
        raise _schema_error(f"`{name}` is categorical: unit/range/convert belong to numeric ones.")
    if convert and unit is None:
        raise _schema_error(f"`{name}.convert` needs the target `unit`.")
    description = spec.get("description")
    return ClinicalVariable(
        name=name,
        type=kind,
        unit=unit,
        range=rng,
        levels=levels,
        convert=convert,
        description=None if description is None else str(description),
    )


@dataclass(frozen=True)
class ClinicalSchema:
    """Declared clinical variables, in column order."""

    variables: Mapping[str, ClinicalVariable]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ClinicalSchema) -> ClinicalSchema:
        """Build from ``{name: {type, unit, range, levels, convert, description}}``; a bare
        type string (``age: numeric``) is accepted. Raises ClinicalSchemaError."""
        if isinstance(data, ClinicalSchema):
            return data
        if not isinstance(data, Mapping) or not data:
            raise _schema_error("a clinical schema must be a non-empty mapping of variables.")
        return cls({str(k): _variable_from_dict(k, v) for k, v in data.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: var.to_dict() for name, var in self.variables.items()}

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.variables)


class ClinicalTable(dict):  # type: ignore[type-arg]
    """``{study_id: {variable: value}}`` plus the non-fatal findings of the read."""

    issues: tuple[Finding, ...] = ()
    columns: tuple[str, ...] = ()


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TOKENS


def _value(var: ClinicalVariable, raw: Any, where: str,
           conversion: tuple[float, float] | None = None) -> Any:
    """One validated value (None when missing). ``where`` locates it without the value."""
    if _is_missing(raw):
        return None
    if var.type == "numeric":
        if isinstance(raw, bool):
            raise _schema_error(f"{where}: `{var.name}` must be a number, got a boolean.")
        try:
            number = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            raise _schema_error(
                f"{where}: `{var.name}` is not a number. Write a plain number "
                f"(decimal point '.'), or leave the cell empty / NA when unknown."
            ) from None
        if not math.isfinite(number):
            raise _schema_error(f"{where}: `{var.name}` is infinite; leave it empty if unknown.")
        if conversion is not None:
            number = number * conversion[0] + conversion[1]
        if var.range is not None and not var.range[0] <= number <= var.range[1]:
            unit = f" {var.unit}" if var.unit else ""
            raise _schema_error(
                f"{where}: `{var.name}` is outside its plausible range "
                f"[{var.range[0]:g}, {var.range[1]:g}]{unit}. Check the value and its unit "
                "(declare the column's unit in its header, e.g. `weight[lb]`)."
            )
        return number
    text = str(raw).strip()
    if var.levels is None:
        return text
    if text in var.levels:
        return text
    folded = {level.lower(): level for level in var.levels}
    if text.lower() in folded:
        return folded[text.lower()]
    raise _schema_error(
        f"{where}: `{var.name}` has a value that is not one of its levels "
        f"{list(var.levels)}. Recode it, or add the level to the schema."
    )


def validate_record(record: Mapping[str, Any] | None,
                    schema: Mapping[str, Any] | ClinicalSchema) -> dict[str, Any]:
    """Validate one record against ``schema``; return ``{variable: value or None}`` for every
    schema variable (keys outside the schema are dropped). Raises ClinicalSchemaError."""
    sch = ClinicalSchema.from_dict(schema)
    if record is None:
        record = {}
    if not isinstance(record, Mapping):
        raise _schema_error("a clinical record must be a mapping of variable names to values.")
    return {
        name: _value(var, record.get(name), "clinical record")
        for name, var in sch.variables.items()
    }


def read_clinical_csv(
    path: str | Path,
    schema: Mapping[str, Any] | ClinicalSchema | None = None,
    *,
    id_column: str = "study_id",
) -> ClinicalTable:
    """Read a clinical CSV into ``{study_id: {variable: value}}`` (a :class:`ClinicalTable`).

    With a ``schema`` only its variables are kept, validated and converted (see the module
    docstring). Without one, every column is kept as stripped text, missing tokens as None.
    Raises :class:`~medfusion.errors.ClinicalSchemaError` with the column and line number.
    """
    sch = None if schema is None else ClinicalSchema.from_dict(schema)
    p = Path(path)
    try:
        fh = p.open("r", encoding="utf-8-sig", newline="")
    except OSError:
        raise _schema_error(
            "the clinical CSV does not exist or cannot be read; check the path."
        ) from None
    issues: list[Finding] = []
    table = ClinicalTable()
    with fh:
        try:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise _schema_error("the clinical CSV is empty; it needs a header row.")
            header = [h.strip() for h in header]
            if id_column not in header:
                raise _schema_error(
                    f"the clinical CSV has no `{id_column}` column (comma-separated, header in "
                    "the first line)."
                )
            if len(set(header)) != len(header):
                raise _schema_error("the clinical CSV repeats a column name in its header.")
            id_idx = header.index(id_column)
            # column index -> (variable, conversion)
            plan: dict[int, tuple[ClinicalVariable | None, tuple[float, float] | None]] = {}
            unknown: list[str] = []
            found: set[str] = set()
            for idx, col in enumerate(header):
                if idx == id_idx:
                    continue
                match = _HEADER_UNIT.match(col)
                name, unit = (match["name"], match["unit"]) if match else (col, None)
                if sch is None:
                    plan[idx] = (None, None)
                    continue
                var = sch.variables.get(name)
                if var is None:
                    unknown.append(col)
                    continue
                if name in found:
                    raise _schema_error(f"the clinical CSV gives `{name}` in two columns.")
                found.add(name)
                plan[idx] = (var, var.conversion_from(unit) if unit else None)
            if unknown:
                issues.append(Finding(
                    "CLINICAL_UNKNOWN_COLUMNS",
                    "columns not in the clinical schema were ignored.",
                    {"columns": unknown},
                ))
            absent = [] if sch is None else [c for c in sch.columns if c not in found]
            if absent:
                issues.append(Finding(
                    "CLINICAL_COLUMN_MISSING",
                    "schema variables absent from the CSV are missing for every study.",
                    {"columns": absent},
                ))
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue  # blank line
                if len(cells) != len(header):
                    raise _schema_error(
                        f"line {line} of the clinical CSV has {len(cells)} cells, the header "
                        f"has {len(header)}. Quote values that contain commas."
                    )
                sid = cells[id_idx].strip()
                if not sid:
                    raise _schema_error(f"line {line} of the clinical CSV has an empty "
                                        f"`{id_column}`.")
                if sid in table:
                    raise _schema_error(
                        f"line {line} of the clinical CSV repeats a `{id_column}` of an "
                        "earlier line; keep one row per study."
                    )
                record: dict[str, Any] = {}
                for idx, (var, conversion) in plan.items():
                    if var is None:
                        raw = cells[idx].strip()
                        record[header[idx]] = None if _is_missing(raw) else raw
                    else:
                        where = f"line {line}, column `{header[idx]}`"
                        record[var.name] = _value(var, cells[idx], where, conversion)
                for name in absent:
                    record[name] = None
                table[sid] = record
        except csv.Error as exc:
            raise _schema_error(
                f"the clinical CSV is malformed near line {getattr(reader, 'line_num', '?')} "
                f"({exc.__class__.__name__}); check its quoting."
            ) from None
        except UnicodeDecodeError:
            raise _schema_error(
                "the clinical CSV is not UTF-8 text; save it as UTF-8 CSV."
            ) from None
    table.issues = tuple(issues)
    table.columns = sch.columns if sch is not None else tuple(
        h for i, h in enumerate(header) if i != id_idx
    )
    return table
