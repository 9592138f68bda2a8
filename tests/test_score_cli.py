"""``medfusion score`` as a user runs it: a real process, worker processes, exit codes,
clean stdout/stderr, and a hard kill (SIGKILL) mid-run followed by ``--resume`` (E2)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_scoring_support import (
    all_output_text,
    assert_no_sentinel,
    copy_studies,
    scoring_cohort,
    trained_model,
)

from medfusion.scoring.engine import score_folder
from medfusion.testing import dicom_factory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - support.Cohort
    return scoring_cohort(tmp_path_factory.getbasetemp())


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "medfusion.cli", "score", *map(str, args), "--no-progress"]


def test_exit_codes_and_streams_free_of_identifiers(cohort, model_dir: Path,  # noqa: ANN001
                                                    tmp_path: Path) -> None:
    root = copy_studies(cohort, tmp_path / "studies")
    shutil.copytree(root / "study-001", root / "broken")
    for dcm in (root / "broken" / "ct").iterdir():
        dicom_factory.truncate_file(dcm)
    out = tmp_path / "out"
    done = subprocess.run(_cli(root, "--model", model_dir, "--out", out, "--clinical",
                               cohort.clinical, "--workers", "2"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "scored 4/5 studies" in done.stderr and "1 failed" in done.stderr
    assert "broken,load," in (out / "failures.csv").read_text()
    assert_no_sentinel(done.stdout + done.stderr)
    assert_no_sentinel(all_output_text(out))
    assert "Traceback" not in done.stderr
    # Fatal before scoring: the same non-empty OUT without --resume -> exit 1, untouched.
    before = (out / "scores.csv").read_bytes()
    again = subprocess.run(_cli(root, "--model", model_dir, "--out", out),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "OUTPUT_NOT_EMPTY" in again.stderr
    assert (out / "scores.csv").read_bytes() == before


def test_sigkill_mid_run_then_resume_scores_only_what_is_missing(
    cohort, model_dir: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    root = tmp_path / "studies"
    root.mkdir()
    for copy in range(2):  # 8 studies: enough to be killed half-way
        for sid in sorted(p.name for p in cohort.studies_dir.iterdir()):
            shutil.copytree(cohort.studies_dir / sid, root / f"c{copy}-{sid}")
    reference = tmp_path / "reference"
    score_folder(root, model_dir, reference, workers=0, explain=True, cam_method="gradcam",
                 progress=False)

    out = tmp_path / "out"
    cmd = _cli(root, "--model", model_dir, "--out", out, "--workers", "1", "--explain",
               "--cam-method", "gradcam")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 240
    lines = 0
    while time.monotonic() < deadline and proc.poll() is None:
        lines = journal.read_bytes().count(b"\n") if journal.exists() else 0
        if lines >= 3:  # header + 2 studies done
            break
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker, no cleanup at all
    except ProcessLookupError:  # already finished: the assertion below says so
        pass
    proc.wait(timeout=30)
    killed_at = journal.read_bytes().count(b"\n")
    assert 3 <= killed_at < 9, f"the run was not interrupted half-way ({killed_at} lines)"

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"scored 8/8 studies ({killed_at - 1} resumed)" in resumed.stderr
    # Same bytes as an uninterrupted run; one journal line per study, saliency complete.
    assert (out / "scores.csv").read_bytes() == (reference / "scores.csv").read_bytes()
    ids = [line for line in journal.read_text().splitlines()[1:]]
    assert len(ids) == 8
    assert sorted(p.name for p in (out / "saliency").iterdir()) == \
        sorted(p.name for p in root.iterdir())
    for study in (out / "saliency").iterdir():
        if study.name != ".staging":
            assert sorted(f.name for f in study.iterdir()) == [
                "ct.nii.gz", "ct.png", "mr.nii.gz", "mr.png"]
