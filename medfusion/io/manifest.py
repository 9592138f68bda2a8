"""Manifest CSV reading: one validated row per study.

A manifest has one row per study: ``study_id`` (unique), ``label`` (a label name), optional
``patient_id`` and ``split`` (train / val / test), one column per imaging role holding a
path relative to the manifest (empty = that modality is missing), and the clinical columns.
Error messages name the CSV line and column, never a value that could identify a patient.

Clinical cells are read by :mod:`medfusion.io.clinical` (its missing-value vocabulary, unit
headers such as ``weight[lb]``, ranges and levels), so training, ``predict`` and ``score``
agree on what a cell means. Training adds split assignment on top
(``medfusion.training.manifest``); prediction reads manifests with this module directly.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion.errors import ClinicalSchemaError, ManifestError
from medfusion.io.clinical import ClinicalSchema, match_clinical_columns, validate_value
from medfusion.io.notes import NOTE_SUFFIX

SPLITS = ("train", "val", "test")
_RESERVED = ("study_id", "label", "patient_id", "split")


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row. ``line`` is the 1-based CSV line (for messages).

    ``clinical_error`` (prediction only): why this row's clinical cells are invalid (line and
    column, never the value); the study is then not scored. ``clinical_absent``: recipe
    clinical columns the manifest lacks, accepted as missing on request.
    """

    line: int
    study_id: str
    label: int | None
    patient_id: str
    split: str | None
    paths: dict[str, Path | None]
    clinical: dict[str, Any] | None
    clinical_error: str | None = None
    clinical_absent: tuple[str, ...] = ()
    #: text role -> the note: inline text (str), a ``.txt`` file (Path) or None (missing).
    #: Read a file with ``medfusion.io.notes.read_note``; never log either.
    notes: dict[str, str | Path | None] = field(default_factory=dict, repr=False)


def manifest_error(message: str) -> ManifestError:
    """A MANIFEST error whose message points at the manifest contract."""
    return ManifestError(message + " See docs/training.md for the manifest contract.")


def _existing(base: Path, cell: str, message: str, *, is_file: bool) -> Path:
    """A manifest path cell resolved against the manifest's folder; ``MANIFEST`` error
    (``message`` + where paths are relative to) when nothing (no file) is there."""
    target = Path(cell)
    target = target if target.is_absolute() else base / target
    if not (target.is_file() if is_file else target.exists()):
        raise manifest_error(f"{message} (paths are relative to the manifest's folder).")
    return target


def read_manifest_rows(path: str | Path, *, roles: Sequence[str], labels: Sequence[str],
                       clinical: Mapping[str, Mapping[str, Any]] | None,
                       require_labels: bool = True, require_columns: bool = True,
                       allow_missing_clinical: bool = False,
                       bad_clinical: str = "raise",
                       text_roles: Sequence[str] = ()) -> list[ManifestRow]:
    """Read and validate ``path`` for a model or recipe with imaging ``roles``, class
    ``labels`` and the ``clinical`` schema (None: no clinical columns are read).

    Raises :class:`ManifestError` (code ``MANIFEST``) on: a missing file or column, a
    duplicate or empty study_id, a label outside ``labels``, a bad split value, an
    image path that does not exist (paths are resolved relative to the manifest's folder),
    or an invalid clinical cell (not a number, out of range, unknown level). With
    ``require_columns=False`` (prediction), absent role columns mean "modality missing for
    every study"; an absent clinical column is refused (``CLINICAL_SCHEMA``) unless
    ``allow_missing_clinical`` (then each row lists it in ``clinical_absent``). A clinical
    column spelled differently from the schema (``Age`` for ``age``) is always refused
    (``CLINICAL_SCHEMA``). ``bad_clinical="row"`` (prediction) records an invalid clinical
    cell in that row's ``clinical_error`` instead of refusing the file.

    ``text_roles`` columns hold a note: the text itself, or (a cell ending in ``.txt``
    without a line break) the path of a UTF-8 note file relative to the manifest, which
    must exist; empty = missing. Notes are not read or checked here (a bad note file fails
    its own row later, ``medfusion.io.notes``) and never appear in a message.
    """
    if bad_clinical not in ("raise", "row"):
        raise ValueError("bad_clinical must be 'raise' or 'row'")
    schema = dict(clinical or {})
    path = Path(path)
    if not path.is_file():
        raise manifest_error("Manifest CSV not found: pass the path of a CSV file.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            columns = [c.strip() for c in next(reader, [])]
            # (CSV line, cells); blank lines are skipped but still counted.
            raw_rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise manifest_error(
            f"Manifest could not be read as a UTF-8 CSV ({type(exc).__name__}).") from None
    required = ["study_id"] + (["label"] if require_labels else [])
    if require_columns:
        required += [*roles, *text_roles]
    missing = [c for c in required if c not in columns]
    match = None
    if schema:
        # A re-spelled clinical column is refused before anything else; a plain absent one
        # joins the other missing columns for training, and needs the opt-in to predict.
        match = match_clinical_columns(
            columns, ClinicalSchema.from_dict(schema),
            skip=(*_RESERVED, *roles, *text_roles),
            allow_missing=allow_missing_clinical or require_columns, source="the manifest",
        )
        if require_columns:
            missing += list(match.absent)
    if missing:
        raise manifest_error(
            f"Manifest lacks column(s) {missing}; it needs study_id, label, one column per "
            "imaging role of the recipe and every clinical column of the recipe.")
    if not raw_rows:
        raise manifest_error("Manifest has no rows.")
    base = path.resolve().parent
    label_index = {name: i for i, name in enumerate(labels)}
    seen: set[str] = set()
    rows: list[ManifestRow] = []
    for line, cells in raw_rows:
        raw = dict(zip(columns, cells, strict=False))
        study_id = (raw.get("study_id") or "").strip()
        if not study_id:
            raise manifest_error(f"Line {line}: empty study_id.")
        if study_id in seen:
            raise manifest_error(f"Line {line}: duplicate study_id; every study_id must be unique.")
        seen.add(study_id)
        label: int | None = None
        label_raw = (raw.get("label") or "").strip()
        if require_labels or label_raw:
            if label_raw not in label_index:
                raise manifest_error(f"Line {line}: label is not one of the recipe labels "
                                     f"{list(labels)}.")
            label = label_index[label_raw]
        split_raw = (raw.get("split") or "").strip().lower()
        if split_raw and split_raw not in SPLITS:
            raise manifest_error(f"Line {line}: split must be one of {list(SPLITS)} or empty.")
        patient = (raw.get("patient_id") or "").strip() or f"study:{study_id}"
        paths: dict[str, Path | None] = {}
        for role in roles:
            cell = (raw.get(role) or "").strip()
            if not cell:
                paths[role] = None
                continue
            paths[role] = _existing(base, cell, f"Line {line}, column `{role}`: the path does "
                                    "not exist", is_file=False)
        notes: dict[str, str | Path | None] = {}
        for role in text_roles:
            cell = raw.get(role) or ""
            if not cell.strip():
                notes[role] = None
            elif _names_note_file(cell):
                notes[role] = _existing(
                    base, cell.strip(), f"Line {line}, column `{role}`: the cell names a "
                    f"{NOTE_SUFFIX} note file that does not exist", is_file=True)
            else:
                notes[role] = cell
        clinical_row: dict[str, Any] | None = None
        clinical_error: str | None = None
        if match is not None:
            clinical_row = dict.fromkeys(schema)
            for idx, (var, conversion) in match.plan.items():
                cell = cells[idx] if idx < len(cells) else None
                try:
                    clinical_row[var.name] = validate_value(
                        var, cell, f"Line {line}, column `{columns[idx]}`", conversion)
                except ClinicalSchemaError as exc:
                    if bad_clinical == "raise":
                        # Training data must be clean: the whole manifest is refused.
                        raise manifest_error(exc.message.split(" See docs/")[0]) from None
                    clinical_error = clinical_error or exc.message
        rows.append(ManifestRow(line, study_id, label, patient, split_raw or None, paths,
                                clinical_row, clinical_error,
                                match.absent if match is not None else (), notes))
    return rows


def _names_note_file(cell: str) -> bool:
    """A note cell that names a file: one line ending in ``.txt`` (any case)."""
    text = cell.strip()
    return "\n" not in text and "\r" not in text and text.lower().endswith(NOTE_SUFFIX)
