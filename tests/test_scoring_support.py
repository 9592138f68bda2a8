"""Shared material for the batch-scoring tests (no tests here).

A REAL tiny FusionModel (CT + MR + clinical, 16^3 grids, 2 epochs) is trained once per
session on a synthetic NIfTI cohort, and a small scoring cohort (CT DICOM series with
sentinel identifiers in the headers, MR NIfTI, a radiograph the model does not use) is
written once; tests copy the studies and plant their faults in the copy.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medfusion.testing import dicom_factory
from medfusion.testing.synthetic import write_cohort

RECIPE = {
    "labels": ["normal", "abnormal"],
    "modalities": {"ct": {"grid": [16, 16, 16]}, "mr": {"grid": [16, 16, 16]}},
    "clinical": {"age": {"type": "numeric"}, "sex": {"type": "categorical"}},
    "fusion": "attention",
    "epochs": 2,
    "batch_size": 8,
}
N_STUDIES = 4

#: Every identifier planted anywhere in the test inputs (headers, file and folder names).
SENTINEL_STRINGS = sorted(
    {
        *dicom_factory.SENTINELS.values(),
        dicom_factory.SENTINEL_FREE_TEXT,
        dicom_factory.SENTINEL_PRIVATE,
        dicom_factory.SENTINEL_FILE_STEM,
        "ZZTEST",
    }
)


def trained_model(base: Path) -> Path:
    """The session's tiny model package (trained on first use, then reused)."""
    from medfusion.training.trainer import train

    model = base / "scoring-model"
    if not (model / "model.json").exists():
        cohort = write_cohort(base / "scoring-train", 12, seed=1, roles=("ct", "mr"),
                              formats={"ct": "nifti", "mr": "nifti"})
        train(RECIPE, cohort.manifest, model, seed=0, progress=False,
              cache_dir=base / "scoring-cache")
    return model


@dataclass(frozen=True)
class Cohort:
    root: Path

    @property
    def studies_dir(self) -> Path:
        return self.root / "studies"

    @property
    def clinical(self) -> Path:
        return self.root / "clinical.csv"


def scoring_cohort(base: Path) -> Cohort:
    """The session's scoring cohort (default formats: DICOM CT series with sentinels)."""
    root = base / "scoring-cohort"
    marker = root / "done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_cohort(root, N_STUDIES, seed=5)
        marker.write_text("ok")
    return Cohort(root)


def copy_studies(cohort: Cohort, dest: Path) -> Path:
    """A private copy of the cohort's studies folder to plant faults in."""
    shutil.copytree(cohort.studies_dir, dest, symlinks=True)
    return dest


def all_output_text(out: Path) -> str:
    """Every byte the run wrote under ``out`` (gzip members decompressed), as text."""
    chunks = []
    for dirpath, _dirs, files in os.walk(out):
        for name in files:
            path = Path(dirpath) / name
            data = path.read_bytes()
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            chunks.append(name)
            chunks.append(data.decode("latin-1"))
    return "\n".join(chunks)


def assert_no_sentinel(text: str) -> None:
    for value in SENTINEL_STRINGS:
        assert value not in text, "a planted identifier leaked into the outputs"
