"""``validation_report``: scores.csv + labels.csv -> REPORT_DIR/report.json + report.html.

Reading (:mod:`.inputs`), computing (:mod:`.analysis`, :mod:`.metrics`), drawing
(:mod:`.plots`) and rendering (:mod:`.render`) are separate; this module wires them together,
adds the cohort flow, the model card and run audit, the saliency gallery and the checklist,
and writes both files atomically.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfusion import __version__
from medfusion.atomic import ensure_output_dir, write_bytes
from medfusion.errors import OutputError, ReportInputError
from medfusion.keys import pseudonym, safe_component
from medfusion.report import inputs as I
from medfusion.report.analysis import Extras, Task, evaluate
from medfusion.report.analysis import compare as compare_scores
from medfusion.report.checklist import build_checklist
from medfusion.report.render import render_html

MAX_PNG_BYTES = 3 * 1024**2
GALLERY_PER_CATEGORY = 2
MAX_ROLES_PER_CASE = 4
# More levels than this is a continuous or identifying column, not a subgroup.
MAX_SUBGROUP_LEVELS = 50
# Keys whose values may name people, places or files: never copied into the report.
_WITHHELD_KEY = re.compile(
    r"patient|path|(^|_)dirs?($|_)|folder|file|uid|accession|institution|birth|root|host|user"
    r"|operator|physician|referring|site_name|station",
    re.IGNORECASE,
)
# ... except plain counts under file/folder-ish keys (e.g. skipped_files: 3).
_COUNT_OK_KEY = re.compile(r"file|folder|dir|path", re.IGNORECASE)
_NEVER_KEY = re.compile(r"patient|uid|accession|institution|birth|operator|physician|referring",
                        re.IGNORECASE)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_KEY = re.compile(r"st-[0-9a-f]{12}")


def display_id(study_id: str) -> str:
    """The pseudonymous key shown for a study: study ids of `medfusion score` are folder
    names a user chose (they may hold names), so the report shows the same ``st-`` key
    that run.json and the batch's logs use."""
    return study_id if _KEY.fullmatch(study_id) else pseudonym(study_id, prefix="st-")


def _saliency_folder(root: Path, study_id: str) -> Path | None:
    """Where `medfusion score --explain` put a study's montages (its folder name is the
    study id when that is a plain name, else the study's pseudonym), kept inside ``root``."""
    names = [safe_component(study_id, prefix="st-"), study_id]
    for name in dict.fromkeys(names):
        folder = I.safe_child(root, name)
        if folder is not None and folder.is_dir():
            return folder
    return None


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, tuples/sets -> lists (valid strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sanitise(value: Any, depth: int = 0) -> Any:
    """A PHI-safe copy of model-card / run.json content for display: keys that may hold
    identifiers or paths are withheld, path-like strings replaced, big tables summarised."""
    if depth > 6:
        return "(nested too deep)"
    if isinstance(value, dict):
        if len(value) > 40:
            return f"({len(value)} entries, summarised)"
        out = {}
        for k, v in value.items():
            key = str(k)
            count = type(v) is int and _COUNT_OK_KEY.search(key) and not _NEVER_KEY.search(key)
            withheld = _WITHHELD_KEY.search(key) and not count
            out[key] = "(withheld)" if withheld else _sanitise(v, depth + 1)
        return out
    if isinstance(value, list):
        if len(value) > 40:
            return f"({len(value)} items, summarised)"
        return [_sanitise(v, depth + 1) for v in value]
    if isinstance(value, str):
        if "/" in value or "\\" in value:
            return "(path withheld)"
        return value if len(value) <= 200 else value[:200] + "..."
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return str(value)[:200]


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        write_bytes(path, data)
    except OSError as error:
        raise OutputError(
            f"could not write {path.name} ({error.strerror}); choose a writable --out",
            code="OUTPUT_UNWRITABLE",
        ) from None


def _prepare_out(out: Path) -> Path:
    return ensure_output_dir(out, what="report folder")


_NEGATIVE_NAMES = {"normal", "negative", "neg", "benign", "healthy", "control", "absent", "no",
                   "0", "false", "none", "non-case", "noncase", "without"}


def default_positive(labels: Sequence[str]) -> int:
    """Index of the positive class of a binary model when none is named: the label that is
    not a "negative" name (normal, negative, benign, healthy, control, 0, ...) when exactly
    one of the two is; otherwise the second label in model order."""
    negative = [lab.strip().lower() in _NEGATIVE_NAMES for lab in labels]
    if negative.count(True) == 1:
        return negative.index(False)
    return 1


def _task(labels: tuple[str, ...], positive_label: str | None, threshold: float | None) -> Task:
    if threshold is not None and not (0.0 < float(threshold) < 1.0):
        raise ReportInputError(
            "threshold must be strictly between 0 and 1", code="REPORT_BAD_VALUE"
        )
    if positive_label is not None and positive_label not in labels:
        raise ReportInputError(
            f"positive label {positive_label!r} is not one of the model's labels {list(labels)}",
            code="REPORT_UNKNOWN_LABEL",
        )
    if len(labels) == 2:
        positive = (labels.index(positive_label) if positive_label is not None
                    else default_positive(labels))
        return Task(labels, positive, 0.5 if threshold is None else float(threshold))
    if positive_label is not None:
        return Task(labels, labels.index(positive_label), 0.5 if threshold is None else threshold)
    if threshold is not None:
        raise ReportInputError(
            "a threshold on a multiclass model needs --positive-label (the class it applies "
            "to); without both, decisions are the argmax",
            code="REPORT_BAD_VALUE",
        )
    return Task(labels, None, None)


#: the run-audit checks that compare the scoring run's model with --model (a failure refuses
#: the report unless accept_model_mismatch)
CARD_DIGEST_CHECK = "model card digest in run.json matches --model"
FILE_DIGEST_CHECK = "model.json file digest matches run.json"


def _run_section(run: dict[str, Any] | None, card: dict[str, Any] | None, model_dir: Path | None,
                 scores: I.Scores, failures: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run audit: what run.json says, and whether it agrees with the files at hand."""
    if run is None:
        return None
    checks = []
    recorded = [h for h in I.find_key(run, "card_sha256") if isinstance(h, str)]
    if card is not None and recorded:
        ok = I.card_sha256(card) in recorded
        checks.append({"check": CARD_DIGEST_CHECK,
                       "result": "pass" if ok else "FAIL"})
    if model_dir is not None:
        for digests in I.find_key(run, "file_sha256"):
            if isinstance(digests, dict) and "model.json" in digests:
                ok = digests["model.json"] == I.file_sha256(Path(model_dir) / "model.json")
                checks.append({"check": FILE_DIGEST_CHECK,
                               "result": "pass" if ok else "FAIL"})
                break
    run_labels = [v for v in I.find_key(run, "labels") if isinstance(v, list)]
    if run_labels:
        ok = [str(x) for x in run_labels[0]] == list(scores.labels)
        checks.append({"check": "labels in run.json match the prob_ columns",
                       "result": "pass" if ok else "FAIL"})
    status = run.get("status")
    if isinstance(status, str):
        checks.append({"check": f"run status is complete (run.json says {status!r})",
                       "result": "pass" if status == "complete" else "FAIL"})
    summary: dict[str, Any] = {}
    for key, value in run.items():
        per_study = isinstance(value, dict) and value and all(
            isinstance(v, dict) and "status" in v for v in value.values()
        )
        if per_study or (isinstance(value, dict) and len(value) > 40):
            # per-study tables: only the distribution of their statuses is shown
            statuses = [v.get("status") if isinstance(v, dict) else v for v in value.values()]
            counts: dict[str, int] = {}
            for s in statuses:
                counts[str(s)] = counts.get(str(s), 0) + 1
            summary[key] = {"entries": len(value), "by_status": counts}
        else:
            summary[key] = value
    versions = next((v for v in I.find_key(run, "versions") if isinstance(v, dict)), None)
    return {
        "summary": _sanitise(summary),
        "versions": _sanitise(versions) if versions else None,
        "checks": checks,
    }


def _cohort(scores: I.Scores, labels: I.Labels, failures: dict[str, Any] | None,
            run: dict[str, Any] | None, analysed: int) -> dict[str, Any]:
    scored_ids = set(scores.study_ids)
    failed_ids = set(failures["study_ids"]) if failures else set()
    labelled = set(labels.truth)
    found, source = None, "scored + failed"
    # `medfusion score` records totals.studies; other keys for runs written elsewhere
    for key in ("found", "n_found", "discovered", "n_studies", "studies"):
        hits = [v for v in I.find_key(run or {}, key) if type(v) is int]
        if hits:
            found, source = hits[0], f"run.json ({key})"
            break
    if found is None:
        found = len(scored_ids | failed_ids) + scores.n_unusable
    return {
        "found": found,
        "found_source": source,
        "scored": len(scored_ids),
        "failed": len(failed_ids) if failures else None,
        "score_rows_unusable": scores.n_unusable,
        "labelled": len(labelled),
        "labels_missing": labels.n_missing_label,
        "labels_without_scores": len(labelled - scored_ids),
        "labels_without_scores_failed": len((labelled - scored_ids) & failed_ids),
        "scores_without_labels": len(scored_ids - labelled),
        "analysed": analysed,
    }


def _gallery(saliency_dir: Path | None, ids: list[str], y: np.ndarray, probs: np.ndarray,
             pred: np.ndarray, task: Task) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick a few studies per outcome and embed their saliency PNG montages."""
    if saliency_dir is None or not Path(saliency_dir).is_dir():
        return {"available": False, "cases": []}, []
    if task.positive is not None:
        pos = task.positive
        p = probs[:, pos]
        is_pos, said_pos = y == pos, pred == pos
        categories = [
            ("true positive", is_pos & said_pos, -p),
            ("false positive", ~is_pos & said_pos, -p),
            ("false negative", is_pos & ~said_pos, p),
            ("true negative", ~is_pos & ~said_pos, p),
        ]
    else:
        conf = probs.max(axis=1)
        categories = [("correct", pred == y, -conf), ("incorrect", pred != y, -conf)]
    cases, images = [], []
    for name, mask, key in categories:
        # most confident cases of each category first (stable for equal keys)
        order = [i for i in np.argsort(key, kind="mergesort") if mask[i]]
        taken = 0
        for i in order:
            if taken >= GALLERY_PER_CATEGORY:
                break
            folder = _saliency_folder(Path(saliency_dir), ids[i])
            if folder is None:
                continue
            pngs = []
            for png in sorted(folder.glob("*.png"))[:MAX_ROLES_PER_CASE]:
                if I.safe_child(folder, png.name) is None or not png.is_file():
                    continue
                try:
                    if png.stat().st_size > MAX_PNG_BYTES:
                        continue
                    data = png.read_bytes()
                except OSError:  # unreadable montage: leave it out of the gallery
                    continue
                if not data.startswith(_PNG_MAGIC):
                    continue
                pngs.append((png.stem, "data:image/png;base64," + base64.b64encode(data).decode()))
            if not pngs:
                continue
            taken += 1
            case = {
                "category": name,
                "study_key": display_id(ids[i]),
                "true": task.labels[int(y[i])],
                "predicted": task.labels[int(pred[i])],
                "probability": float(probs[i, int(pred[i])]),
                "roles": [role for role, _ in pngs],
            }
            cases.append(case)
            images.append({**case, "images": pngs})
    return {"available": True, "cases": cases}, images


def _model_card(model_dir: Path | None) -> dict[str, Any] | None:
    if model_dir is None:
        return None
    path = Path(model_dir) / "model.json"
    card = I.read_json(path, "model.json")
    if card is None:
        raise ReportInputError(
            "--model has no model.json; pass a folder written by `medfusion train`",
            code="REPORT_FILE_MISSING",
        )
    return card


def _card_section(card: dict[str, Any]) -> dict[str, Any]:
    labels = card.get("labels") or card.get("label_names")
    roles = card.get("roles")
    if roles is None and isinstance(card.get("role_specs"), dict):
        roles = sorted(card["role_specs"])
    return {
        "labels": labels,
        "roles": roles,
        "card_sha256": I.card_sha256(card),
        "content": _sanitise(card),
    }


def validation_report(
    scores: Path,
    labels: Path,
    out: Path,
    *,
    subgroups: Sequence[str] = (),
    compare: Path | None = None,
    model_dir: Path | None = None,
    saliency_dir: Path | None = None,
    positive_label: str | None = None,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    accept_model_mismatch: bool = False,
) -> dict:
    """Build the validation report of a scored batch against its labels.

    Writes ``out/report.json`` (every number; NaN written as null) and ``out/report.html``
    (one self-contained file, no external resources) and returns the report.json content.
    ``failures.csv`` and ``run.json`` are read from next to ``scores``; the saliency folder
    defaults to ``saliency/`` next to ``scores`` when present. Binary models: the positive
    class is ``positive_label``, else the non-"negative" label (see :func:`default_positive`),
    else the second label; decisions ``p >= threshold`` (0.5).
    Multiclass: one-vs-rest per class, macro summaries and argmax decisions unless a
    ``positive_label`` is given. Bad input raises :class:`ReportInputError`.

    The run audit compares run.json with ``model_dir``: when the model card or model.json
    digest recorded by the scoring run differs from the given model (the report would
    describe a model that did not produce the scores) nothing is written and
    ``REPORT_MODEL_MISMATCH`` is raised, unless ``accept_model_mismatch`` is set; the report
    then says so at the top. Every failed audit check is listed in ``audit_failures``.
    """
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or not (
        0 <= n_bootstrap <= 100_000
    ):
        raise ReportInputError("n_bootstrap must be an integer in 0..100000",
                               code="REPORT_BAD_VALUE")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReportInputError("seed must be a non-negative integer", code="REPORT_BAD_VALUE")
    if threshold is not None:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise ReportInputError("threshold must be a number strictly between 0 and 1",
                                   code="REPORT_BAD_VALUE") from None
    for name, value in (("scores", scores), ("labels", labels), ("out", out)):
        if not isinstance(value, (str, os.PathLike)):
            raise ReportInputError(f"{name} must be a path", code="REPORT_BAD_VALUE")
    if isinstance(subgroups, str):
        subgroups = subgroups.split(",")
    subgroups = list(dict.fromkeys(str(s).strip() for s in subgroups if str(s).strip()))
    scores_path = Path(scores)
    sc = I.read_scores(scores_path)
    card = _model_card(model_dir)
    notes: list[str] = list(sc.notes)
    failures = I.read_failures(scores_path.parent / "failures.csv")
    run = I.read_json(scores_path.parent / "run.json", "run.json")
    run_section = _run_section(run, card, model_dir, sc, failures)
    audit_failures = [c["check"] for c in (run_section or {}).get("checks", [])
                      if c["result"] != "pass"]
    model_mismatch = [c for c in audit_failures if c in (CARD_DIGEST_CHECK, FILE_DIGEST_CHECK)]
    if model_mismatch and not accept_model_mismatch:
        raise ReportInputError(
            "--model is not the model that produced these scores (run audit: "
            + "; ".join(f"{c}: FAIL" for c in model_mismatch)
            + "). Give the model folder the scoring run used, or accept the mismatch "
            "explicitly (--accept-model-mismatch); the report then says so at the top.",
            code="REPORT_MODEL_MISMATCH",
        )
    if model_mismatch:
        notes.insert(0, "the model card given with --model is NOT the model that produced "
                        "these scores (run audit failed; accepted with "
                        "--accept-model-mismatch).")
    if card is not None:
        card_labels = card.get("labels") or card.get("label_names")
        if isinstance(card_labels, list) and [str(x) for x in card_labels] != list(sc.labels):
            notes.append("model card labels differ from the prob_ columns of scores.csv; the "
                         "scores' column order is used.")
    task = _task(sc.labels, positive_label, threshold)
    lab = I.read_labels(Path(labels), sc.labels, subgroups)
    aliased = _align_label_ids(lab, sc.study_ids)
    if aliased:
        notes.append(f"{aliased} labels.csv rows name studies by their pseudonymous st- key "
                     "(as run.json does); matched to scores.csv through it.")
    idx = np.asarray([i for i, sid in enumerate(sc.study_ids) if sid in lab.truth], dtype=int)
    if len(idx) == 0:
        raise ReportInputError(
            f"no scored study has a label ({len(lab.truth)} studies with a non-empty label, "
            f"{len(sc.study_ids)} scored, none in common); labels.csv must use the study_id "
            "values written in scores.csv",
            code="REPORT_NO_OVERLAP",
        )
    ids = [sc.study_ids[i] for i in idx]
    probs = sc.probs[idx]
    y = np.asarray([lab.truth[s] for s in ids], dtype=int)
    clusters = _clusters(ids, lab.patients)
    extras = Extras(
        entropy=None if sc.entropy is None else sc.entropy[idx],
        prediction_sets=(
            None if sc.prediction_sets is None else [sc.prediction_sets[i] for i in idx]
        ),
        abstain=None if sc.abstain is None else sc.abstain[idx],
    )
    result = evaluate(probs, y, task, clusters=clusters, extras=extras,
                      n_bootstrap=n_bootstrap, seed=(seed, 0))
    notes.extend(result.pop("notes"))

    sub_out: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for c, column in enumerate(subgroups):
        values = [lab.subgroups[column][s] for s in ids]
        sub_out[column] = {}
        levels = sorted(set(values))
        if len(levels) > MAX_SUBGROUP_LEVELS:
            skipped[column] = (f"{len(levels)} levels (more than {MAX_SUBGROUP_LEVELS}); "
                               "group it into bands first")
            notes.append(f"subgroup column {column} skipped: {skipped[column]}.")
            continue
        for lv, level in enumerate(levels):
            mask = np.asarray([v == level for v in values])
            part = evaluate(probs[mask], y[mask], task, clusters=clusters[mask],
                            extras=extras.subset(np.flatnonzero(mask)),
                            n_bootstrap=n_bootstrap, seed=(seed, 1, c, lv), curves=False,
                            name=f"subgroup {column}={level}")
            notes.extend(part.pop("notes"))
            sub_out[column][level] = part

    comparison = None
    if compare is not None:
        other = I.read_scores(Path(compare), what="comparison scores")
        if set(other.labels) != set(sc.labels):
            raise ReportInputError(
                f"the comparison scores have labels {list(other.labels)}, not "
                f"{list(sc.labels)}; compare models of the same task",
                code="REPORT_COMPARE_MISMATCH",
            )
        order = [other.labels.index(lab_name) for lab_name in sc.labels]
        where = {sid: i for i, sid in enumerate(other.study_ids)}
        keep = np.asarray([k for k, sid in enumerate(ids) if sid in where], dtype=int)
        if len(keep) == 0:
            raise ReportInputError(
                "no analysed study appears in the comparison scores; compare runs over the "
                "same studies",
                code="REPORT_NO_OVERLAP",
            )
        probs_b = other.probs[[where[ids[k]] for k in keep]][:, order]
        comparison = compare_scores(probs[keep], probs_b, y[keep], task,
                                    clusters=clusters[keep], n_bootstrap=n_bootstrap,
                                    seed=(seed, 2))
        comparison["n_unmatched"] = int(len(ids) - len(keep))
        if comparison["n_unmatched"]:
            notes.append(f"comparison: {comparison['n_unmatched']} analysed studies are not in "
                         "the comparison scores; the comparison uses the matched studies only.")
        notes.extend(other.notes)

    cohort = _cohort(sc, lab, failures, run, len(ids))
    if cohort["labels_without_scores"]:
        notes.append(f"{cohort['labels_without_scores']} labelled studies have no score "
                     f"({cohort['labels_without_scores_failed']} of them failed); excluded.")
    if cohort["scores_without_labels"]:
        notes.append(f"{cohort['scores_without_labels']} scored studies have no label; "
                     "excluded.")
    if saliency_dir is None and (scores_path.parent / "saliency").is_dir():
        saliency_dir = scores_path.parent / "saliency"
    gallery, gallery_images = _gallery(saliency_dir, ids, y, probs, task.predict(probs), task)

    import matplotlib
    import scipy
    import sklearn

    report: dict[str, Any] = {
        "schema": "medfusion.validation_report/1",
        "labels": list(sc.labels),
        "task": "binary" if len(sc.labels) == 2 else "multiclass",
        **result,
        "subgroups": sub_out,
        "subgroups_skipped": skipped,
        "comparison": comparison,
        "cohort": cohort,
        "failures": None if failures is None else {
            k: v for k, v in failures.items() if k != "study_ids"
        },
        "model_card": None if card is None else _card_section(card),
        "run": run_section,
        "audit_failures": audit_failures,
        "saliency": gallery,
        "inputs": {
            "optional_columns": [c for c in ("entropy", "prediction_set", "abstain")
                                 if c in sc.columns],
            "patient_level": bool(lab.patients),
        },
        "settings": {
            "n_bootstrap": n_bootstrap,
            "seed": seed,
            "ci_level": 0.95,
            "ece_bins": 10,
            "calibration_logit_clip": 1e-6,
            "subgroup_columns": list(subgroups),
        },
        "definitions": _definitions(task),
        "versions": {
            "medfusion": __version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__,
            "matplotlib": matplotlib.__version__,
        },
        "notes": notes,
    }
    if comparison is None:
        report.pop("comparison")
    report["checklist"] = build_checklist(report)
    report = _json_safe(report)

    html = render_html(report, gallery_images)
    out_dir = _prepare_out(Path(out))
    _write_atomic(out_dir / "report.json",
                  (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    _write_atomic(out_dir / "report.html", html.encode("utf-8"))
    return report


def _align_label_ids(lab: I.Labels, scored_ids: Sequence[str]) -> int:
    """Let labels.csv name studies by their ``st-`` key (what run.json and logs show) as well
    as by the study id of scores.csv: rename such rows in place; returns how many."""
    scored = set(scored_ids)
    by_key = {display_id(sid): sid for sid in scored_ids}
    renamed = 0
    for old in [sid for sid in lab.truth if sid not in scored and sid in by_key]:
        new = by_key[old]
        if new in lab.truth:  # both spellings given: keep the study id's row
            continue
        lab.truth[new] = lab.truth.pop(old)
        if old in lab.patients:
            lab.patients[new] = lab.patients.pop(old)
        for column in lab.subgroups.values():
            if old in column:
                column[new] = column.pop(old)
        renamed += 1
    return renamed


def _definitions(task: Task) -> dict[str, str]:
    """How each headline number is defined, so it can be recomputed independently."""
    multi = task.positive is None
    return {
        "positive_label": "none: macro over classes" if multi else (
            "--positive-label, else the label that is not a negative name (normal, negative, "
            "benign, healthy, control, 0, ...), else the second label"),
        "threshold": "argmax" if multi else "decision: p(positive) >= threshold",
        "auroc": "sklearn roc_auc_score" + (", one-vs-rest per class, macro mean" if multi
                                            else " on p(positive)"),
        "auprc": "sklearn average_precision_score" + (", one-vs-rest, macro mean" if multi
                                                      else " on p(positive)"),
        "ci": "auroc/auprc/brier/ece: percentile patient bootstrap (patient_id clusters); "
              "auroc.delong: DeLong normal interval; proportions: Wilson score",
        "brier": "multiclass Brier: mean of sum_k (p_k - y_k)^2" if multi else
                 "sklearn brier_score_loss on p(positive)",
        "ece": ("top-label" if multi else "p(positive) vs outcome")
               + ": 10 equal-width bins [k/10, (k+1)/10), last bin closed, "
                 "sum_b n_b/n |mean(p) - mean(y)|",
        "ece_top_label": "confidence = max probability, correct = argmax/threshold decision "
                         "right, same bins",
        "adaptive_ece": "10 equal-mass bins of sorted p (numpy array_split)",
        "calibration": "logistic regression y ~ a + b logit(p), p clipped to [1e-6, 1-1e-6]; "
                       "intercept_slope1: a with b fixed at 1",
        "aurc": "mean selective risk over coverages k/n, ranked by max probability",
    }


def _clusters(ids: list[str], patients: dict[str, str]) -> np.ndarray:
    """Cluster index per analysed study: its patient, or itself when no patient_id is given."""
    keys = [("p", patients[s]) if s in patients else ("s", s) for s in ids]
    index: dict[tuple[str, str], int] = {}
    return np.asarray([index.setdefault(k, len(index)) for k in keys], dtype=int)

