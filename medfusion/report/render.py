"""report.json content -> one self-contained HTML page.

Everything is inline: CSS in a <style> block, figures as base64 PNG data URIs, no script at
all. A Content-Security-Policy meta tag forbids any network fetch, so the page renders the
same offline as online. Every text from the inputs goes through ``html.escape``.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

from medfusion.report import plots

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0;color:#1d2733;background:#f6f7f9;line-height:1.45}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px;background:#fff}
.audit-failed{border:2px solid #b3261e;background:#fdecea;color:#5f1410;padding:10px 14px;
margin:14px 0;border-radius:4px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;border-bottom:2px solid #1f5f99;
padding-bottom:3px;margin-top:34px}h3{font-size:1.05em;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:.88em}
th,td{border:1px solid #d5dae0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #d5dae0;border-radius:6px;padding:8px 12px;min-width:150px;
background:#fbfcfd}
.card .v{font-size:1.35em;font-weight:600}.card .l{font-size:.8em;color:#55606b}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{border:1px solid #e3e6ea;max-width:100%}
.note{color:#55606b;font-size:.88em}.warn{color:#9a3b00}
.person{color:#9a3b00;font-weight:600}.auto{color:#1d6b3a;font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:14px}.case{border:1px solid #d5dae0;padding:6px;
border-radius:6px;max-width:330px;font-size:.82em}
.case img{max-width:320px;display:block;margin:4px 0}
code{background:#eef2f6;padding:0 3px;border-radius:3px}
details{margin:8px 0}summary{cursor:pointer;color:#1f5f99}
"""

# No network at all: images only from data: URIs, styles only inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _f(x: Any) -> float:
    """A float for plotting: None (a JSON null) becomes nan."""
    return math.nan if x is None else float(x)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _e(text: Any) -> str:
    """Escaped text; control characters (invalid in HTML) dropped."""
    return html.escape(_CONTROL.sub("", str(text)), quote=True)


def _n(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"
    return _e(x)


def _ci(block: dict | None, digits: int = 3) -> str:
    """``value [low, high]`` of an interval block."""
    if not block:
        return "n/a"
    value = _n(block.get("value"), digits)
    low, high = block.get("ci_low"), block.get("ci_high")
    if low is None or high is None:
        return value
    return f"{value} [{_n(low, digits)}, {_n(high, digits)}]"


def _prop(block: dict | None) -> str:
    if not block:
        return "n/a"
    return f"{_ci(block)} ({block.get('numerator', '?')}/{block.get('denominator', '?')})"


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _cards(r: dict) -> str:
    items = [
        ("studies analysed", _n(r["n"])),
        ("AUROC [95% CI]", _ci(r["auroc"])),
        ("AUPRC [95% CI]", _ci(r["auprc"])),
        ("sensitivity", _ci(r["sensitivity"])),
        ("specificity", _ci(r["specificity"])),
        ("Brier", _n(r["brier"])),
        ("ECE (10 bins)", _n(r["ece"])),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{v}</div><div class="l">{_e(k)}</div></div>'
        for k, v in items
    ) + "</div>"


def _discrimination(r: dict) -> str:
    classes = r.get("per_class") or {r["positive_label"]: r}
    rows = []
    for label, b in classes.items():
        d = b["auroc"].get("delong", {})
        rows.append([
            _e(label), _n(b["n_positive"]), _n(b["n_negative"]), _ci(b["auroc"]),
            f"[{_n(d.get('ci_low'))}, {_n(d.get('ci_high'))}]", _ci(b["auprc"]),
        ])
    out = _table(["class (vs rest)", "positives", "negatives", "AUROC [bootstrap 95% CI]",
                  "AUROC DeLong 95% CI", "AUPRC [bootstrap 95% CI]"], rows)
    if r.get("per_class"):
        out += (f"<p>Macro average over classes: AUROC {_ci(r['auroc'])}, AUPRC "
                f"{_ci(r['auprc'])}.</p>")
    roc = {lab: {**b["roc_curve"], "auc": _f(b["auroc"]["value"])}
           for lab, b in classes.items() if b.get("roc_curve")}
    pr = {lab: {**b["pr_curve"], "ap": _f(b["auprc"]["value"]), "prevalence": _f(b["prevalence"])}
          for lab, b in classes.items() if b.get("pr_curve")}
    figs = []
    if roc:
        figs.append(_img(plots.roc_plot(roc), "ROC curve"))
    if pr:
        figs.append(_img(plots.pr_plot(pr), "precision-recall curve"))
    return out + f'<div class="figs">{"".join(figs)}</div>'


def _threshold(r: dict) -> str:
    out = f"<p>Decision rule: <code>{_e(r['decision_rule'])}</code>.</p>"
    if r.get("positive_label"):
        rows = [[_e(name), _prop(r.get(key))] for name, key in (
            ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("PPV", "ppv"),
            ("NPV", "npv"), ("accuracy", "accuracy"))]
        out += _table(["measure", "value [Wilson 95% CI] (count)"], rows)
    else:
        rows = [["macro sensitivity (balanced accuracy)", _ci(r["sensitivity"]),
                 "patient bootstrap"],
                ["macro specificity", _ci(r["specificity"]), "none"],
                ["macro PPV", _ci(r.get("ppv")), "none"],
                ["macro NPV", _ci(r.get("npv")), "none"],
                ["accuracy", _prop(r["accuracy"]), "Wilson"]]
        out += _table(["measure", "value [95% CI]", "interval"], rows)
    if r.get("per_class"):
        rows = [[_e(lab), _prop(b["sensitivity"]), _prop(b["specificity"]), _prop(b["ppv"]),
                 _prop(b["npv"])] for lab, b in r["per_class"].items()]
        out += "<h3>Per class (one vs rest)</h3>" + _table(
            ["class", "sensitivity", "specificity", "PPV", "NPV"], rows)
    cm = r["confusion_matrix"]
    header = ["true \\ predicted", *cm["labels"]]
    pairs = zip(cm["labels"], cm["matrix"], strict=True)
    rows = [[_e(lab), *[_n(v) for v in row]] for lab, row in pairs]
    return out + "<h3>Confusion matrix</h3>" + _table(header, rows)


def _calibration(r: dict) -> str:
    cal = r["calibration"]
    rows = [
        ["Brier score", _ci({**(r.get("brier_ci") or {}), "value": r["brier"]})],
        ["ECE (10 equal-width bins)", _ci({**(r.get("ece_ci") or {}), "value": r["ece"]})],
        ["adaptive ECE (10 equal-mass bins)", _n(r["adaptive_ece"])],
        ["calibration slope (ideal 1)", _n(cal["slope"])],
        ["calibration intercept (joint fit, ideal 0)", _n(cal["intercept"])],
        ["calibration-in-the-large (slope fixed at 1)", _n(cal["intercept_slope1"])],
    ]
    if r.get("multiclass_brier") is not None and r.get("positive_label"):
        rows.append(["multiclass Brier (sum over classes)", _n(r["multiclass_brier"])])
    what = (f"p({r['positive_label']})" if r.get("positive_label")
            else "top-label confidence")
    out = _table(["measure", "value [bootstrap 95% CI]"], rows)
    out += (f'<p class="note">Computed on {_e(what)}. Slope and intercept come from a '
            "logistic regression of the outcome on logit(p) (p clipped to [1e-6, 1-1e-6]).</p>")
    fig = plots.reliability_plot(r["reliability"], "Reliability diagram", _e(what))
    return out + f'<div class="figs">{_img(fig, "reliability diagram")}</div>'


def _utility(r: dict) -> str:
    if r.get("decision_curve"):
        curves = {r["positive_label"]: r["decision_curve"]}
    else:  # multiclass without a positive class: one-vs-rest curve per class
        curves = {lab: b["decision_curve"] for lab, b in (r.get("per_class") or {}).items()
                  if b.get("decision_curve")}
    if not curves:
        return "<p>No decision curve could be computed.</p>"
    fig = plots.decision_curve_plot(curves)
    rows = []
    for label, curve in curves.items():
        picks = [i for i, t in enumerate(curve["thresholds"]) if round(t * 100) % 10 == 0]
        rows += [[_e(label), _n(curve["thresholds"][i], 2), _n(curve["model"][i], 4),
                  _n(curve["treat_all"][i], 4)] for i in picks]
    note = ("" if r.get("decision_curve") else
            '<p class="note">No positive class was named: one-vs-rest curves per class '
            "(net benefit of treating when p(class) >= threshold).</p>")
    return (note + f'<div class="figs">{_img(fig, "decision curve")}</div>'
            + _table(["positive class", "threshold", "net benefit (model)",
                      "net benefit (treat all)"], rows, 1))


def _uncertainty(r: dict) -> str:
    curves = {"max probability": r["risk_coverage"]}
    if r.get("risk_coverage_entropy"):
        curves["entropy"] = r["risk_coverage_entropy"]
    out = f'<div class="figs">{_img(plots.risk_coverage_plot(curves), "risk-coverage")}</div>'
    rows = [[_e(name), _n(c["aurc"], 4),
             *[_n(c["risk_at_coverage"].get(k), 4) for k in ("0.50", "0.80", "0.90", "1.00")]]
            for name, c in curves.items()]
    out += _table(["ranked by", "AURC", "risk @50%", "risk @80%", "risk @90%", "risk @100%"],
                  rows)
    ab = r.get("abstention")
    if ab:
        out += (f"<p>Abstention flag: {ab['n_abstained']} studies abstained; accuracy on kept "
                f"{_prop(ab['accuracy_kept'])}, on abstained "
                f"{_prop(ab['accuracy_abstained'])}.</p>")
    conf = r.get("conformal")
    if conf and conf.get("available"):
        rows = [["all", _n(conf["n"]), _prop(conf["coverage"]), _n(conf["mean_set_size"]),
                 _n(conf["empty_sets"])]]
        rows += [[_e(lab), _n(c["n"]), _prop(c["coverage"]), _n(c["mean_set_size"]),
                  _n(c["empty_sets"])] for lab, c in conf["per_class"].items()]
        out += "<h3>Conformal prediction sets</h3>" + _table(
            ["true class", "n", "coverage [Wilson 95% CI]", "mean set size", "empty sets"], rows)
    else:
        out += "<p>No <code>prediction_set</code> column: conformal section skipped.</p>"
    return out


def _subgroups(r: dict) -> str:
    if not r.get("subgroups"):
        return "<p>No subgroup columns requested (use <code>--subgroups col1,col2</code>).</p>"
    out = []
    for column, levels in r["subgroups"].items():
        rows, forest = [], []
        for level, b in levels.items():
            cal = b.get("calibration") or {}
            positives = (_n(b["n_positive"]) if "n_positive" in b else
                         ", ".join(f"{_e(k)}: {v}" for k, v in b["class_counts"].items()))
            rows.append([
                _e(level), _n(b["n"]), positives, _ci(b["auroc"]),
                _ci(b["auprc"]), _ci(b["sensitivity"]), _ci(b["specificity"]),
                _ci(b.get("ppv")), _ci(b.get("npv")), _n(b["brier"]), _n(b["ece"]),
                _n(cal.get("slope")),
            ])
            a = b["auroc"]
            forest.append((_CONTROL.sub("", level), _f(a.get("value")), _f(a.get("ci_low")),
                           _f(a.get("ci_high")), b["n"]))
        out.append(f"<h3>{_e(column)}</h3>")
        counts = "positives" if r.get("positive_label") else "per class"
        out.append(_table(["level", "n", counts, "AUROC", "AUPRC", "sensitivity",
                           "specificity", "PPV", "NPV", "Brier", "ECE", "cal. slope"], rows))
        fig = plots.forest_plot(forest, _f(r["auroc"]["value"]))
        out.append(f'<div class="figs">{_img(fig, "AUROC by subgroup")}</div>')
    out.append('<p class="note">Intervals: patient bootstrap for AUROC/AUPRC, Wilson for '
               "proportions. Levels with few studies or one class get n/a, never a guess; see "
               "Notes.</p>")
    return "".join(out)


def _comparison(r: dict) -> str:
    c = r.get("comparison")
    if not c:
        return "<p>No comparison file given (use <code>--compare other_scores.csv</code>).</p>"
    rows = [["studies matched", _n(c["n_matched"])],
            ["analysed studies missing from the comparison file", _n(c.get("n_unmatched"))],
            ["AUROC (this model)", _n(c["auroc_a"])],
            ["AUROC (comparison)", _n(c["auroc_b"])],
            ["difference", _n(c["difference"])],
            ["difference, DeLong 95% CI", f"[{_n(c.get('ci_low'))}, {_n(c.get('ci_high'))}]"],
            ["difference, paired bootstrap 95% CI",
             f"[{_n(c.get('bootstrap_ci_low'))}, {_n(c.get('bootstrap_ci_high'))}]"],
            ["paired DeLong test p-value", _n(c.get("p_value"), 4)]]
    out = _table(["", "value"], rows)
    if c.get("per_class"):
        rows = [[_e(lab), _n(t["auroc_a"]), _n(t["auroc_b"]), _n(t["difference"]),
                 _n(t["p_value"], 4)] for lab, t in c["per_class"].items()]
        out += _table(["class (vs rest)", "AUROC", "AUROC (comparison)", "difference",
                       "DeLong p"], rows)
    return out


def _flow(r: dict) -> str:
    c = r["cohort"]
    rows = [[_e(k.replace("_", " ")), _n(v)] for k, v in c.items()]
    out = _table(["cohort flow", "count"], rows)
    f = r.get("failures")
    if f:
        rows = [[_e(code), _n(n)] for code, n in f["by_code"].items()]
        out += "<h3>Failures by code</h3>" + _table(["code", "studies"], rows)
        rows = [[_e(stage), _n(n)] for stage, n in f["by_stage"].items()]
        out += _table(["stage", "studies"], rows)
    else:
        out += "<p>No failures.csv next to scores.csv.</p>"
    return out


def _gallery(r: dict, images: list[dict]) -> str:
    if not images:
        return "<p>No saliency montages found (score with <code>--explain</code>).</p>"
    cases = []
    for case in images:
        imgs = "".join(f"<div>{_e(role)}</div>{_img(uri, role)}" for role, uri in case["images"])
        cases.append(
            f'<div class="case"><b>{_e(case["category"])}</b><br>study '
            f"<code>{_e(case['study_key'])}</code><br>true {_e(case['true'])}, predicted "
            f"{_e(case['predicted'])} (p={_n(case['probability'])}){imgs}</div>")
    return f'<div class="gallery">{"".join(cases)}</div>'


def _kv(data: Any, depth: int = 0) -> str:
    if isinstance(data, dict):
        if not data:
            return "{}"
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_kv(v, depth + 1)}</td></tr>"
                       for k, v in data.items())
        return f"<table>{rows}</table>"
    if isinstance(data, list):
        if all(not isinstance(v, (dict, list)) for v in data):
            return _e(", ".join(str(v) for v in data))
        return "".join(_kv(v, depth + 1) for v in data)
    return _n(data, 4) if isinstance(data, float) else _e(data)


def _card_summary(card: dict) -> dict:
    """The few card entries a reviewer looks for first (whatever exists of them)."""
    content = card.get("content") or {}
    summary: dict = {"labels": card.get("labels"), "roles": card.get("roles"),
                     "card SHA-256": card.get("card_sha256")}
    for key in ("medfusion_version", "weights_sha256", "metrics"):
        if key in content:
            summary[key] = content[key]
    recipe = content.get("recipe")
    if isinstance(recipe, dict):
        summary["recipe"] = {k: recipe[k] for k in ("encoder", "fusion", "epochs", "ensemble",
                                                     "modality_dropout") if k in recipe}
    calibration = content.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("temperature"), dict):
        summary["temperature"] = calibration["temperature"].get("temperature")
    return summary


def _card(r: dict) -> str:
    out = []
    card = r.get("model_card")
    if card:
        out.append(_kv(_card_summary(card)))
        # <details> folds the full card without any script
        out.append(f"<details><summary>Full model card</summary>{_kv(card['content'])}</details>")
    else:
        out.append("<p>No model package given (use <code>--model MODEL_DIR</code>).</p>")
    run = r.get("run")
    out.append("<h3>Run audit</h3>")
    if run:
        if run["checks"]:
            out.append(_table(["check", "result"],
                              [[_e(c["check"]), _e(c["result"])] for c in run["checks"]], 2))
        if run.get("versions"):
            out.append("<p>Versions of the scoring run:</p>" + _kv(run["versions"]))
        out.append(f"<details><summary>Full run.json (identifiers and paths withheld)</summary>"
                   f"{_kv(run['summary'])}</details>")
    else:
        out.append("<p>No run.json next to scores.csv.</p>")
    return "".join(out)


def _checklist(r: dict) -> str:
    rows = []
    for item in r["checklist"]:
        cls = "auto" if item["status"] == "auto" else "person"
        rows.append([_e(item["guideline"]), _e(item["topic"]),
                     f'<span class="{cls}">{_e(item["status"])}</span>', _e(item["evidence"])])
    return ('<p class="note">"auto" items are filled from the data and still need an author\'s '
            'confirmation; no item is ever marked complete automatically.</p>'
            + _table(["guideline", "item", "status", "evidence"], rows, 9))


def _methods(r: dict) -> str:
    s = r["settings"]
    notes = "".join(f"<li>{_e(n)}</li>" for n in r.get("notes", [])) or "<li>none</li>"
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in r["versions"].items())
    return (
        "<ul>"
        f"<li>95% intervals: patient-level bootstrap ({s['n_bootstrap']} replicates, seed "
        f"{s['seed']}, percentile; patients from <code>patient_id</code> when given, else each "
        "study) for AUROC, AUPRC, Brier and ECE; DeLong (Sun &amp; Xu 2014 midrank algorithm) "
        "for AUROC; Wilson score intervals for sensitivity, specificity, PPV, NPV, accuracy "
        "and coverage.</li>"
        "<li>AUROC and AUPRC (average precision) as in scikit-learn; multiclass: one-vs-rest per "
        "class, macro average.</li>"
        "<li>ECE: 10 equal-width bins, sum of |mean p - observed| weighted by bin share; adaptive "
        "ECE: 10 equal-mass bins.</li>"
        "<li>Decision curve: net benefit = TP/n - FP/n x t/(1-t).</li>"
        "<li>Risk-coverage: studies ranked by confidence, AURC = mean selective risk over "
        "coverages k/n.</li>"
        f"<li>Software: {versions}.</li></ul>"
        f"<h3>Notes</h3><ul>{notes}</ul>"
    )


def render_html(report: dict, gallery_images: list[dict]) -> str:
    """The whole report as one HTML document (no scripts, no external resources)."""
    r = report
    kind = "binary" if r["task"] == "binary" else f"{len(r['labels'])}-class"
    sections = [
        ("summary", "Summary", _cards(r) + (
            f"<p>{_e(kind)} task, labels {_e(', '.join(r['labels']))}; positive class "
            f"{_e(r.get('positive_label') or 'none (macro over classes)')}; decision rule "
            f"<code>{_e(r['decision_rule'])}</code>; {r['n']} studies from {r['n_patients']} "
            "patients.</p>")),
        ("flow", "Cohort flow and failures", _flow(r)),
        ("discrimination", "Discrimination", _discrimination(r)),
        ("threshold", "At the operating threshold", _threshold(r)),
        ("calibration", "Calibration", _calibration(r)),
        ("utility", "Clinical utility", _utility(r)),
        ("uncertainty", "Uncertainty and selective prediction", _uncertainty(r)),
        ("subgroups", "Subgroups", _subgroups(r)),
        ("comparison", "Comparison", _comparison(r)),
        ("saliency", "Saliency gallery", _gallery(r, gallery_images)),
        ("model", "Model card and run audit", _card(r)),
        ("checklist", "TRIPOD+AI / CLAIM checklist", _checklist(r)),
        ("methods", "Methods and notes", _methods(r)),
    ]
    toc = " · ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>'
                   for sid, title, content in sections)
    failed = r.get("audit_failures") or []
    if failed:
        # A failed audit changes how every number below must be read: say it first.
        body = (
            '<div class="audit-failed" role="alert"><strong>Run audit failed.</strong> '
            "The files given do not agree with the scoring run: "
            + "; ".join(_e(c) for c in failed)
            + ' (see <a href="#model">the run audit</a>).</div>' + body
        )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>medfusion validation report</title>"
        f"<style>{_CSS}</style></head><body><main>"
        "<h1>Validation report</h1>"
        f'<p class="note">medfusion {_e(r["versions"]["medfusion"])} · {toc}</p>'
        f"{body}</main></body></html>\n"
    )
