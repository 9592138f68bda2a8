"""Every number of the report for one cohort (or one subgroup), as a JSON-ready dict.

Pure computation on arrays (no files, no plotting): :func:`evaluate` composes the metrics of
:mod:`medfusion.report.metrics` into the report's structure, sharing one set of patient-level
bootstrap replicates between all bootstrapped statistics of a cohort.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from sklearn import metrics as skm
from threadpoolctl import threadpool_limits

from medfusion.report import metrics as M

SMALL_N = 30
_F = TypeVar("_F", bound=Callable[..., Any])


def _one_blas_thread(fn: _F) -> _F:
    """Run ``fn`` with a single BLAS thread: the bootstrap's skinny matrix-vector products
    are ~100x slower when two BLAS threads contend for a busy CPU (measured: 13 ms vs
    0.13 ms for a 200 x 5000 product), and one thread keeps results bit-stable."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Task:
    """What is being evaluated and how decisions are made.

    ``positive`` is the index of the positive class for a binary (or one-vs-rest) task, or
    None for a multiclass summary with argmax decisions. ``threshold`` applies to the positive
    class probability (decision: p >= threshold); None means argmax.
    """

    labels: tuple[str, ...]
    positive: int | None
    threshold: float | None

    @property
    def multiclass(self) -> bool:
        return len(self.labels) > 2

    def decision_rule(self) -> str:
        if self.positive is None:
            return "argmax of the calibrated probabilities"
        return f"p({self.labels[self.positive]}) >= {self.threshold:g}"

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class index per study under this task's decision rule."""
        argmax = np.argmax(probs, axis=1)
        if self.positive is None:
            return argmax
        positive = probs[:, self.positive] >= self.threshold
        if not self.multiclass:
            return np.where(positive, self.positive, 1 - self.positive)
        # One-vs-rest on a multiclass model: below threshold, the best other class.
        others = probs.copy()
        others[:, self.positive] = -np.inf
        return np.where(positive, self.positive, np.argmax(others, axis=1))


@dataclass(frozen=True)
class Extras:
    """Optional per-study columns of scores.csv (None when the column is absent)."""

    entropy: np.ndarray | None = None
    prediction_sets: list[frozenset[int] | None] | None = None
    abstain: np.ndarray | None = None

    def subset(self, idx: np.ndarray) -> Extras:
        sets = None
        if self.prediction_sets is not None:
            sets = [self.prediction_sets[i] for i in idx]
        return Extras(
            entropy=None if self.entropy is None else self.entropy[idx],
            prediction_sets=sets,
            abstain=None if self.abstain is None else self.abstain[idx],
        )


def _interval(value: float, low: float, high: float, method: str, valid: int | None) -> dict:
    out = {"value": value, "ci_low": low, "ci_high": high, "ci_method": method}
    if valid is not None:
        out["n_bootstrap_valid"] = valid
    return out


def _boot(value: float, reps: np.ndarray | None) -> dict:
    if reps is None:
        return _interval(value, math.nan, math.nan, "none", None)
    if not math.isfinite(value):
        return _interval(value, math.nan, math.nan, "patient bootstrap (percentile)", 0)
    low, high, valid = M.percentile_interval(reps)
    return _interval(value, low, high, "patient bootstrap (percentile)", valid)


def _replicates(
    y_index: np.ndarray,
    probs: np.ndarray,
    pred: np.ndarray,
    clusters: np.ndarray,
    classes: Sequence[int],
    multiclass: bool,
    n_bootstrap: int,
    seed: Sequence[int],
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of every resampled statistic, one pass over shared weights."""
    if n_bootstrap <= 0 or len(y_index) == 0:
        return {}
    prepared = {}
    for k in classes:
        y = (y_index == k).astype(np.float64)
        p = probs[:, k].astype(np.float64)
        prepared[k] = (y, p, M._Ranked.of(y, p), (p - y) ** 2)
    n_classes = probs.shape[1]
    onehot = np.eye(n_classes)[y_index]
    sq_multi = np.sum((probs - onehot) ** 2, axis=1)
    top_conf = probs.max(axis=1)
    top_correct = (pred == y_index).astype(np.float64)
    chunks: dict[str, list[np.ndarray]] = {}

    def add(key: str, value: np.ndarray) -> None:
        chunks.setdefault(key, []).append(value)

    for w in M.bootstrap_weights(clusters, n_bootstrap, seed):
        total = w.sum(axis=1)
        for k, (y, p, ranked, sq) in prepared.items():
            grouped = ranked.grouped(w)  # shared by AUROC and AP
            add(f"auroc/{k}", M.weighted_auroc(ranked, w, grouped))
            add(f"auprc/{k}", M.weighted_average_precision(ranked, w, grouped))
            add(f"brier/{k}", (w @ sq) / total)
            add(f"ece/{k}", M.weighted_ece(y, p, w))
        if multiclass:
            add("brier/multiclass", (w @ sq_multi) / total)
            add("ece/top_label", M.weighted_ece(top_correct, top_conf, w))
            recalls = []
            for k in range(n_classes):
                in_k = (y_index == k).astype(np.float64)
                hit = in_k * (pred == k)
                with np.errstate(invalid="ignore", divide="ignore"):
                    recalls.append((w @ hit) / (w @ in_k))
            add("balanced_accuracy", np.mean(recalls, axis=0))
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def _class_block(
    y: np.ndarray,
    p: np.ndarray,
    decision: np.ndarray,
    reps: dict[str, np.ndarray],
    k: int,
    curves: bool,
    notes: list[str],
    name: str,
) -> dict:
    """All binary (one-vs-rest) metrics for one class."""
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    both = n_pos > 0 and n_neg > 0
    if not both:
        undefined = "AUROC, AUPRC" if n_pos == 0 else "AUROC"
        notes.append(
            f"{name}: {undefined} and calibration slope undefined "
            f"({n_pos} positive, {n_neg} negative studies)."
        )
    auroc = skm.roc_auc_score(y, p) if both else math.nan
    auprc = skm.average_precision_score(y, p) if n_pos > 0 else math.nan
    auroc_block = _boot(float(auroc), reps.get(f"auroc/{k}"))
    delong = M.delong_auc(y, p) if both else {**M._nan_interval(), "se": math.nan}
    auroc_block["delong"] = {
        "ci_low": delong["ci_low"],
        "ci_high": delong["ci_high"],
        "se": delong["se"],
    }
    ece, table = M.expected_calibration_error(y, p, 10)
    block = {
        "n": int(len(y)),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "prevalence": n_pos / len(y) if len(y) else math.nan,
        "auroc": auroc_block,
        "auprc": _boot(float(auprc), reps.get(f"auprc/{k}")),
        "brier": M.brier(y, p),
        "brier_ci": _boot(M.brier(y, p), reps.get(f"brier/{k}")),
        "ece": ece,
        "ece_ci": _boot(ece, reps.get(f"ece/{k}")),
        "adaptive_ece": M.adaptive_calibration_error(y, p, 10),
        "calibration": M.calibration_fit(y, p),
        "reliability": table,
        **M.threshold_metrics(y, decision),
    }
    if curves:
        block["decision_curve"] = M.decision_curve(y, p)
        if both:
            fpr, tpr, _ = skm.roc_curve(y, p)
            prec, rec, _ = skm.precision_recall_curve(y, p)
            block["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
            block["pr_curve"] = {"recall": rec.tolist(), "precision": prec.tolist()}
    else:
        block["decision_curve"] = M.decision_curve(y, p, np.round(np.arange(0.05, 1.0, 0.05), 2))
    return block


def _conformal(
    y_index: np.ndarray, sets: list[frozenset[int] | None], labels: Sequence[str]
) -> dict:
    """Empirical coverage and mean set size of the conformal prediction sets, per true class."""
    valid = [i for i, s in enumerate(sets) if s is not None]
    if not valid:
        return {"available": False}

    def summary(idx: list[int]) -> dict:
        covered = sum(int(y_index[i]) in sets[i] for i in idx)  # type: ignore[operator]
        sizes = [len(sets[i]) for i in idx]  # type: ignore[arg-type]
        return {
            "n": len(idx),
            "coverage": M.proportion(covered, len(idx)),
            "mean_set_size": float(np.mean(sizes)) if sizes else math.nan,
            "empty_sets": int(sum(s == 0 for s in sizes)),
            "singletons": int(sum(s == 1 for s in sizes)),
        }

    per_class = {
        label: summary([i for i in valid if int(y_index[i]) == k]) for k, label in enumerate(labels)
    }
    return {"available": True, **summary(valid), "per_class": per_class}


def _abstention(y_index: np.ndarray, pred: np.ndarray, abstain: np.ndarray) -> dict:
    correct = pred == y_index
    kept = ~abstain
    return {
        "n_abstained": int(abstain.sum()),
        "coverage": M.proportion(int(kept.sum()), len(abstain)),
        "accuracy_kept": M.proportion(int((correct & kept).sum()), int(kept.sum())),
        "accuracy_abstained": M.proportion(int((correct & abstain).sum()), int(abstain.sum())),
    }


@_one_blas_thread
def evaluate(
    probs: np.ndarray,
    y_index: np.ndarray,
    task: Task,
    *,
    clusters: np.ndarray | None = None,
    extras: Extras | None = None,
    n_bootstrap: int = 1000,
    seed: Sequence[int] = (0,),
    curves: bool = True,
    name: str = "cohort",
) -> dict:
    """Every metric of the report for studies with probabilities ``probs`` (n, K) and true
    class indices ``y_index`` (n,). Never raises on small or one-class data: undefined values
    are nan and explained in ``notes``."""
    extras = extras or Extras()
    n, n_classes = probs.shape
    clusters = np.arange(n) if clusters is None else cluster_compact(clusters)
    notes: list[str] = []
    pred = task.predict(probs) if n else np.zeros(0, dtype=int)
    classes = list(range(n_classes)) if task.multiclass else [task.positive]  # type: ignore[list-item]
    if task.positive is not None and task.positive not in classes:
        classes.append(task.positive)
    reps = _replicates(
        y_index, probs, pred, clusters, classes, task.multiclass, n_bootstrap, seed
    )
    out: dict = {
        "n": int(n),
        "n_patients": int(len(np.unique(clusters))) if n else 0,
        "class_counts": {lab: int(np.sum(y_index == k)) for k, lab in enumerate(task.labels)},
        "decision_rule": task.decision_rule(),
        "threshold": task.threshold if task.positive is not None else None,
    }
    if n < SMALL_N:
        notes.append(f"{name}: only {n} studies; intervals are wide and estimates unstable.")

    per_class = {}
    for k in classes:
        y = (y_index == k).astype(int)
        decision = pred == k
        label = task.labels[k]
        per_class[label] = _class_block(
            y, probs[:, k], decision, reps, k, curves, notes, f"{name} / {label}"
        )
    if task.positive is not None:
        primary = per_class[task.labels[task.positive]]
        out["positive_label"] = task.labels[task.positive]
        out.update({key: value for key, value in primary.items() if key not in out})
        # "ece" is on p(positive) (as torchmetrics' binary calibration error); the top-label
        # variant (confidence = max probability, as Guo et al. 2017) is given beside it.
        correct = (pred == y_index).astype(float)
        out["ece_top_label"] = M.expected_calibration_error(
            correct, probs.max(axis=1) if n else np.zeros(0), 10
        )[0]
    else:
        out["positive_label"] = None
        out.update(_multiclass_summary(probs, y_index, pred, per_class, reps, notes, name))
    if task.multiclass:
        out["per_class"] = per_class
        out["multiclass_brier"] = M.multiclass_brier(y_index, probs)
    out["confusion_matrix"] = {
        "labels": list(task.labels),
        "rows": "true label",
        "columns": "predicted label",
        "matrix": skm.confusion_matrix(y_index, pred, labels=list(range(n_classes))).tolist()
        if n
        else [[0] * n_classes for _ in range(n_classes)],
    }
    correct = pred == y_index
    out["accuracy"] = M.proportion(int(correct.sum()), n)
    out["risk_coverage"] = {
        "by": "max calibrated probability",
        **M.risk_coverage(correct, probs.max(axis=1) if n else np.zeros(0), 101 if curves else 21),
    }
    if extras.entropy is not None and np.all(np.isfinite(extras.entropy)):
        out["risk_coverage_entropy"] = {
            "by": "entropy column (lower = more confident)",
            **M.risk_coverage(correct, -extras.entropy, 101 if curves else 21),
        }
    if extras.abstain is not None:
        out["abstention"] = _abstention(y_index, pred, extras.abstain)
    if extras.prediction_sets is not None:
        out["conformal"] = _conformal(y_index, extras.prediction_sets, task.labels)
    out["notes"] = notes
    return out


def _multiclass_summary(
    probs: np.ndarray,
    y_index: np.ndarray,
    pred: np.ndarray,
    per_class: dict,
    reps: dict[str, np.ndarray],
    notes: list[str],
    name: str,
) -> dict:
    """Top-level numbers of a multiclass task: macro one-vs-rest AUROC/AUPRC, multiclass Brier,
    top-label ECE, macro sensitivity (balanced accuracy) and macro specificity."""
    labels = list(per_class)
    k = len(labels)

    def macro(key: str) -> float:
        values = [per_class[lab][key]["value"] for lab in labels]
        return float(np.mean(values)) if all(math.isfinite(v) for v in values) else math.nan

    def macro_reps(prefix: str) -> np.ndarray | None:
        parts = [reps.get(f"{prefix}/{i}") for i in range(k)]
        if any(part is None for part in parts):
            return None
        return np.mean(np.vstack(parts), axis=0)  # nan if any class is undefined

    correct = (pred == y_index).astype(float)
    top_conf = probs.max(axis=1)
    ece_top, table = M.expected_calibration_error(correct, top_conf, 10)
    sens = macro("sensitivity")
    spec = macro("specificity")
    none = "none (macro average)"
    out = {
        "auroc": _boot(macro("auroc"), macro_reps("auroc")),
        "auprc": _boot(macro("auprc"), macro_reps("auprc")),
        "brier": M.multiclass_brier(y_index, probs),
        "brier_ci": _boot(M.multiclass_brier(y_index, probs), reps.get("brier/multiclass")),
        "ece": ece_top,
        "ece_ci": _boot(ece_top, reps.get("ece/top_label")),
        "adaptive_ece": M.adaptive_calibration_error(correct, top_conf, 10),
        "calibration": M.calibration_fit(correct, top_conf),
        "reliability": table,
        "sensitivity": _boot(sens, reps.get("balanced_accuracy")),
        "specificity": {**_boot(spec, None), "ci_method": none},
        "ppv": {**_boot(macro("ppv"), None), "ci_method": none},
        "npv": {**_boot(macro("npv"), None), "ci_method": none},
        "averaging": (
            "macro over classes, one-vs-rest; brier = multiclass Brier (sum over classes, "
            "range 0-2); ece / reliability / calibration on the top-label confidence; "
            "sensitivity = macro recall (balanced accuracy)"
        ),
    }
    out["auroc"]["delong"] = {"ci_low": math.nan, "ci_high": math.nan, "se": math.nan}
    out["auroc"]["note"] = "macro average; DeLong intervals are per class (per_class)"
    return out


def cluster_compact(clusters: np.ndarray) -> np.ndarray:
    """Relabel cluster ids to 0..c-1 (a subset may have lost some patients)."""
    _, inverse = np.unique(clusters, return_inverse=True)
    return inverse.reshape(-1)


@_one_blas_thread
def compare(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    y_index: np.ndarray,
    task: Task,
    *,
    clusters: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: Sequence[int] = (0,),
) -> dict:
    """Paired comparison of two score sets on the same studies: DeLong test of each
    one-vs-rest AUROC and a paired patient-bootstrap interval of the AUROC difference."""
    n, n_classes = probs_a.shape
    clusters = np.arange(n) if clusters is None else cluster_compact(clusters)
    classes = list(range(n_classes)) if task.multiclass else [task.positive]
    per_class = {}
    diffs: dict[int, list[np.ndarray]] = {k: [] for k in classes}
    ranked = {}
    for k in classes:
        y = (y_index == k).astype(np.float64)
        ranked[k] = (M._Ranked.of(y, probs_a[:, k]), M._Ranked.of(y, probs_b[:, k]))
    if n_bootstrap > 0 and n > 0:
        for w in M.bootstrap_weights(clusters, n_bootstrap, seed):
            for k in classes:
                ra, rb = ranked[k]
                diffs[k].append(M.weighted_auroc(ra, w) - M.weighted_auroc(rb, w))
    for k in classes:
        y = (y_index == k).astype(int)
        test = M.delong_paired_test(y, probs_a[:, k], probs_b[:, k])
        reps = np.concatenate(diffs[k]) if diffs[k] else np.zeros(0)
        if math.isfinite(test["difference"]) and len(reps):
            low, high, valid = M.percentile_interval(reps)
        else:
            low, high, valid = math.nan, math.nan, 0
        test["bootstrap_ci_low"], test["bootstrap_ci_high"] = low, high
        test["n_bootstrap_valid"] = valid
        per_class[task.labels[k]] = test
    out: dict = {"n_matched": int(n)}
    if task.positive is not None:
        out.update(per_class[task.labels[task.positive]])
        out["positive_label"] = task.labels[task.positive]
    else:
        values_a = [per_class[task.labels[k]]["auroc_a"] for k in classes]
        values_b = [per_class[task.labels[k]]["auroc_b"] for k in classes]
        macro = np.vstack([np.concatenate(diffs[k]) for k in classes]).mean(axis=0) if all(
            diffs[k] for k in classes
        ) else np.zeros(0)
        diff = float(np.mean(values_a) - np.mean(values_b))
        low, high, valid = M.percentile_interval(macro) if len(macro) else (math.nan,) * 2 + (0,)
        out.update(
            auroc_a=float(np.mean(values_a)),
            auroc_b=float(np.mean(values_b)),
            difference=diff,
            bootstrap_ci_low=low,
            bootstrap_ci_high=high,
            n_bootstrap_valid=valid,
            note="macro one-vs-rest AUROC; DeLong tests are per class (per_class)",
        )
    if task.multiclass:
        out["per_class"] = per_class
    return out
