"""Clinical records: a declared schema, a CSV reader and a record validator.

A schema declares each variable once (the same mapping a training recipe's ``clinical:``
section holds)::

    age:    {type: numeric, unit: years, range: [0, 120]}
    weight: {type: numeric, unit: kg, range: [1, 400], convert: {lb: 0.45359237}}
    sex:    {type: categorical, levels: [F, M]}
    smoker: {type: categorical}            # any non-empty value is a level

Rules the reader applies (and documents in docs/ingestion.md):

* **Missing is explicit**: an empty cell, ``NA``, ``N/A``, ``NaN``, ``None`` or ``null``
  (any case; :data:`MISSING_TOKENS`, the one vocabulary training, ``predict`` and
  ``score`` share) becomes ``None``; nothing is imputed here.
* **Columns must match the schema**: a schema variable absent from the file is refused
  (``CLINICAL_SCHEMA``), because scoring without it silently changes predictions. A column
  that differs from a variable only in case, spacing/underscores or a unit suffix (``Age``,
  ``age (years)``, ``crp_mg_l``) is refused even when absent variables are accepted: it is
  almost certainly the variable under another spelling. Absent variables are accepted only
  on request (``allow_missing_clinical=True``); they are then ``None`` for every row and
  reported (``CLINICAL_COLUMNS_MISSING``, also the flag callers put on each row).
* **Units**: a header may carry its unit in brackets, ``weight[lb]``. When it differs from
  the schema's ``unit`` the values are converted with the schema's ``convert`` map
  (``{unit: factor}`` or ``{unit: [factor, offset]}``: ``value * factor + offset``) or a
  small built-in table (lb/kg, in/cm/mm/m, months/days/years, mg/dL-mg/L, g/dL-g/L, degF/degC);
  an unknown conversion is refused, never guessed. The range check applies after conversion.
* **Refusals** (:class:`~medfusion.errors.ClinicalSchemaError`, code ``CLINICAL_SCHEMA``)
  name the column and the CSV line, never the offending value or the study id (either may
  be identifying). Structural problems (no id column, unreadable file, duplicate or empty
  study id, a line with the wrong number of cells) always refuse the whole file. A bad cell
  (out of range, not a number, unknown level) refuses the file by default; with
  ``bad_values="collect"`` only that row is set aside (``table.errors``), so a batch can
  fail that one study and go on.
* **Unknown columns** are ignored and reported once (``CLINICAL_UNKNOWN_COLUMNS``).
* Categorical values match the declared levels exactly, or case-insensitively (returned
  in the declared spelling). Numeric values come back as ``float``.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from medfusion.errors import ClinicalSchemaError
from medfusion.missing import MISSING_TOKENS, is_missing
from medfusion.types import Finding

__all__ = [
    "FLAG_COLUMNS_MISSING",
    "MISSING_TOKENS",
    "SCHEMA_KEYS",
    "ClinicalSchema",
    "ClinicalTable",
    "ClinicalVariable",
    "ColumnMatch",
    "is_missing",
    "match_clinical_columns",
    "read_clinical_csv",
    "validate_record",
    "validate_value",
]

#: Flag put on every prediction row made while schema variables were absent from the file
#: (accepted with ``allow_missing_clinical=True``); also the code of the table's finding.
FLAG_COLUMNS_MISSING = "CLINICAL_COLUMNS_MISSING"

_KINDS = ("numeric", "categorical")
_KEYS = {"type", "unit", "range", "levels", "convert", "description"}
#: The keys a schema entry may hold (a model card may carry others for its own use).
SCHEMA_KEYS = frozenset(_KEYS)
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


_SEE_DOCS = " See docs/ingestion.md (clinical records)."


def _schema_error(message: str) -> ClinicalSchemaError:
    return ClinicalSchemaError(message + _SEE_DOCS)


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
    """``{study_id: {variable: value}}`` plus what the read found.

    ``issues``: non-fatal findings (unknown columns, absent variables accepted as missing);
    ``absent``: schema variables the file lacks (accepted with ``allow_missing_clinical``);
    ``errors``: ``{study_id: message}`` of rows set aside for a bad cell (only with
    ``bad_values="collect"``; those studies are not in the table itself).
    """

    issues: tuple[Finding, ...] = ()
    columns: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    errors: Mapping[str, str] = MappingProxyType({})


def validate_value(var: ClinicalVariable, raw: Any, where: str,
                   conversion: tuple[float, float] | None = None) -> Any:
    """One validated value (None when missing; numbers as float, converted to the schema's
    unit with ``conversion``; levels in their declared spelling). ``where`` locates the cell
    in messages (line and column), which never quote the value itself."""
    if is_missing(raw):
        return None
    if var.type == "numeric":
        if isinstance(raw, bool):
            raise _schema_error(f"{where}: `{var.name}` must be a number, got a boolean.")
        try:
            number = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            raise _schema_error(
                f"{where}: `{var.name}` is not a number; expected a number (decimal point "
                "'.'), or an empty / NA cell when unknown."
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


# -- matching a file's columns to the schema ---------------------------------------------

_TRAILING_UNIT = re.compile(r"\s*[\[(][^\[\]()]*[\])]\s*$")


def _loose(name: str) -> str:
    """A name reduced to lower-case letters and digits, without a trailing ``[unit]`` or
    ``(unit)``: two spellings of one variable (``Age``, ``age (years)``) meet here."""
    return "".join(ch for ch in _TRAILING_UNIT.sub("", name).lower() if ch.isalnum())


def _unit_spellings(var: ClinicalVariable) -> set[str]:
    """Loose spellings of the units ``var`` could be given in (its own and those it converts
    from): only these count as a unit suffix (``age_years``), so that ``sex_m`` is not
    mistaken for ``sex`` in metres."""
    if var.unit is None:
        return set()
    own = _norm_unit(var.unit)
    units = {own, *(_norm_unit(u) for u in var.convert)}
    units |= {a for a, b in _BUILTIN_CONVERSIONS if b == own}
    units |= {alias for alias, unit in _UNIT_ALIASES.items() if unit in units}
    return {_loose(u) for u in units} - {""}


def _spelled_like(column: str, var: ClinicalVariable) -> bool:
    key, target = _loose(column), _loose(var.name)
    if not target:
        return False
    if key == target:
        return True
    return key.startswith(target) and key[len(target):] in _unit_spellings(var)


def _refuse_renamed(sch: ClinicalSchema, absent: Sequence[str], unknown: Sequence[str],
                    source: str) -> None:
    """Refuse when an unknown column is another spelling of an absent variable."""
    renamed = [(col, name) for name in absent for col in unknown
               if _spelled_like(col, sch.variables[name])]
    if not renamed:
        return
    pairs = ", ".join(f"`{col}` for `{name}`" for col, name in renamed)
    col, name = renamed[0]
    unit = sch.variables[name].unit
    raise _schema_error(
        f"{source} spells clinical variable(s) differently from the model's schema: "
        f"{pairs}. Names must match exactly, case included, or the values would be "
        f"dropped: rename the column(s) (`{col}` to `{name}`"
        + (f", or `{name}[{unit}]` to state the unit" if unit else "")
        + ")."
    )


@dataclass(frozen=True)
class ColumnMatch:
    """How a file's header maps onto a schema (see :func:`match_clinical_columns`)."""

    plan: Mapping[int, tuple[ClinicalVariable, tuple[float, float] | None]]
    unknown: tuple[str, ...]
    absent: tuple[str, ...]

    def findings(self) -> tuple[Finding, ...]:
        out = []
        if self.unknown:
            out.append(Finding(
                "CLINICAL_UNKNOWN_COLUMNS",
                "columns not in the clinical schema were ignored.",
                {"columns": list(self.unknown)},
            ))
        if self.absent:
            out.append(Finding(
                FLAG_COLUMNS_MISSING,
                "schema variables absent from the file were accepted as missing for every "
                "study.",
                {"columns": list(self.absent)},
            ))
        return tuple(out)


def match_clinical_columns(
    header: Sequence[str],
    schema: Mapping[str, Any] | ClinicalSchema,
    *,
    skip: Collection[str] = (),
    allow_missing: bool = False,
    source: str = "the clinical CSV",
) -> ColumnMatch:
    """Match ``header`` (stripped column names) to the schema's variables.

    ``header[i]`` is a variable's name, optionally with its unit in brackets
    (``weight[lb]``). Columns named in ``skip`` (ids, labels, image paths) are not clinical.
    Raises :class:`~medfusion.errors.ClinicalSchemaError` when a variable is given twice, in
    a unit that cannot be converted, under another spelling of its name (``Age`` for
    ``age``: refused even with ``allow_missing``, since the values are there but would be
    dropped), or not at all unless ``allow_missing``.
    """
    sch = ClinicalSchema.from_dict(schema)
    plan: dict[int, tuple[ClinicalVariable, tuple[float, float] | None]] = {}
    unknown: list[str] = []
    found: set[str] = set()
    for idx, col in enumerate(header):
        if col in skip:
            continue
        match = _HEADER_UNIT.match(col)
        name, unit = (match["name"], match["unit"]) if match else (col, None)
        var = sch.variables.get(name)
        if var is None:
            unknown.append(col)
            continue
        if name in found:
            raise _schema_error(f"{source} gives `{name}` in two columns.")
        found.add(name)
        plan[idx] = (var, var.conversion_from(unit) if unit else None)
    absent = [name for name in sch.columns if name not in found]
    _refuse_renamed(sch, absent, unknown, source)
    if absent and not allow_missing:
        listed = ", ".join(f"`{name}`" for name in absent)
        raise _schema_error(
            f"{source} lacks clinical variable(s) the model's schema needs: {listed}; "
            "scoring without them would change the predictions. Add the column(s) (an empty "
            "cell means missing), or accept them as missing for every study with "
            "--allow-missing-clinical (Python: allow_missing_clinical=True): each row is "
            f"then flagged {FLAG_COLUMNS_MISSING}."
        )
    return ColumnMatch(plan=plan, unknown=tuple(unknown), absent=tuple(absent))


def validate_record(record: Mapping[str, Any] | None,
                    schema: Mapping[str, Any] | ClinicalSchema) -> dict[str, Any]:
    """Validate one record against ``schema``; return ``{variable: value or None}`` for every
    schema variable (a variable the record lacks is missing; keys outside the schema are
    dropped, unless one is another spelling of an absent variable, ``Age`` for ``age``,
    which is refused). Raises ClinicalSchemaError."""
    sch = ClinicalSchema.from_dict(schema)
    if record is None:
        record = {}
    if not isinstance(record, Mapping):
        raise _schema_error("a clinical record must be a mapping of variable names to values.")
    absent = [name for name in sch.columns if name not in record]
    unknown = [str(k) for k in record if k not in sch.variables]
    _refuse_renamed(sch, absent, unknown, "the clinical record")
    return {
        name: validate_value(var, record.get(name), "clinical record")
        for name, var in sch.variables.items()
    }


def read_clinical_csv(
    path: str | Path,
    schema: Mapping[str, Any] | ClinicalSchema | None = None,
    *,
    id_column: str = "study_id",
    allow_missing_clinical: bool = False,
    bad_values: Literal["raise", "collect"] = "raise",
) -> ClinicalTable:
    """Read a clinical CSV into ``{study_id: {variable: value}}`` (a :class:`ClinicalTable`).

    With a ``schema`` only its variables are kept, validated and converted (see the module
    docstring); its columns must all be present unless ``allow_missing_clinical`` (then
    ``table.absent`` lists those missing for every row). Without a schema, every column is
    kept as stripped text, missing tokens as None. ``bad_values="collect"`` sets a row with
    a bad cell aside in ``table.errors`` instead of refusing the file.
    Raises :class:`~medfusion.errors.ClinicalSchemaError` with the column and line number.
    """
    if bad_values not in ("raise", "collect"):
        raise ValueError("bad_values must be 'raise' or 'collect'")
    sch = None if schema is None else ClinicalSchema.from_dict(schema)
    p = Path(path)
    try:
        fh = p.open("r", encoding="utf-8-sig", newline="")
    except OSError:
        raise _schema_error(
            "the clinical CSV does not exist or cannot be read; check the path."
        ) from None
    table = ClinicalTable()
    errors: dict[str, str] = {}
    matched: ColumnMatch | None = None
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
            if sch is not None:
                matched = match_clinical_columns(header, sch, skip=(id_column,),
                                                 allow_missing=allow_missing_clinical)
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
                if sid in table or sid in errors:
                    raise _schema_error(
                        f"line {line} of the clinical CSV repeats a `{id_column}` of an "
                        "earlier line; keep one row per study."
                    )
                record: dict[str, Any] = {}
                if matched is None:
                    for idx, raw in enumerate(cells):
                        if idx != id_idx:
                            text = raw.strip()
                            record[header[idx]] = None if is_missing(text) else text
                    table[sid] = record
                    continue
                problems: list[ClinicalSchemaError] = []
                bad_columns: list[str] = []
                for idx, (var, conversion) in matched.plan.items():
                    where = f"line {line}, column `{header[idx]}`"
                    try:
                        record[var.name] = validate_value(var, cells[idx], where, conversion)
                    except ClinicalSchemaError as error:
                        if bad_values == "raise":
                            raise
                        problems.append(error)
                        bad_columns.append(header[idx])
                if problems:
                    # One message per study: the first cell's reason, the other columns named.
                    message = problems[0].message.removesuffix(_SEE_DOCS)
                    if len(bad_columns) > 1:
                        others = ", ".join(f"`{c}`" for c in bad_columns[1:])
                        message += f" Also invalid in this row: {others}."
                    errors[sid] = message + _SEE_DOCS
                    continue
                for name in matched.absent:
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
    if sch is not None and matched is not None:
        table.issues = matched.findings()
        table.columns = sch.columns
        table.absent = matched.absent
    else:
        table.columns = tuple(h for i, h in enumerate(header) if i != id_idx)
    table.errors = MappingProxyType(errors)
    return table
