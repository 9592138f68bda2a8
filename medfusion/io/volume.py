"""``load_volume``: one entry point for a DICOM folder, a DICOM file or a NIfTI file."""

from __future__ import annotations

from pathlib import Path

from medfusion.errors import MixedSeriesError, NoImagesError
from medfusion.io.dicom import SeriesInfo, iter_files, load_dicom_file, load_series, scan_dicom
from medfusion.io.nifti import load_nifti, sniff_format
from medfusion.types import Finding, Volume

__all__ = ["load_volume", "is_nifti"]

def is_nifti(path: Path) -> bool:
    """A NIfTI file by its magic bytes (:func:`medfusion.io.nifti.sniff_format`), not by its
    first four bytes (a DICOM preamble may start with 348) nor its extension (it may lie
    about gzip); the name decides only when the bytes say neither NIfTI nor DICOM."""
    kind = sniff_format(path)
    if kind != "unknown":
        return kind == "nifti"
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _pick(series: list[SeriesInfo], choice: int | str) -> SeriesInfo:
    if isinstance(choice, int) and not isinstance(choice, bool):
        if 0 <= choice < len(series):
            return series[choice]
        raise MixedSeriesError(
            f"series index {choice} is out of range: {len(series)} series found "
            f"(0..{len(series) - 1}). {_listing(series)}",
        )
    text = str(choice)
    by_key = [s for s in series if s.key == text]
    if by_key:
        return by_key[0]
    by_desc = [s for s in series if s.description == text]
    if len(by_desc) == 1:
        return by_desc[0]
    if len(by_desc) > 1:
        raise MixedSeriesError(
            f"{len(by_desc)} series share the description {text!r}; pick one by index or "
            f"series key. {_listing(series)}",
        )
    raise MixedSeriesError(
        f"no series matches {text!r} (by series key or SeriesDescription). {_listing(series)}",
    )


def _listing(series: list[SeriesInfo]) -> str:
    rows = [
        f"[{n}] {s.key} '{s.description}' {s.modality} {s.orientation} "
        f"{s.n_frames} image(s)"
        for n, s in enumerate(series)
    ]
    return "Series: " + "; ".join(rows)


def load_volume(
    path: str | Path, *, series: int | str | None = None, strict: bool = False
) -> Volume:
    """Load a folder of DICOM files (any nesting and names), one DICOM file, or a NIfTI file.

    ``series`` picks one series of a folder holding several: by index (the order of the
    ``MIXED_SERIES`` listing), by series key (``se-...``) or by SeriesDescription. Without it
    a folder with several series is refused (``MixedSeriesError``). Non-DICOM files in a
    folder are skipped and recorded as a ``SKIPPED_FILES`` finding. ``strict`` refuses what
    the default repairs (see ``docs/dicom.md``).
    """
    path = Path(path)
    if not path.exists():
        raise NoImagesError("the given path does not exist. Check the path and try again.")
    if path.is_file():
        if is_nifti(path):
            return load_nifti(path, strict=strict)
        return load_dicom_file(path, strict=strict)
    files = iter_files(path)
    scan = scan_dicom(files)
    if not scan.series:
        niftis = [f for f in files if f.name.lower().endswith((".nii", ".nii.gz"))]
        if len(niftis) == 1:
            return load_nifti(niftis[0], strict=strict)
        if not files:
            raise NoImagesError("the folder is empty: no files to load.")
        raise NoImagesError(
            f"no DICOM images found among {len(files)} file(s) in the folder "
            f"({_reason_counts(scan.skipped)}). Pass a folder of DICOM images or a NIfTI file.",
        )
    if series is None:
        if len(scan.series) > 1:
            raise MixedSeriesError(
                f"the folder holds {len(scan.series)} series; pass series= (index, series key "
                f"or description) to pick one. {_listing(scan.series)}",
            )
        info = scan.series[0]
    else:
        info = _pick(scan.series, series)
    volume = load_series(info, strict=strict)
    if scan.skipped:
        finding = Finding(
            "SKIPPED_FILES",
            f"{len(scan.skipped)} file(s) that are not DICOM images were skipped "
            f"({_reason_counts(scan.skipped)}).",
            {"count": len(scan.skipped), "reasons": _reason_dict(scan.skipped)},
        )
        volume = volume.replace(issues=(*volume.issues, finding))
    if len(scan.series) > 1:
        others = [s.summary() for s in scan.series if s.key != info.key]
        finding = Finding(
            "OTHER_SERIES",
            f"{len(others)} other series in the folder were not loaded.",
            {"series": [{k: o[k] for k in ("key", "modality", "description", "n_frames")}
                        for o in others]},
        )
        volume = volume.replace(issues=(*volume.issues, finding))
    return volume


def _reason_dict(skipped: list[tuple[Path, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _path, reason in skipped:
        out[reason] = out.get(reason, 0) + 1
    return out


def _reason_counts(skipped: list[tuple[Path, str]]) -> str:
    d = _reason_dict(skipped)
    return ", ".join(f"{n} {reason}" for reason, n in sorted(d.items())) or "none readable"

