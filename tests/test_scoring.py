"""Batch scoring through the Python API with a real tiny FusionModel (in-process loading).

Covers the output contract (columns, order, float format, run.json), fault isolation (E1:
corrupt, empty, mixed, oversized, non-medical-only studies), refusals before scoring (E3),
resume from a torn journal (E2 at the file level; the real SIGKILL is in
test_score_cli.py), unsafe paths (F4, F5), identifiers (G1, G2) and budgets (E4).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_scoring_support import (
    all_output_text,
    assert_no_sentinel,
    copy_studies,
    scoring_cohort,
    trained_model,
)

from medfusion.errors import MedfusionError, ModelPackageError
from medfusion.inference import FusionModel
from medfusion.io.study import load_study
from medfusion.keys import pseudonym
from medfusion.scoring.engine import score_folder, stage_summary
from medfusion.scoring.scorer import FusionModelScorer, WarmsUp
from medfusion.testing import dicom_factory

HEADER = (
    "study_id,status,predicted,prob_normal,prob_abnormal,raw_prob_normal,raw_prob_abnormal,"
    "entropy,mutual_info,feature_shift,shift_pvalue,prediction_set,abstain,modalities_used,"
    "weight_ct,weight_mr,"
    "weight_clinical,flags"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - support.Cohort
    return scoring_cohort(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def clean(model_dir: Path, cohort, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = score_folder(cohort.studies_dir, model_dir, out, clinical_csv=cohort.clinical,
                           workers=0, progress=False)
    assert summary.exit_code == 0 and summary.n_scored == 4
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_scores_csv_contract_and_audit_trail(clean: Path, cohort, model_dir: Path) -> None:  # noqa: ANN001
    text = (clean / "scores.csv").read_text()
    assert text.splitlines()[0] == HEADER
    rows = _rows(clean / "scores.csv")
    assert [r["study_id"] for r in rows] == [f"study-00{i}" for i in range(4)]
    for row in rows:
        assert row["status"] == "scored"
        probs = [row["prob_normal"], row["prob_abnormal"]]
        assert all(0.0 <= float(p) <= 1.0 and len(p) <= 15 for p in probs)  # %.9g
        assert abs(sum(float(p) for p in probs) - 1.0) < 2e-6
        assert row["predicted"] == ("normal" if probs[0] >= probs[1] else "abnormal")
        assert row["modalities_used"] == "ct|mr|clinical"
        # The radiograph is a role this model was not trained on: said, not silently lost.
        assert "ROLE_NOT_USED:xray" in row["flags"].split("|")
    assert (clean / "failures.csv").read_text() == "study_id,stage,code,message\n"

    run = json.loads((clean / "run.json").read_text())
    assert run["status"] == "complete"
    assert {"medfusion", "torch", "monai", "pydicom"} <= set(run["versions"])
    card = json.loads((model_dir / "model.json").read_text())
    assert run["model"]["recipe"] == card["recipe"]
    weights = hashlib.sha256((model_dir / "weights.safetensors").read_bytes()).hexdigest()
    assert run["model"]["file_sha256"]["weights.safetensors"] == weights
    assert run["totals"] == {"studies": 4, "scored": 4, "failed": 0, "resumed": 0,
                             "skipped_files": 0, "unsafe_links": 0}
    # Per-study audit keyed by pseudonyms: the digest is over the files' contents.
    keys = {pseudonym(f"study-00{i}", prefix="st-") for i in range(4)}
    assert set(run["studies"]) == keys
    for entry in run["studies"].values():
        assert re.fullmatch(r"xxh3-128:[0-9a-f]{32}", entry["digest"])
        assert entry["status"] == "scored"
        timings = entry["timings"]
        assert set(timings) == {"read_s", "decode_s", "preprocess_s", "infer_s"}
        assert timings["decode_s"] > 0 and timings["infer_s"] > 0  # DICOM and NIfTI decoded
    # Where the time went: per stage, summed and per-study percentiles (workers=0 here).
    stages = run["stages"]
    assert set(stages["per_stage"]) == {"read", "decode", "preprocess", "infer"}
    for stats in stages["per_stage"].values():
        assert stats["studies"] == 4
        assert 0 <= stats["p50_s"] <= stats["p90_s"] <= stats["max_s"] <= stats["total_s"]
    assert stages["limited_by"] == "one process"
    assert run["timings"]["setup_s"] <= run["timings"]["first_study_s"] \
        <= run["timings"]["elapsed_s"]
    assert "study-00" not in (clean / "run.json").read_text()
    assert_no_sentinel(all_output_text(clean))


def test_same_inputs_twice_give_identical_bytes(clean: Path, cohort, model_dir: Path,  # noqa: ANN001
                                                tmp_path: Path) -> None:
    out = tmp_path / "again"
    score_folder(cohort.studies_dir, model_dir, out, clinical_csv=cohort.clinical, workers=0,
                 progress=False)
    assert (out / "scores.csv").read_bytes() == (clean / "scores.csv").read_bytes()


def test_faulty_studies_become_one_failure_row_each(clean: Path, cohort, model_dir: Path,  # noqa: ANN001
                                                    tmp_path: Path) -> None:
    root = copy_studies(cohort, tmp_path / "studies")
    # corrupt: every CT slice truncated (A2)
    shutil.copytree(root / "study-001", root / "bad-corrupt")
    for dcm in (root / "bad-corrupt" / "ct").iterdir():
        dicom_factory.truncate_file(dcm)
    # empty, and non-medical files only (A1, B9)
    (root / "bad-empty").mkdir()
    dicom_factory.write_non_dicom_files(root / "bad-notes")
    # mixed: images of two different studies (patients) in one folder
    (root / "bad-mixed").mkdir()
    shutil.copytree(root / "study-000" / "ct", root / "bad-mixed" / "a")
    shutil.copytree(root / "study-002" / "ct", root / "bad-mixed" / "b")
    # oversized: a header declaring gigabytes (A6)
    (root / "bad-huge").mkdir()
    dicom_factory.write_huge_header(root / "bad-huge" / "IM0001.dcm")

    out = tmp_path / "out"
    summary = score_folder(root, model_dir, out, clinical_csv=cohort.clinical, workers=0,
                           progress=False)
    assert summary.exit_code == 2
    assert (summary.n_scored, summary.n_failed) == (4, 5)
    failures = {r["study_id"]: r for r in _rows(out / "failures.csv")}
    assert sorted(failures) == ["bad-corrupt", "bad-empty", "bad-huge", "bad-mixed",
                                "bad-notes"]
    assert failures["bad-empty"]["code"] == failures["bad-notes"]["code"] == "NO_IMAGES"
    assert failures["bad-huge"]["code"] == "LIMIT_EXCEEDED"
    assert failures["bad-mixed"]["code"] == "MIXED_SERIES"
    assert failures["bad-corrupt"]["code"] in {"TRUNCATED", "CORRUPT"}
    for row in failures.values():
        assert row["stage"] in {"discover", "load", "prepare"}
        assert str(tmp_path) not in row["message"] and "Traceback" not in row["message"]
        assert "IM0001" not in row["message"]
    # The good studies' rows are exactly those of a clean run.
    clean_lines = (clean / "scores.csv").read_text().splitlines()
    assert (out / "scores.csv").read_text().splitlines() == clean_lines
    run = json.loads((out / "run.json").read_text())
    assert run["totals"]["skipped_files"] >= 3  # notes.txt, report.pdf, DICOMDIR, empty
    assert_no_sentinel(all_output_text(out))


def test_missing_clinical_row_scores_on_imaging_and_says_so(cohort, model_dir: Path,  # noqa: ANN001
                                                           tmp_path: Path) -> None:
    lines = cohort.clinical.read_text().splitlines()
    partial = tmp_path / "clinical.csv"
    partial.write_text("\n".join(ln for ln in lines if not ln.startswith("study-001")) + "\n")
    out = tmp_path / "out"
    summary = score_folder(cohort.studies_dir, model_dir, out, clinical_csv=partial,
                           workers=0, progress=False)
    assert summary.exit_code == 0
    rows = {r["study_id"]: r for r in _rows(out / "scores.csv")}
    assert "no_clinical_record" in rows["study-001"]["flags"].split("|")
    assert rows["study-001"]["modalities_used"] == "ct|mr"
    assert rows["study-001"]["weight_clinical"] == ""
    assert "no_clinical_record" not in rows["study-000"]["flags"]


def test_fatal_problems_refused_before_scoring(cohort, model_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    def code_of(**kwargs) -> str:  # noqa: ANN003
        args = {"studies_dir": cohort.studies_dir, "model_dir": model_dir,
                "out_dir": tmp_path / "fresh", "workers": 0, "progress": False, **kwargs}
        with pytest.raises(MedfusionError) as info:
            score_folder(**args)
        return info.value.code

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    assert code_of(out_dir=busy) == "OUTPUT_NOT_EMPTY"
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert code_of(out_dir=blocker / "out") == "OUTPUT_UNWRITABLE"
    bad_model = tmp_path / "bad-model"
    bad_model.mkdir()
    (bad_model / "model.json").write_text("{not json")
    assert code_of(model_dir=bad_model) in {"MODEL_PACKAGE", "UNTRUSTED_CHECKPOINT"}
    assert code_of(studies_dir=tmp_path / "nowhere") == "NOT_A_FOLDER"
    assert code_of(alpha=1.5) == "BAD_OPTION"
    assert code_of(engine="spark") == "BAD_OPTION"
    assert not (tmp_path / "fresh").exists()  # nothing written for a refused run


def test_resume_after_a_torn_journal_scores_only_what_is_missing(
    clean: Path, cohort, model_dir: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    journal = out / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    # As if killed while writing the third study's line: header + 2 studies + half a line.
    journal.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    for name in ("scores.csv", "failures.csv", "run.json"):
        (out / name).unlink()
    summary = score_folder(cohort.studies_dir, model_dir, out, clinical_csv=cohort.clinical,
                           workers=0, resume=True, progress=False)
    assert (summary.n_resumed, summary.n_scored, summary.exit_code) == (2, 4, 0)
    assert (out / "scores.csv").read_bytes() == (clean / "scores.csv").read_bytes()
    ids = [json.loads(x).get("study_id") for x in journal.read_text().splitlines()[1:]]
    assert sorted(ids) == [f"study-00{i}" for i in range(4)]  # no duplicate, no torn line
    # Resuming with other options would mix two configurations: refused.
    with pytest.raises(MedfusionError) as info:
        score_folder(cohort.studies_dir, model_dir, out, clinical_csv=cohort.clinical,
                     workers=0, resume=True, alpha=0.2, progress=False)
    assert info.value.code == "RESUME_MISMATCH"


def test_links_and_header_strings_never_escape_the_roots(cohort, model_dir: Path,  # noqa: ANN001
                                                         tmp_path: Path) -> None:
    root = tmp_path / "batch" / "studies"
    root.mkdir(parents=True)
    outside = copy_studies(cohort, tmp_path / "outside")
    # F5: a study folder that is a link out of the root, and a study whose CT is a link out.
    (root / "linked-study").symlink_to(outside / "study-000", target_is_directory=True)
    (root / "link-inside").mkdir()
    shutil.copy(outside / "study-001" / "mr.nii.gz", root / "link-inside" / "mr.nii.gz")
    (root / "link-inside" / "ct").symlink_to(outside / "study-001" / "ct")
    # F4: a header string that looks like a path, and a folder name that is not a plain name.
    arr = np.full((12, 12, 6), 40.0, dtype=np.float32)
    with warnings.catch_warnings():  # pydicom warns that this is not a valid UI value
        warnings.simplefilter("ignore")
        dicom_factory.write_series(root / "uid-trick" / "ct", arr, SOPInstanceUID="../../escape")
    shutil.copytree(outside / "study-002", root / "Doe, Jane (1970)")

    out = tmp_path / "batch" / "out"
    summary = score_folder(root, model_dir, out, workers=0, explain=True, cam_method="gradcam",
                           progress=False)
    assert summary.n_unsafe_links == 2
    rows = {r["study_id"]: r for r in _rows(out / "scores.csv")}
    failures = {r["study_id"]: r for r in _rows(out / "failures.csv")}
    assert "linked-study" not in rows and "linked-study" not in failures
    assert rows["link-inside"]["modalities_used"] == "mr"  # the outside CT was not read
    # Saliency paths come from the study id (or its pseudonym), never from a header.
    odd = rows["Doe, Jane (1970)"]["saliency_ct"]
    assert odd == f"saliency/{pseudonym('Doe, Jane (1970)', prefix='st-')}/ct.nii.gz"
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(os.path.realpath(p).startswith(os.path.realpath(out) + os.sep) for p in written)
    assert not any("escape" in p.name for p in tmp_path.rglob("*"))
    for row in rows.values():
        for col in ("saliency_ct", "saliency_mr"):
            if row[col]:
                image = nib.load(out / row[col])
                assert image.header["descrip"].tobytes().strip(b"\0") == b""


def test_identifiers_in_headers_and_names_never_reach_outputs(
    cohort, model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]  # noqa: ANN001
) -> None:
    root = copy_studies(cohort, tmp_path / "studies")
    # G2: a series whose file names, and a nested folder whose name, hold a patient name.
    arr = np.full((12, 12, 6), 40.0, dtype=np.float32)
    named = root / "study-003" / "ZZTEST_SENTINEL_scans" / "ct-extra"
    dicom_factory.write_series(named, arr, file_names="sentinel", series_number=9,
                               study_uid=None)
    out = tmp_path / "out"
    score_folder(root, model_dir, out, clinical_csv=cohort.clinical, workers=0, explain=True,
                 cam_method="gradcam", progress=True)
    captured = capfd.readouterr()
    assert_no_sentinel(captured.out + captured.err)
    assert_no_sentinel(all_output_text(out))


def test_study_folder_named_after_the_patient_is_scored_under_its_pseudonym(
    cohort, model_dir: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    # G2: the folder name holds the PatientName of the headers inside it: study_id (rows,
    # saliency folder, journal) becomes the pseudonymous key; the clinical row is still
    # found under the folder name.
    root = copy_studies(cohort, tmp_path / "studies")
    phi_name = "ZZTEST_SENTINEL_study-002"
    (root / "study-002").rename(root / phi_name)
    lines = cohort.clinical.read_text().replace("study-002,", f"{phi_name},")
    clinical = tmp_path / "clinical.csv"
    clinical.write_text(lines)
    out = tmp_path / "out"
    summary = score_folder(root, model_dir, out, clinical_csv=clinical, workers=0,
                           explain=True, cam_method="gradcam", progress=False)
    assert summary.exit_code == 0
    rows = {r["study_id"]: r for r in _rows(out / "scores.csv")}
    key = pseudonym(phi_name, prefix="st-")
    assert key in rows and "study-000" in rows  # ordinary names are kept as they are
    assert "no_clinical_record" not in rows[key]["flags"]
    assert rows[key]["saliency_ct"].startswith(f"saliency/{key}/")
    assert_no_sentinel(all_output_text(out))


def test_memory_budget_marks_the_study_and_the_batch_goes_on(
    cohort, model_dir: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    root = copy_studies(cohort, tmp_path / "studies")
    # About 175 MiB to prepare, against small studies' few MiB (first-study allocations
    # are taken by the worker's warm-up): a budget of 80 MiB is far from both.
    big = np.zeros((320, 320, 240), dtype=np.int16)
    big[100:220, 100:220, 60:180] = 400
    (root / "big").mkdir()
    nib.save(nib.Nifti1Image(big, np.diag([0.8, 0.8, 1.0, 1.0])), root / "big" / "ct.nii.gz")
    out = tmp_path / "out"
    # One worker process: the big study's worker is replaced, the next studies still run.
    summary = score_folder(root, model_dir, out, clinical_csv=cohort.clinical, workers=1,
                           memory_budget_mb=80, progress=False)
    assert summary.exit_code == 2
    failures = _rows(out / "failures.csv")
    assert [(r["study_id"], r["code"]) for r in failures] == [("big", "BUDGET_EXCEEDED")]
    assert summary.n_scored == 4


def test_worker_warm_up_prepares_every_role_of_the_model(model_dir: Path) -> None:
    # A warm-up that silently failed would leave a fresh worker's one-time allocations on
    # its first study, and a tight memory budget would then fail healthy studies.
    preparer = FusionModelScorer.load(model_dir, networks=False)
    assert isinstance(preparer, WarmsUp)
    assert preparer.roles and preparer.warm_up() is True


def test_loose_dicom_files_are_grouped_by_study_under_pseudonymous_ids(
    cohort, model_dir: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    import pydicom

    root = tmp_path / "flat"
    root.mkdir()
    uids = set()
    for sid in ("study-000", "study-001"):
        for n, dcm in enumerate(sorted((cohort.studies_dir / sid / "ct").iterdir())):
            shutil.copy(dcm, root / f"{sid}-{n:03d}.dcm")
            uids.add(str(pydicom.dcmread(dcm, stop_before_pixels=True).StudyInstanceUID))
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    summary = score_folder(root, model_dir, out, workers=0, progress=False)
    assert (summary.n_studies, summary.n_scored, summary.n_skipped_files) == (2, 2, 1)
    rows = _rows(out / "scores.csv")
    assert sorted(r["study_id"] for r in rows) == sorted(
        pseudonym(uid, prefix="st-") for uid in uids)
    assert all(r["modalities_used"] == "ct" for r in rows)
    text = all_output_text(out)
    assert not any(uid in text for uid in uids)
    assert "study-00" not in text  # the loose files' names never reach an output


def test_stage_summary_names_the_side_that_limits_the_run() -> None:
    studies = [{"read_s": 0.1, "decode_s": 0.5 * n, "preprocess_s": 0.1, "infer_s": 0.2}
               for n in range(1, 5)]
    summary = stage_summary(studies, workers=2)
    decode = summary["per_stage"]["decode"]
    assert decode["total_s"] == 5.0 and decode["p50_s"] == 1.25 and decode["max_s"] == 2.0
    assert summary["worker_side_s"] == 5.8 and summary["parent_side_s"] == 0.8
    assert summary["limited_by"].startswith("workers") and summary["largest_stage"] == "decode"
    fast_load = [dict(t, decode_s=0.01) for t in studies]
    assert stage_summary(fast_load, workers=2)["limited_by"].startswith("parent")
    assert stage_summary([], workers=2) == {
        "per_stage": {}, "worker_side_s": 0.0, "parent_side_s": 0.0, "workers": 2,
        "limited_by": None, "largest_stage": None}


def test_workers_prepare_the_same_tensors_without_building_networks() -> None:
    demo = Path(__file__).resolve().parents[1] / "data_samples"
    study = load_study(demo / "studies" / "study-000")
    full = FusionModel.load(demo / "demo_model")
    light = FusionModel.load(demo / "demo_model", networks=False)
    assert light.nets == [] and full.nets
    a, b = full.prepare(study, keep_sources=False), light.prepare(study, keep_sources=False)
    assert set(a.tensors) == set(b.tensors)
    assert all(np.array_equal(a.tensors[r], b.tensors[r]) for r in a.tensors)
    with pytest.raises(ModelPackageError, match="networks=False"):
        light.predict_prepared([b])
