"""A synthetic scored batch in the exact layout ``medfusion score`` writes, with labels.

For tests, benchmarks and the documentation's runnable example: ``scores.csv`` (fixed
``%.6f`` floats, calibrated and raw probabilities, entropy, conformal sets, abstain flags),
``failures.csv``, ``run.json``, optional saliency PNG montages, and a ``labels.csv`` with
``patient_id`` (two studies per patient) and ``site`` / ``sex`` subgroup columns.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a small CSV (header + rows) as UTF-8."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_batch(
    root: str | Path,
    n: int = 240,
    labels: Sequence[str] = ("normal", "lesion"),
    *,
    seed: int = 0,
    strength: float = 1.5,
    explain: bool = False,
    patient_prefix: str = "p",
    id_prefix: str = "s-",
    set_threshold: float = 0.15,
) -> dict[str, Any]:
    """Write ``root/OUT/{scores.csv,failures.csv,run.json[,saliency/]}`` and
    ``root/labels.csv``. ``strength`` sets how far the true class's logit is shifted (0 =
    a useless model). Two failures are recorded; one failed study also has a label.

    Returns the paths and the true class indices / probabilities written (for checks).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = tuple(labels)
    k = len(labels)
    out = root / "OUT"
    out.mkdir(parents=True, exist_ok=True)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += strength
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 6)  # 6 decimals, as older batches wrote them
    ids = [f"{id_prefix}{i:08x}" for i in range(n)]
    header = ["study_id", "status", "predicted", *[f"prob_{lab}" for lab in labels],
              *[f"raw_prob_{lab}" for lab in labels], "entropy", "mutual_info",
              "prediction_set", "abstain", "modalities_used", "weight_ct", "flags"]
    if explain:
        header.append("saliency_ct")
    rows = []
    for i in range(n):
        ent = float(-(probs[i] * np.log(np.clip(probs[i], 1e-12, 1))).sum())
        pset = "|".join(lab for j, lab in enumerate(labels) if probs[i, j] > set_threshold)
        row = [ids[i], "scored", labels[int(np.argmax(probs[i]))],
               *[f"{v:.6f}" for v in probs[i]], *[f"{v:.6f}" for v in probs[i]],
               f"{ent:.6f}", "0.000000", pset, "true" if probs[i].max() < 0.45 else "false",
               "ct", "1.000000", ""]
        if explain:
            row.append(f"saliency/{ids[i]}/ct.png")
        rows.append(row)
    write_csv(out / "scores.csv", header, rows)
    write_csv(out / "failures.csv", ["study_id", "stage", "code", "message"],
              [["s-failed01", "load", "MISSING_SLICES", "a slice is missing"],
               ["s-failed02", "load", "NOT_DICOM", "no DICOM found"]])
    (out / "run.json").write_text(json.dumps({
        "versions": {"medfusion": "0.1.0"},
        "model": {"card_sha256": "0" * 64, "labels": list(labels)},
        "totals": {"found": n + 2, "scored": n, "failed": 2},
    }, indent=2))
    label_rows = [[ids[i], labels[y[i]], f"{patient_prefix}-{i // 2}", ["A", "B", "C"][i % 3],
                   ["F", "M"][int(rng.integers(0, 2))]] for i in range(n)]
    label_rows.append(["s-failed01", labels[0], f"{patient_prefix}-failed", "A", "F"])
    write_csv(root / "labels.csv", ["study_id", "label", "patient_id", "site", "sex"],
              label_rows)
    if explain:
        from matplotlib import image as mpimg

        for i in range(n):
            folder = out / "saliency" / ids[i]
            folder.mkdir(parents=True, exist_ok=True)
            mpimg.imsave(folder / "ct.png", rng.uniform(size=(16, 16)), cmap="magma")
    return {"out": out, "scores": out / "scores.csv", "labels": root / "labels.csv",
            "y": y, "probs": probs, "ids": ids}
