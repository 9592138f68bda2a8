"""`medfusion report` end to end: numbers against scikit-learn, files, refusals, PHI,
speed, and the HTML rendered by a real headless browser."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
)
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.errors import MedfusionError, ReportInputError
from medfusion.report.builder import validation_report
from medfusion.report.synthetic import write_batch, write_csv

SENTINEL = "ZZTEST^SENTINEL"


def make_batch(root: Path, n: int = 240, labels: tuple[str, ...] = ("normal", "lesion"),
               seed: int = 0, strength: float = 1.5, explain: bool = False) -> dict:
    """A synthetic scored batch whose patient ids and run.json carry sentinel identifiers."""
    batch = write_batch(root, n, labels, seed=seed, strength=strength, explain=explain,
                        patient_prefix=SENTINEL, id_prefix="ZZTEST_SENTINEL-")
    run = json.loads((batch["out"] / "run.json").read_text())
    run["input_root"] = f"/data/{SENTINEL}/studies"
    (batch["out"] / "run.json").write_text(json.dumps(run))
    return batch


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("binary")
    batch = make_batch(root, explain=True)
    other = make_batch(root / "baseline", strength=0.6, seed=1)
    model = root / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({
        "labels": ["normal", "lesion"], "roles": ["ct"], "temperature": 1.3,
        "recipe": {"encoder": "small3d", "fusion": "late"},
        "training_data": f"/home/{SENTINEL}/train", "metrics": {"val_auroc": 0.91},
    }))
    report = validation_report(
        batch["out"] / "scores.csv", batch["labels"], root / "REPORT",
        subgroups=["site", "sex"], compare=other["out"] / "scores.csv", model_dir=model,
        n_bootstrap=300, seed=0, accept_model_mismatch=True,
    )
    return {**batch, "report": report, "dir": root / "REPORT", "root": root}


def test_headline_numbers_equal_sklearn(binary: dict) -> None:
    r, y, probs = binary["report"], binary["y"], binary["probs"]
    p = probs[:, 1]
    assert r["n"] == len(y)
    assert r["positive_label"] == "lesion" and r["threshold"] == 0.5
    assert r["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), rel=1e-12)
    assert r["auprc"]["value"] == pytest.approx(average_precision_score(y, p), rel=1e-12)
    assert r["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    pred = (p >= 0.5).astype(int)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    assert r["confusion_matrix"]["matrix"] == cm.tolist()
    tn, fp, fn, tp = cm.ravel()
    assert r["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert r["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert r["ppv"]["value"] == pytest.approx(tp / (tp + fp))
    assert r["npv"]["value"] == pytest.approx(tn / (tn + fn))
    for key in ("auroc", "auprc", "sensitivity", "specificity"):
        block = r[key]
        assert block["ci_low"] <= block["value"] <= block["ci_high"], key
    d = r["auroc"]["delong"]
    assert d["ci_low"] < r["auroc"]["value"] < d["ci_high"]
    assert 0 <= r["ece"] <= 1 and r["calibration"]["slope"] > 0
    # 240 studies, two per patient: the bootstrap resampled 120 patients
    assert r["n_patients"] == 120


def test_report_json_is_strict_and_has_the_contract_keys(binary: dict) -> None:
    data = _strict_json(binary["dir"] / "report.json")
    for key in ("n", "auroc", "auprc", "brier", "ece", "sensitivity", "specificity",
                "threshold", "subgroups"):
        assert key in data
    for key in ("value", "ci_low", "ci_high"):
        assert key in data["auroc"] and key in data["auprc"]
    assert data == json.loads(json.dumps(binary["report"]))


def test_subgroups_every_level_with_counts_and_sklearn_auroc(binary: dict) -> None:
    r, y, probs = binary["report"], binary["y"], binary["probs"]
    site = r["subgroups"]["site"]
    assert sorted(site) == ["A", "B", "C"]
    assert sum(level["n"] for level in site.values()) == r["n"]
    idx = np.arange(len(y))[np.arange(len(y)) % 3 == 1]  # site B
    assert site["B"]["n"] == len(idx)
    assert site["B"]["auroc"]["value"] == pytest.approx(roc_auc_score(y[idx], probs[idx, 1]))
    for level in site.values():
        for key in ("auroc", "auprc", "sensitivity", "specificity", "brier", "ece",
                    "calibration", "confusion_matrix"):
            assert key in level
    assert set(r["subgroups"]["sex"]) == {"F", "M"}


def test_comparison_is_paired_delong(binary: dict) -> None:
    c = binary["report"]["comparison"]
    assert c["n_matched"] == binary["report"]["n"]
    assert c["difference"] == pytest.approx(c["auroc_a"] - c["auroc_b"])
    assert c["auroc_a"] == pytest.approx(binary["report"]["auroc"]["value"])
    assert 0 <= c["p_value"] <= 1 and c["ci_low"] < c["difference"] < c["ci_high"]
    assert c["bootstrap_ci_low"] < c["difference"] < c["bootstrap_ci_high"]


def test_cohort_flow_failures_conformal_and_gallery(binary: dict) -> None:
    r = binary["report"]
    flow = r["cohort"]
    assert flow["found"] == r["n"] + 2 and flow["failed"] == 2
    assert flow["labels_without_scores"] == 1 and flow["labels_without_scores_failed"] == 1
    assert flow["analysed"] == r["n"]
    assert r["failures"]["by_code"] == {"MISSING_SLICES": 1, "NOT_DICOM": 1}
    conf = r["conformal"]
    y, probs = binary["y"], binary["probs"]
    covered = np.mean([probs[i, y[i]] > 0.15 for i in range(len(y))])
    assert conf["coverage"]["value"] == pytest.approx(covered)
    assert set(conf["per_class"]) == {"normal", "lesion"}
    cats = {case["category"] for case in r["saliency"]["cases"]}
    assert cats == {"true positive", "false positive", "true negative", "false negative"}
    assert r["model_card"]["roles"] == ["ct"]
    statuses = {item["status"] for item in r["checklist"]}
    assert statuses == {"auto", "needs a person"}  # never "complete"
    ethics = next(i for i in r["checklist"] if i["topic"].startswith("Ethics"))
    assert ethics["status"] == "needs a person"


def test_html_is_self_contained_and_phi_free(binary: dict) -> None:
    html = (binary["dir"] / "report.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert "data:image/png;base64," in html
    assert html.count("<img") >= 8  # plots + gallery montages
    for name in ("report.html", "report.json"):
        text = (binary["dir"] / name).read_text(encoding="utf-8")
        assert SENTINEL not in text and "ZZTEST" not in text, name
    leftovers = [p.name for p in binary["dir"].iterdir() if p.name not in
                 ("report.html", "report.json")]
    assert leftovers == []


def test_rebuild_is_byte_identical(binary: dict, tmp_path: Path) -> None:
    out = binary["out"]
    kwargs = {"subgroups": ["site"], "n_bootstrap": 50, "seed": 3}
    validation_report(out / "scores.csv", binary["labels"], tmp_path / "a", **kwargs)
    validation_report(out / "scores.csv", binary["labels"], tmp_path / "b", **kwargs)
    for name in ("report.html", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_multiclass_one_vs_rest_and_macro(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, n=210, labels=("a", "b", "c"), seed=4)
    r = validation_report(batch["out"] / "scores.csv", batch["labels"], tmp_path / "R",
                          subgroups=["site"], n_bootstrap=100)
    y, probs = batch["y"], batch["probs"]
    refs = []
    for k, lab in enumerate(("a", "b", "c")):
        refs.append(roc_auc_score((y == k).astype(int), probs[:, k]))
        assert r["per_class"][lab]["auroc"]["value"] == pytest.approx(refs[-1])
    # scikit-learn's multi_class="ovr" macro average is the mean of these
    assert r["auroc"]["value"] == pytest.approx(np.mean(refs))
    assert r["threshold"] is None and "argmax" in r["decision_rule"]
    assert r["confusion_matrix"]["matrix"] == confusion_matrix(
        y, probs.argmax(axis=1), labels=[0, 1, 2]).tolist()
    assert r["brier"] == pytest.approx(np.mean(np.sum((probs - np.eye(3)[y]) ** 2, axis=1)))


def test_tiny_and_one_class_subgroups_give_null_and_a_note(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, n=40, seed=5)
    path = batch["labels"]
    rows = list(csv.reader(open(path, encoding="utf-8")))
    rows[0].append("scanner")
    for i, row in enumerate(rows[1:]):
        # "rare": a single study; "pure": only negatives
        row.append("rare" if i == 0 else ("pure" if row[1] == "normal" else "mixed"))
    write_csv(path, rows[0], rows[1:])
    r = validation_report(batch["out"] / "scores.csv", path, tmp_path / "R",
                          subgroups=["scanner"], n_bootstrap=50)
    scanner = r["subgroups"]["scanner"]
    assert scanner["rare"]["n"] == 1 and scanner["rare"]["auroc"]["value"] is None
    assert scanner["pure"]["auroc"]["value"] is None
    assert scanner["pure"]["specificity"]["value"] is not None
    assert any("scanner=pure" in note for note in r["notes"])
    _strict_json(tmp_path / "R" / "report.json")


def test_integer_labels_and_explicit_positive_and_threshold(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, n=120, seed=6)
    rows = list(csv.reader(open(batch["labels"], encoding="utf-8")))
    for row in rows[1:]:
        row[1] = "0" if row[1] == "normal" else "1"
    write_csv(batch["labels"], rows[0], rows[1:])
    r = validation_report(batch["out"] / "scores.csv", batch["labels"], tmp_path / "R",
                          positive_label="normal", threshold=0.3, n_bootstrap=0)
    y, p = batch["y"], batch["probs"][:, 0]
    assert r["auroc"]["value"] == pytest.approx(roc_auc_score((y == 0).astype(int), p))
    tp = np.sum((p >= 0.3) & (y == 0))
    assert r["sensitivity"]["numerator"] == tp and r["threshold"] == 0.3
    assert math.isnan(float("nan")) and r["auroc"]["ci_low"] is None  # no bootstrap asked


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda s, lab: s.write_text("study_id,status\ns-1,scored\n"), "REPORT_MISSING_COLUMN"),
        (lambda s, lab: lab.write_text("study_id,diagnosis\ns-1,x\n"), "REPORT_MISSING_COLUMN"),
        (lambda s, lab: lab.write_text("study_id,label\nZZTEST_SENTINEL-00000000,tumour\n"),
         "REPORT_UNKNOWN_LABEL"),
        (lambda s, lab: lab.write_text("study_id,label\nnope,lesion\n"), "REPORT_NO_OVERLAP"),
        (lambda s, lab: lab.write_text("study_id,label\na,lesion\na,normal\n"),
         "REPORT_DUPLICATE_ID"),
        (lambda s, lab: s.write_text(s.read_text().replace("0.", "7.", 1)), "REPORT_BAD_VALUE"),
        (lambda s, lab: s.unlink(), "REPORT_FILE_MISSING"),
        (lambda s, lab: s.write_bytes(b"\xff\xfe\x00garbage"), "REPORT_BAD_TABLE"),
    ],
)
def test_bad_input_is_a_coded_refusal(tmp_path: Path, mutate, code: str) -> None:
    batch = make_batch(tmp_path, n=30, seed=7)
    scores = batch["out"] / "scores.csv"
    mutate(scores, batch["labels"])
    with pytest.raises(ReportInputError) as info:
        validation_report(scores, batch["labels"], tmp_path / "R", n_bootstrap=10)
    assert info.value.code == code
    assert not (tmp_path / "R" / "report.html").exists()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, n=30, seed=8)
    scores = batch["out"] / "scores.csv"
    for kwargs in ({"threshold": 1.5}, {"threshold": "high"}, {"threshold": float("nan")},
                   {"positive_label": "cat"}, {"subgroups": ["nope"]},
                   {"subgroups": ["patient_id"]}, {"n_bootstrap": -1}, {"n_bootstrap": 2.5},
                   {"seed": -1}):
        with pytest.raises(MedfusionError):
            validation_report(scores, batch["labels"], tmp_path / "R", **kwargs)


def test_cli_report_and_clean_error(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, n=60, seed=9)
    runner = CliRunner()
    out = tmp_path / "R"
    result = runner.invoke(app, ["report", "--scores", str(batch["out"] / "scores.csv"),
                                 "--labels", str(batch["labels"]), "--subgroups", "site,sex",
                                 "--n-bootstrap", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and "AUROC" in result.output
    assert _strict_json(out / "report.json")["settings"]["subgroup_columns"] == ["site", "sex"]
    bad = runner.invoke(app, ["report", "--scores", str(tmp_path / "missing.csv"),
                              "--labels", str(batch["labels"]), "--out", str(out)])
    assert bad.exit_code == 1 and "REPORT_FILE_MISSING" in bad.output
    assert "Traceback" not in bad.output


def test_run_audit_checks_the_model_card_digest(binary: dict, tmp_path: Path) -> None:
    checks = {c["check"]: c["result"] for c in binary["report"]["run"]["checks"]}
    assert checks["model card digest in run.json matches --model"] == "FAIL"  # 000... in run
    # Accepted explicitly: the failure is the first thing the report says.
    assert "model card digest in run.json matches --model" in binary["report"]["audit_failures"]
    html = (binary["dir"] / "report.html").read_text()
    assert "Run audit failed" in html
    assert html.index("Run audit failed") < html.index('<section id="summary"')
    assert "NOT the model" in binary["report"]["notes"][0]
    # Not accepted: refused before anything is written, on the console and by exit code.
    model = binary["root"] / "model"
    with pytest.raises(MedfusionError) as info:
        validation_report(binary["out"] / "scores.csv", binary["labels"], tmp_path / "NO",
                          model_dir=model, n_bootstrap=0)
    assert info.value.code == "REPORT_MODEL_MISMATCH"
    assert not (tmp_path / "NO").exists()
    runner = CliRunner()
    args = ["report", "--scores", str(binary["out"] / "scores.csv"), "--labels",
            str(binary["labels"]), "--model", str(model), "--n-bootstrap", "0"]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "CLI")])
    assert refused.exit_code == 1 and "REPORT_MODEL_MISMATCH" in refused.output
    accepted = runner.invoke(app, [*args, "--out", str(tmp_path / "CLI2"),
                                   "--accept-model-mismatch"])
    assert accepted.exit_code == 0, accepted.output
    assert "run audit failed" in accepted.output
    # a run.json that recorded this card's digest passes
    from medfusion.report.inputs import card_sha256

    model = binary["root"] / "model"
    card = json.loads((model / "model.json").read_text())
    out = binary["out"]
    shutil.copytree(out, tmp_path / "OUT")
    run = json.loads((tmp_path / "OUT" / "run.json").read_text())
    run["model"]["card_sha256"] = card_sha256(card)
    run["status"] = "complete"
    (tmp_path / "OUT" / "run.json").write_text(json.dumps(run))
    r = validation_report(tmp_path / "OUT" / "scores.csv", binary["labels"], tmp_path / "R",
                          model_dir=model, n_bootstrap=0)
    checks = {c["check"]: c["result"] for c in r["run"]["checks"]}
    assert set(checks.values()) == {"pass"} and len(checks) == 3
    html = (tmp_path / "R" / "report.html").read_text()
    assert "Full model card" in html and SENTINEL not in html


def test_default_positive_class_is_the_non_negative_label() -> None:
    from medfusion.report.builder import default_positive

    assert default_positive(("abnormal", "normal")) == 0
    assert default_positive(("Normal", "lesion")) == 1
    assert default_positive(("malignant", "benign")) == 0
    assert default_positive(("cat", "dog")) == 1  # no negative name: the second label


def test_a_column_with_too_many_levels_is_skipped_with_a_note(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, n=120, seed=11)
    r = validation_report(batch["out"] / "scores.csv", batch["labels"], tmp_path / "R",
                          subgroups=["site", "sex"], n_bootstrap=0)
    assert set(r["subgroups"]) == {"site", "sex"} and r["subgroups_skipped"] == {}
    rows = list(csv.reader(open(batch["labels"], encoding="utf-8")))
    rows[0].append("age")
    for i, row in enumerate(rows[1:]):
        row.append(str(40 + i))  # one level per study: not a subgroup
    write_csv(batch["labels"], rows[0], rows[1:])
    r = validation_report(batch["out"] / "scores.csv", batch["labels"], tmp_path / "R",
                          subgroups=["age", "site"], n_bootstrap=0)
    assert r["subgroups"]["age"] == {} and "age" in r["subgroups_skipped"]
    assert len(r["subgroups"]["site"]) == 3
    assert any("age skipped" in note for note in r["notes"])


def test_labels_may_name_studies_by_their_pseudonymous_key(tmp_path: Path) -> None:
    from medfusion.report.builder import display_id

    batch = make_batch(tmp_path, n=60, seed=12)
    rows = list(csv.reader(open(batch["labels"], encoding="utf-8")))
    for row in rows[1:]:
        row[0] = display_id(row[0])
    write_csv(batch["labels"], rows[0], rows[1:])
    r = validation_report(batch["out"] / "scores.csv", batch["labels"], tmp_path / "R",
                          subgroups=["site"], n_bootstrap=0)
    assert r["n"] == 60 and sum(v["n"] for v in r["subgroups"]["site"].values()) == 60
    assert r["auroc"]["value"] == pytest.approx(roc_auc_score(batch["y"], batch["probs"][:, 1]))
