"""A batch mixing good and broken studies, run as a user runs it (``medfusion score`` and
``medfusion inspect`` in a real process, the bundled demo model): every good study is
scored, every broken one is one failure row with a specific code, a symbolic link loop
never aborts the run, exit code 2, no traceback and no identifier on any stream."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_scoring_support import all_output_text, assert_no_sentinel

from medfusion.scoring.discovery import discover_studies, study_files, study_key
from medfusion.scoring.scorer import prepare_task

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples" / "studies"
MODEL = REPO / "data_samples" / "demo_model"
# The sample DICOM headers carry PatientName ZZTEST^SENTINEL: a folder named like this holds
# identifiers, so its public id must be the pseudonym and its name must never be printed.
PATIENT_FOLDER = "ZZTEST_SENTINEL_1970"


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture()
def batch(tmp_path: Path) -> Path:
    # Both are tracked in the repository: their absence is a broken checkout, not a skip.
    assert (MODEL / "model.json").exists(), "the bundled demo model is missing"
    assert all((SAMPLES / f"study-00{n}").is_dir() for n in range(4)), "sample studies missing"
    root = tmp_path / "batch"
    root.mkdir()
    for name in ("study-000", "study-001"):
        shutil.copytree(SAMPLES / name, root / name)
    # A good study with a link loop inside: the loop is skipped and reported, it is scored.
    shutil.copytree(SAMPLES / "study-002", root / "looped")
    (root / "looped" / "ct" / "cycle").symlink_to("cycle")
    (root / "looped" / "a").symlink_to("b")
    (root / "looped" / "b").symlink_to("a")
    # A truncated DICOM (the only image of its study), in a folder named after the patient.
    (root / PATIENT_FOLDER).mkdir()
    shutil.copyfile(SAMPLES / "study-003" / "xray.dcm", root / PATIENT_FOLDER / "xray.dcm")
    _truncate(root / PATIENT_FOLDER / "xray.dcm", 5000)
    # A garbage .nii.gz named for a role.
    (root / "garbage").mkdir()
    (root / "garbage" / "mr.nii.gz").write_bytes(gzip.compress(os.urandom(4096), mtime=0))
    # A link loop in the batch root itself.
    (root / "cycle").symlink_to("cycle")
    return root


EXPECTED_FAILURES = {
    study_key(PATIENT_FOLDER): ("load", "TRUNCATED"),
    "garbage": ("load", "NOT_NIFTI"),
    "cycle": ("discover", "SYMLINK_LOOP"),
}


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medfusion.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def test_score_mixed_batch(batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # In-process loading keeps this test fast; worker processes are covered by
    # test_score_cli.py (failure records are the same plain dicts either way).
    done = _run("score", batch, "--model", MODEL, "--out", out, "--workers", "0",
                "--no-progress")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert "scored 3/6 studies" in done.stderr and "3 failed" in done.stderr
    with open(out / "scores.csv", newline="") as handle:
        scored = {row["study_id"] for row in csv.DictReader(handle)}
    assert scored == {"study-000", "study-001", "looped"}
    with open(out / "failures.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["study_id"]: (r["stage"], r["code"]) for r in rows} == EXPECTED_FAILURES
    assert all(r["message"] for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert "SYMLINK_LOOP" in run["studies"][study_key("looped")]["issues"]
    assert PATIENT_FOLDER not in all_output_text(out) + done.stderr + done.stdout
    assert_no_sentinel(all_output_text(out))
    assert_no_sentinel(done.stdout + done.stderr)


def test_inspect_mixed_batch(batch: Path) -> None:
    done = _run("inspect", batch, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["kind"] == "collection"
    errors = sorted(s["error"]["code"] for s in report["studies"] if "error" in s)
    assert errors == ["NOT_NIFTI", "TRUNCATED"] and report["n_failed"] == 2
    assert report["n_studies"] == 5  # the root loop is no study: it is counted as skipped
    assert report["skipped"]["SYMLINK_LOOP"] == 4
    assert_no_sentinel(done.stdout + done.stderr)
    table = _run("inspect", batch)
    assert table.returncode == 0 and "Traceback" not in table.stderr
    assert "SYMLINK_LOOP" in table.stdout
    looped = _run("inspect", batch / "cycle")
    assert looped.returncode == 1 and "SYMLINK_LOOP" in looped.stderr
    assert "Traceback" not in looped.stderr


def test_discovery_and_worker_on_link_loops(batch: Path) -> None:
    """The library layer under the CLI: discovery lists the root loop as a study whose
    worker returns one SYMLINK_LOOP failure; a loop inside a study is a skipped file."""
    found = discover_studies(batch)
    refs = {ref.study_id: ref for ref in found.studies}
    assert set(refs) == {"study-000", "study-001", "looped", "garbage", "cycle",
                         study_key(PATIENT_FOLDER)}
    files, skipped, unsafe = study_files(refs["looped"])
    assert files and skipped == 3 and unsafe == 0
    record = prepare_task(None, refs["cycle"], None)  # type: ignore[arg-type]
    assert not record["ok"]
    assert record["failure"]["code"] == "SYMLINK_LOOP"
    assert record["failure"]["stage"] == "discover"
