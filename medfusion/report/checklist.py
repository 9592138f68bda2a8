"""A TRIPOD+AI / CLAIM reporting checklist, filled only where the data can answer.

Items are paraphrased topics of TRIPOD+AI (Collins et al., BMJ 2024) and CLAIM 2024 (Tejani
et al., Radiol Artif Intell 2024); consult the published lists for the wording and numbering.
An item is either ``auto`` (the evidence comes from the scores, labels, model card or run
audit and is shown) or ``needs a person``: the report never marks an item complete, because
only an author can vouch for design, ethics, data provenance and interpretation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

AUTO = "auto"
PERSON = "needs a person"

Evidence = Callable[[dict[str, Any]], str | None]


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, (int, float)) and math.isfinite(float(x)):
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return "n/a"


def _sample(r: dict[str, Any]) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in r["class_counts"].items())
    return f"{r['n']} studies from {r['n_patients']} patients analysed ({counts})."


def _flow(r: dict[str, Any]) -> str:
    c = r["cohort"]
    return (
        f"found {_fmt(c.get('found'))}, scored {c['scored']}, failed {_fmt(c.get('failed'))}, "
        f"labels without scores {c['labels_without_scores']}, scores without labels "
        f"{c['scores_without_labels']}, analysed {c['analysed']}."
    )


def _missing(r: dict[str, Any]) -> str:
    c = r["cohort"]
    failures = r.get("failures") or {}
    codes = ", ".join(f"{k}: {v}" for k, v in (failures.get("by_code") or {}).items())
    return (
        f"Studies without a score ({c['labels_without_scores']} labelled) or without a label "
        f"({c['scores_without_labels']} scored, {c['labels_missing']} empty label cells) are "
        f"excluded (complete-case analysis). Failures by code: {codes or 'none recorded'}."
    )


def _performance(r: dict[str, Any]) -> str:
    a = r["auroc"]
    d = a.get("delong") or {}
    delong = (
        f"DeLong {_fmt(d.get('ci_low'))}-{_fmt(d.get('ci_high'))}"
        if d.get("ci_low") is not None
        else "DeLong per class"
    )
    return (
        f"AUROC {_fmt(a['value'])} (95% CI {_fmt(a['ci_low'])}-{_fmt(a['ci_high'])}, "
        f"patient bootstrap; {delong}), AUPRC {_fmt(r['auprc']['value'])}, Brier "
        f"{_fmt(r['brier'])}, ECE {_fmt(r['ece'])}, calibration slope "
        f"{_fmt(r['calibration']['slope'])}, sensitivity {_fmt(r['sensitivity']['value'])}, "
        f"specificity {_fmt(r['specificity']['value'])} at {r['decision_rule']}."
    )


def _uncertainty(r: dict[str, Any]) -> str:
    return (
        f"95% intervals: patient-level bootstrap ({r['settings']['n_bootstrap']} replicates, "
        f"seed {r['settings']['seed']}) for AUROC/AUPRC/Brier/ECE, DeLong for AUROC, Wilson "
        "for proportions; paired DeLong test for model comparison."
    )


def _subgroups(r: dict[str, Any]) -> str | None:
    if not r.get("subgroups"):
        return None
    parts = [f"{col} ({len(levels)} levels)" for col, levels in r["subgroups"].items()]
    return "Every metric reported per level of: " + ", ".join(parts) + "."


def _model(r: dict[str, Any]) -> str | None:
    card = r.get("model_card")
    if not card:
        return None
    return (
        f"Model card read (labels {card.get('labels')}, roles {card.get('roles')}); card "
        f"SHA-256 {card.get('card_sha256', 'n/a')[:16]}..."
    )


def _software(r: dict[str, Any]) -> str:
    versions = r.get("versions", {})
    run = r.get("run") or {}
    text = ", ".join(f"{k} {v}" for k, v in versions.items())
    if run.get("versions"):
        text += "; scoring run: " + ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    return text


def _threshold(r: dict[str, Any]) -> str:
    return (
        f"Decision rule: {r['decision_rule']}. Whether it was fixed before these data were "
        "seen must be stated by an author."
    )


def _comparison(r: dict[str, Any]) -> str | None:
    c = r.get("comparison")
    if not c:
        return None
    return (
        f"Compared with a second scores file on {c['n_matched']} matched studies: AUROC "
        f"difference {_fmt(c['difference'])} (DeLong p = {_fmt(c.get('p_value'), 4)})."
    )


def _explain(r: dict[str, Any]) -> str | None:
    g = r.get("saliency") or {}
    if not g.get("cases"):
        return None
    return f"{len(g['cases'])} saliency montages shown (true/false positives/negatives)."


def _conformal(r: dict[str, Any]) -> str | None:
    c = r.get("conformal")
    if not c or not c.get("available"):
        return None
    return (
        f"Conformal sets: coverage {_fmt(c['coverage']['value'])}, mean set size "
        f"{_fmt(c['mean_set_size'])}."
    )


# (guideline, topic, evidence function or None = always a person's call)
ITEMS: list[tuple[str, str, Evidence | None]] = [
    ("TRIPOD+AI", "Title/abstract identify the study as evaluating an AI prediction model", None),
    ("TRIPOD+AI", "Background, objectives and intended use (setting, users, patients)", None),
    ("TRIPOD+AI", "Source of data, study design, dates and setting", None),
    ("TRIPOD+AI", "Eligibility criteria of participants", None),
    ("TRIPOD+AI", "Outcome definition and how and when it was assessed (blinded?)", None),
    ("TRIPOD+AI", "Sample size and number of outcome events", _sample),
    ("TRIPOD+AI", "Handling of missing data and failed inputs", _missing),
    ("TRIPOD+AI", "Model specification (predictors, architecture, version)", _model),
    ("TRIPOD+AI", "Performance measures: discrimination and calibration with CIs", _performance),
    ("TRIPOD+AI", "Clinical utility (decision curve / net benefit)", lambda r: (
        "Decision curve reported against treat-all and treat-none."
        if r.get("decision_curve") else None)),
    ("TRIPOD+AI", "Fairness: performance across subgroups", _subgroups),
    ("TRIPOD+AI", "Flow of participants", _flow),
    ("TRIPOD+AI", "Ethics approval and consent", None),
    ("TRIPOD+AI", "Funding and conflicts of interest", None),
    ("TRIPOD+AI", "Protocol / registration", None),
    ("TRIPOD+AI", "Patient and public involvement", None),
    ("TRIPOD+AI", "Data and code availability", None),
    ("TRIPOD+AI", "Interpretation, limitations and implications for practice", None),
    ("CLAIM", "Reference standard (ground truth) definition and rationale", None),
    ("CLAIM", "Annotators: number, qualifications, inter-reader variability", None),
    ("CLAIM", "De-identification of data and handling of identifiers", None),
    ("CLAIM", "Data partitions: independence of test data from training (patient level)", None),
    ("CLAIM", "Software libraries, frameworks and versions", _software),
    ("CLAIM", "Operating threshold and how it was chosen", _threshold),
    ("CLAIM", "Metrics of model performance", _performance),
    ("CLAIM", "Statistical measures of significance and uncertainty", _uncertainty),
    ("CLAIM", "Comparison with a baseline or other models", _comparison),
    ("CLAIM", "Uncertainty quantification of individual predictions", _conformal),
    ("CLAIM", "Methods for explainability or interpretability", _explain),
    ("CLAIM", "Validation on external data (different sites/scanners)", None),
    ("CLAIM", "Failure analysis of incorrectly classified cases", None),
]


def build_checklist(report: dict[str, Any]) -> list[dict[str, str]]:
    """One row per item: guideline, topic, status (``auto`` or ``needs a person``), evidence.

    ``auto`` rows state what the data shows; an author must still confirm them. Items the
    data cannot answer, or whose evidence is absent from this run, need a person.
    """
    rows = []
    for guideline, topic, evidence in ITEMS:
        text = None
        if evidence is not None:
            try:
                text = evidence(report)
            except (KeyError, TypeError, ValueError):
                text = None  # a section that was not computed: a person fills it
        rows.append(
            {
                "guideline": guideline,
                "topic": topic,
                "status": AUTO if text else PERSON,
                "evidence": text or "",
            }
        )
    return rows
