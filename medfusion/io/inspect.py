"""``medfusion inspect PATH``: what was found, PHI-free, as JSON-able dict and a rich table.

``PATH`` may be

* a file (NIfTI, or one DICOM image such as a radiograph): reported as one entry;
* a study folder (images anywhere below it, DICOM series and/or NIfTI): one study, loaded
  with :func:`medfusion.io.study.load_study`;
* a folder of study folders (e.g. a batch root): one entry per study. A folder is treated
  as one study when it holds images directly, or when all its image subfolders carry the
  same DICOM StudyInstanceUID (series split into subfolders); a folder whose only image
  subfolder is one folder is looked into. Otherwise each image subfolder is a study.

Nothing identifying is reported: studies by their pseudonymous ``key`` (a digest of the
StudyInstanceUID) and ``folder_key`` (a digest of the folder name, the same key
``medfusion score`` uses for that folder), series by ``se-``/``nii-`` keys, the input by a
``path-`` digest. In a collection, a study that fails to load becomes an entry with its
error code and message; a single study or file that fails raises the error.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfusion.errors import MedfusionError, NoImagesError
from medfusion.io.dicom import scan_dicom
from medfusion.io.notes import count_tokens
from medfusion.io.study import discover_study_files, link_loop_error, load_study
from medfusion.io.volume import load_volume
from medfusion.keys import pseudonym
from medfusion.types import Finding, Volume

__all__ = ["inspect_path", "render_inspection", "find_study_folders"]

_ROLE_OF_MODALITY = {"CT": "ct", "MR": "mr", "CR": "xray", "DX": "xray", "DR": "xray",
                     "MG": "xray"}


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (numpy scalars, tuples and mappings converted)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return str(value)


def _volume_entry(vol: Volume) -> dict[str, Any]:
    summary = vol.summary()
    summary.pop("issues", None)  # reported once, at study level, with their role
    for key in ("source", "series_key"):
        if key in vol.meta:
            summary[key] = vol.meta[key]
    return summary


def _issues(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [_jsonable(f.to_dict()) for f in findings]


def _first_study_key(files: Sequence[Path]) -> str | None:
    """The DICOM study key of the first readable image among a few files (header only)."""
    for path in files[:5]:
        try:
            scan = scan_dicom([path])
        except MedfusionError:
            continue
        if scan.series:
            return str(scan.series[0].study_key)
    return None


def find_study_folders(root: str | Path) -> tuple[str, list[Path]]:
    """``("study", [root])`` or ``("collection", [study folders...])`` (see module doc)."""
    kind, folders, _skipped = _find_study_folders(Path(root))
    return kind, folders


def _find_study_folders(folder: Path) -> tuple[str, list[Path], dict[str, int]]:
    """:func:`find_study_folders` plus the counts of what discovery skipped, by reason."""
    dicom, nifti, skipped_paths = discover_study_files(folder)
    skipped: dict[str, int] = {}
    for _path, reason in skipped_paths:
        skipped[reason] = skipped.get(reason, 0) + 1
    images = dicom + nifti
    if not images:
        raise NoImagesError(
            "no DICOM or NIfTI file under this folder; check the path (hidden files, "
            "text/CSV files and links leaving the folder are ignored)."
        )
    if any(p.parent == folder for p in images):
        return "study", [folder], skipped
    subdirs = sorted({folder / p.relative_to(folder).parts[0] for p in images})
    if len(subdirs) == 1:
        kind, folders, _inner = _find_study_folders(subdirs[0])  # a subset of this scan
        return kind, folders, skipped
    keys: set[str | None] = set()
    for sub in subdirs:
        files = [p for p in images if p.is_relative_to(sub)]
        if any(p in nifti for p in files):
            keys.add(None)  # a NIfTI folder is its own study
            keys.add(str(sub))
            continue
        keys.add(_first_study_key(sorted(files)))
    if len(keys) == 1 and None not in keys:
        return "study", [folder], skipped
    return "collection", subdirs, skipped


def _study_entry(folder: Path, notes: Sequence[str] = ()) -> dict[str, Any]:
    study = load_study(folder, notes=notes)
    entry: dict[str, Any] = {
        "key": study.key,
        "folder_key": pseudonym(folder.name, prefix="st-"),
        "roles": {role: _volume_entry(study.volumes[role]) for role in study.roles},
        "issues": _issues(study.issues),
    }
    if notes:
        # Whether each note is there and how long it is; never a word of it.
        entry["notes"] = {role: {"present": role in study.notes,
                                 "tokens": count_tokens(study.notes.get(role))}
                          for role in notes}
    return entry


def inspect_path(path: str | Path, *, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Inspect a file, a study folder or a folder of studies; return a PHI-free dict.

    Keys: ``input`` (a ``path-`` digest), ``kind`` (``file``/``study``/``collection``),
    ``n_studies``, ``n_failed``, ``skipped`` (folders only: counts of what discovery left
    out, by reason, e.g. ``SYMLINK_LOOP``) and ``studies``: a list of entries with ``key``,
    ``folder_key``, ``roles`` (role -> modality, shape, spacing, orientation, source,
    series_key) and ``issues`` (code, message, details), or ``error`` (code, message).
    With ``notes`` (text roles), each study entry also has ``notes``: role -> ``present``
    and ``tokens`` (the length of ``<role>.txt`` in words and punctuation groups, see
    :func:`medfusion.io.notes.count_tokens`); nothing of the note's content is reported.
    """
    p = Path(path)
    report: dict[str, Any] = {
        "input": pseudonym(os.path.abspath(p), prefix="path-"),
        "kind": "file",
        "n_studies": 0,
        "n_failed": 0,
        "studies": [],
    }
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise link_loop_error("the given path") from None
        raise NoImagesError("the given path does not exist; check it and try again.") from None
    if p.is_file():
        vol = load_volume(p)
        role = _ROLE_OF_MODALITY.get(vol.modality, "image")
        report["studies"] = [{
            "key": pseudonym(os.path.abspath(p), prefix="file-"),
            "folder_key": None,
            "roles": {role: _volume_entry(vol)},
            "issues": _issues([Finding(f.code, f.message, {**dict(f.details), "role": role})
                               for f in vol.issues]),
        }]
        report["n_studies"] = 1
        return _jsonable(report)
    kind, folders, skipped = _find_study_folders(p)
    report["kind"] = kind
    # What discovery left out, by reason (LINK_OUTSIDE, SYMLINK_LOOP, NOT_IMAGE...): a link
    # loop or a link leaving the folder is otherwise invisible in the table.
    report["skipped"] = dict(sorted(skipped.items()))
    for folder in folders:
        if kind == "study":
            report["studies"].append(_study_entry(folder, notes))
            continue
        try:
            report["studies"].append(_study_entry(folder, notes))
        except MedfusionError as error:
            report["n_failed"] += 1
            report["studies"].append({
                "key": None,
                "folder_key": pseudonym(folder.name, prefix="st-"),
                "roles": {},
                "issues": [],
                "error": {"code": error.code, "message": error.message},
            })
    report["n_studies"] = len(report["studies"])
    return _jsonable(report)


def _fmt_spacing(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:.4g}" for s in spacing)


def render_inspection(report: Mapping[str, Any], console: Any) -> None:
    """Print ``report`` (from :func:`inspect_path`) as a rich table on ``console``."""
    from rich import box
    from rich.table import Table

    # A light box and collapsed padding keep a typical row within 80 columns.
    table = Table(title=f"medfusion inspect: {report.get('kind')} ({report.get('input')})",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for column in ("study/series", "role", "mod.", "shape", "spacing mm", "orient", "issues"):
        table.add_column(column, overflow="fold", min_width=12 if column == "issues" else None)
    for entry in report.get("studies", []):
        name = str(entry.get("key") or entry.get("folder_key") or "?")
        if entry.get("error"):
            err = entry["error"]
            table.add_row(name, "-", "-", "-", "-", "-", f"[red]{err['code']}[/red] "
                          f"{err['message']}")
            continue
        issues = entry.get("issues", [])
        first = True
        for role, vol in entry.get("roles", {}).items():
            codes = sorted({i["code"] for i in issues
                            if i.get("details", {}).get("role") == role
                            and i["code"] != "SERIES_NOT_USED"})
            table.add_row(
                name if first else "",
                role,
                str(vol.get("modality")),
                "x".join(str(s) for s in vol.get("shape", [])),
                _fmt_spacing(vol.get("spacing", [])),
                str(vol.get("orientation")),
                ", ".join(codes),
            )
            first = False
        for role, note in (entry.get("notes") or {}).items():
            table.add_row(name if first else "", role, "note",
                          f"{note['tokens']} tokens" if note["present"] else "missing",
                          "", "", ", ".join(sorted({i["code"] for i in issues if i.get(
                              "details", {}).get("role") == role})))
            first = False
        for issue in issues:
            details = issue.get("details", {})
            if issue["code"] == "SERIES_NOT_USED":
                table.add_row(f"[dim]{details.get('key', '')}[/dim]",
                              f"[dim]{details.get('role') or '-'}[/dim]",
                              f"[dim]{details.get('modality')}[/dim]",
                              f"[dim]{details.get('n_slices')} sl.[/dim]", "",
                              f"[dim]{details.get('orientation', '')}[/dim]",
                              "[dim]not used[/dim]")
            elif "role" not in details:
                table.add_row("", "-", "", "", "", "", issue["code"])
    console.print(table)
    links = {reason: n for reason, n in (report.get("skipped") or {}).items()
             if reason in ("SYMLINK_LOOP", "LINK_OUTSIDE")}
    if links:
        console.print("skipped links: " + ", ".join(f"{n} {reason}"
                                                   for reason, n in links.items()))
    if report.get("n_failed"):
        console.print(f"[red]{report['n_failed']} of {report['n_studies']} studies failed to "
                      "load[/red] (see the issues column).")
