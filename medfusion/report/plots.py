"""Report figures as self-contained ``data:image/png;base64`` URIs.

Figures are drawn on matplotlib's Agg canvas through the object API (no pyplot global state,
safe in threads and without a display). PNG metadata is stripped so that a report built twice
from the same inputs is byte-identical and carries no software banner.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

_COLOURS = ["#1f5f99", "#c2571a", "#2e8b57", "#8e44ad", "#b03a48", "#6b6b6b"]


def _figure(width: float = 4.6, height: float = 3.6) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, color="#dddddd", linewidth=0.6)
    return fig, ax


def to_data_uri(fig: Figure) -> str:
    """The figure as a base64 PNG data URI (no metadata: deterministic bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def roc_plot(curves: dict[str, dict], title: str = "ROC curve") -> str:
    """ROC curves (one per label) from ``{"label": {"fpr": [...], "tpr": [...], "auc": x}}``."""
    fig, ax = _figure()
    for i, (label, c) in enumerate(curves.items()):
        auc = c.get("auc", math.nan)
        ax.step(c["fpr"], c["tpr"], where="post", color=_COLOURS[i % 6],
                label=f"{label} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=title)
    ax.legend(loc="lower right", fontsize=7)
    return to_data_uri(fig)


def pr_plot(curves: dict[str, dict], title: str = "Precision-recall curve") -> str:
    fig, ax = _figure()
    for i, (label, c) in enumerate(curves.items()):
        ax.step(c["recall"], c["precision"], where="post", color=_COLOURS[i % 6],
                label=f"{label} (AUPRC {c.get('ap', math.nan):.3f})")
        ax.axhline(c.get("prevalence", math.nan), color=_COLOURS[i % 6], linestyle=":",
                   linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=title)
    ax.legend(loc="lower left", fontsize=7)
    return to_data_uri(fig)


def reliability_plot(table: Sequence[dict], title: str, xlabel: str) -> str:
    """Observed frequency (Wilson 95% CI) against mean predicted probability per bin, with
    the bin counts as a histogram underneath."""
    fig = Figure(figsize=(4.6, 4.2), dpi=100, layout="constrained")
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=0.8, label="ideal")
    if table:
        x = np.array([r["mean_predicted"] for r in table])
        y = np.array([r["observed"] for r in table])
        low = np.array([r["observed_ci_low"] for r in table])
        high = np.array([r["observed_ci_high"] for r in table])
        yerr = [np.clip(y - low, 0, None), np.clip(high - y, 0, None)]
        ax.errorbar(x, y, yerr=yerr, fmt="o-", color=_COLOURS[0], capsize=2, markersize=4,
                    label="observed (95% CI)")
        centres = [(r["bin_low"] + r["bin_high"]) / 2 for r in table]
        hist.bar(centres, [r["n"] for r in table], width=0.09, color=_COLOURS[0], alpha=0.6)
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed frequency", title=title)
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel=xlabel, ylabel="studies")
    return to_data_uri(fig)


def decision_curve_plot(curves: dict[str, dict]) -> str:
    """Net benefit of the model (solid) and of treating all (dashed) per positive class."""
    fig, ax = _figure()
    top = 0.05
    t = np.zeros(0)
    for i, (label, curve) in enumerate(curves.items()):
        t = np.asarray(curve["thresholds"])
        model = np.asarray(curve["model"], dtype=float)
        treat_all = np.asarray(curve["treat_all"], dtype=float)
        colour = _COLOURS[i % 6]
        name = "model" if len(curves) == 1 else f"model: {label}"
        ax.plot(t, model, color=colour, label=name)
        ax.plot(t, treat_all, color=colour if len(curves) > 1 else _COLOURS[1], linestyle="--",
                label="treat all" if len(curves) == 1 else f"treat all: {label}")
        if len(t):
            top = max(top, float(np.nanmax(np.r_[model, treat_all, 0.0])))
    ax.plot(t, np.zeros_like(t), color="#555555", linestyle=":", label="treat none")
    label = next(iter(curves)) if len(curves) == 1 else "class, one vs rest"
    ax.set(xlim=(0, 1), ylim=(-0.05 * top, top * 1.1),
           xlabel=f"threshold probability ({label})", ylabel="net benefit",
           title="Decision curve")
    ax.legend(loc="upper right", fontsize=7)
    return to_data_uri(fig)


def risk_coverage_plot(curves: dict[str, dict]) -> str:
    fig, ax = _figure()
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(c["coverage"], c["risk"], color=_COLOURS[i % 6],
                label=f"{name} (AURC {c['aurc']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage (share of studies kept)",
           ylabel="selective risk (error rate)", title="Risk-coverage")
    ax.legend(loc="upper left", fontsize=7)
    return to_data_uri(fig)


def forest_plot(rows: Sequence[tuple[str, float, float, float, int]], overall: float) -> str:
    """AUROC with 95% CI per subgroup level: rows are (name, value, low, high, n)."""
    height = 1.2 + 0.28 * max(len(rows), 1)
    fig, ax = _figure(5.6, height)
    ys = np.arange(len(rows))[::-1]
    for y, (_, value, low, high, _) in zip(ys, rows, strict=True):
        if math.isfinite(value):
            if math.isfinite(low) and math.isfinite(high):
                ax.plot([low, high], [y, y], color=_COLOURS[0], linewidth=1.4)
            ax.plot([value], [y], "s", color=_COLOURS[0], markersize=5)
    if math.isfinite(overall):
        ax.axvline(overall, color=_COLOURS[1], linestyle="--", linewidth=0.9, label="overall")
        ax.legend(loc="lower left", fontsize=7)
    ax.axvline(0.5, color="#999999", linestyle=":", linewidth=0.8)
    ax.set_yticks(ys, [f"{name} (n={n})" for name, _, _, _, n in rows], fontsize=7)
    lows = [r[2] for r in rows if math.isfinite(r[2])] + [r[1] for r in rows if math.isfinite(r[1])]
    left = max(0.0, min(0.5, min(lows, default=0.5) - 0.05))
    ax.set(xlim=(left, 1), xlabel="AUROC (95% CI)", title="AUROC by subgroup")
    return to_data_uri(fig)
