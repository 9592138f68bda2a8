"""E5/E6: the same inputs, model and seed give byte-identical scores.csv whatever the
number of worker processes (0 = in-process, 1, 2), and the same failure rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_scoring_support import copy_studies, scoring_cohort, trained_model

from medfusion.scoring.engine import score_folder
from medfusion.testing import dicom_factory


def test_worker_count_never_changes_the_bytes(tmp_path_factory: pytest.TempPathFactory,
                                              tmp_path: Path) -> None:
    base = tmp_path_factory.getbasetemp()
    model_dir = trained_model(base)
    cohort = scoring_cohort(base)
    root = copy_studies(cohort, tmp_path / "studies")
    shutil.copytree(root / "study-002", root / "broken")
    for dcm in (root / "broken" / "ct").iterdir():
        dicom_factory.truncate_file(dcm)
    outputs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"out-{workers}"
        summary = score_folder(root, model_dir, out, clinical_csv=cohort.clinical,
                               workers=workers, progress=False)
        assert (summary.n_scored, summary.n_failed, summary.exit_code) == (4, 1, 2)
        outputs[workers] = ((out / "scores.csv").read_bytes(),
                            (out / "failures.csv").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
