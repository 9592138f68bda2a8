"""Helpers for writing test inputs (DICOM fixtures made by code, never real patient data)."""

from medfusion.testing.dicom_factory import (
    SENTINELS,
    series_affine,
    truncate_file,
    write_enhanced_multiframe,
    write_huge_header,
    write_non_dicom_files,
    write_radiograph,
    write_series,
)

__all__ = [
    "SENTINELS",
    "series_affine",
    "truncate_file",
    "write_enhanced_multiframe",
    "write_huge_header",
    "write_non_dicom_files",
    "write_radiograph",
    "write_series",
]
