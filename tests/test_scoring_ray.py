"""``--engine ray`` on a local Ray instance: the same rows as the local engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_scoring_support import scoring_cohort, trained_model

from medfusion.scoring.engine import score_folder

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'medfusion[ray]'")


def test_ray_engine_rows_identical_to_local(tmp_path_factory: pytest.TempPathFactory,
                                            tmp_path: Path) -> None:
    base = tmp_path_factory.getbasetemp()
    model_dir = trained_model(base)
    cohort = scoring_cohort(base)
    local = tmp_path / "local"
    score_folder(cohort.studies_dir, model_dir, local, clinical_csv=cohort.clinical,
                 workers=0, progress=False)
    distributed = tmp_path / "ray"
    summary = score_folder(cohort.studies_dir, model_dir, distributed,
                           clinical_csv=cohort.clinical, workers=2, engine="ray",
                           progress=False)
    assert summary.exit_code == 0 and summary.n_scored == 4
    assert not ray.is_initialized()  # the local instance it started was shut down
    assert (distributed / "scores.csv").read_bytes() == (local / "scores.csv").read_bytes()
