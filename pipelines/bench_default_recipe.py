"""AdrenalMNIST3D through the command line with the **default recipe**, as a new user runs it.

The official splits are written as NIfTI studies of role ``ct`` (1.5 mm voxels, the
dataset's values 0/255 as they come) with a manifest; then, as separate processes,

    medfusion train recipe.yaml --manifest manifest.csv --out model       # default recipe
    medfusion predict model --manifest test.csv --out predictions.csv

and the test predictions are scored beside the published MedMNIST v2 baselines: AUROC,
accuracy (argmax of the calibrated probabilities, as `predict` decides), ECE (10 equal-width
bins of p(hyperplasia)), the training wall time, the calibration the trainer chose and the
warnings it printed. The recipe is exactly ``labels`` + ``modalities: {ct: {}}``.

    .venv/bin/python pipelines/bench_default_recipe.py               # 28^3
    .venv/bin/python pipelines/bench_default_recipe.py --size 64
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adrenal import BASELINES, LABELS, data_path, load_splits, write_dataset  # noqa: E402

RECIPE = "labels: [normal, hyperplasia]\nmodalities:\n  ct: {}\n"
SPACING_MM = 1.5


def write_studies(splits: dict[str, tuple[np.ndarray, np.ndarray]], root: Path,
                  limit: int | None) -> tuple[Path, Path]:
    """Role ``ct`` NIfTI studies (1.5 mm, values 0/255 as shipped) with manifest.csv (all
    splits, the official ``split`` column), and test.csv (the test split only, for predict)."""
    manifest = write_dataset(splits, root, role="ct", limit=limit, spacing_mm=SPACING_MM,
                             raw_values=True)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = root / "test.csv"
    with test.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if r["split"] == "test")
    return manifest, test


def ece_binary(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    return float(sum(np.mean(which == b) * abs(p[which == b].mean() - y[which == b].mean())
                     for b in range(bins) if np.any(which == b)))


def ece_noise_floor(p: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Mean and 95th percentile of the ECE that perfectly calibrated probabilities ``p`` would
    show on a test split of this size (labels drawn from ``p`` itself): the floor below which
    a measured ECE says nothing."""
    rng = np.random.default_rng(seed)
    sims = [ece_binary(p, (rng.random(len(p)) < p).astype(int)) for _ in range(draws)]
    return float(np.mean(sims)), float(np.percentile(sims, 95))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, choices=(28, 64), default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="studies per split (smoke)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--normalization", default=None,
                        help="also set modalities.ct.normalization (e.g. mr, as the CT-preset "
                             "warning advises for these 0/255 masks); default: the recipe as is")
    parser.add_argument("--recipe-extra", default="",
                        help="YAML lines appended to the recipe, e.g. 'ema_epochs: 2' (the "
                             "run is then not the default recipe; the output says so)")
    parser.add_argument("--tag", default="", help="suffix of the model and prediction names")
    args = parser.parse_args(argv)
    if not data_path(args.size).is_file():
        print(f"AdrenalMNIST3D not found at {data_path(args.size)}", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="adrenal_default_"))
    data = work / f"data{args.size}"
    manifest, test = write_studies(load_splits(args.size), data, args.limit)
    recipe = RECIPE if args.normalization is None else RECIPE.replace(
        "ct: {}", f"ct: {{normalization: {args.normalization}}}")
    if args.recipe_extra:
        recipe += args.recipe_extra.replace("\\n", "\n").rstrip("\n") + "\n"
    (work / "recipe.yaml").write_text(recipe)
    variant = ("" if args.normalization is None else f"-{args.normalization}") + args.tag
    model = work / f"model{args.size}-seed{args.seed}{variant}"
    medfusion = [sys.executable, "-m", "medfusion.cli"]
    env = {**os.environ, "MEDFUSION_CACHE_DIR": str(work / "cache")}
    t0 = time.perf_counter()
    train = subprocess.run([*medfusion, "train", str(work / "recipe.yaml"), "--manifest",
                            str(manifest), "--out", str(model), "--seed", str(args.seed),
                            "--overwrite"], env=env, capture_output=True, text=True)
    t_train = time.perf_counter() - t0
    print(train.stdout[-6000:])
    if train.returncode != 0:
        print(train.stderr[-3000:], file=sys.stderr)
        return 1
    t1 = time.perf_counter()
    pred_csv = work / f"pred{args.size}-seed{args.seed}{variant}.csv"
    predict = subprocess.run([*medfusion, "predict", str(model), "--manifest", str(test),
                              "--out", str(pred_csv)], env=env, capture_output=True, text=True)
    t_predict = time.perf_counter() - t1
    if predict.returncode != 0:
        print(predict.stderr[-3000:], file=sys.stderr)
        return 1
    from sklearn.metrics import roc_auc_score

    with pred_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    truth = {r["study_id"]: r["label"] for r in csv.DictReader(test.open(newline=""))}
    y = np.array([truth[r["study_id"]] == LABELS[1] for r in rows], dtype=int)
    p = np.array([float(r[f"prob_{LABELS[1]}"]) for r in rows])
    decided = np.array([r["predicted"] == LABELS[1] for r in rows], dtype=int)
    card = json.loads((model / "model.json").read_text())
    scaler = card["calibration"]["temperature"]
    print(f"\nAdrenalMNIST3D {args.size}^3 through `medfusion train` + `medfusion predict`, "
          f"recipe {recipe!r}, seed {args.seed}, test n={len(y)} (positive rate {y.mean():.3f})")
    print(f"training {t_train / 60:.1f} min wall (incl. preprocessing and start-up), "
          f"prediction {t_predict:.0f} s; kept epoch "
          f"{card['members'][0].get('best_epoch')} of {card['recipe']['epochs']}; calibration "
          f"{scaler.get('kind')} T={scaler['temperature']:.3f} bias={scaler.get('bias')}")
    print(f"{'model':<28}{'AUC':>7}{'ACC':>7}{'ECE':>7}")
    for name, b_auc, b_acc in BASELINES:
        print(f"{name:<28}{b_auc:>7.3f}{b_acc:>7.3f}{'':>7}")
    print(f"{'medfusion default (this run)':<28}{roc_auc_score(y, p):>7.3f}"
          f"{np.mean(decided == y):>7.3f}{ece_binary(p, y):>7.3f}")
    floor, floor95 = ece_noise_floor(p)
    print(f"ECE of these probabilities were they perfectly calibrated (n={len(p)}, 2000 draws): "
          f"mean {floor:.3f}, 95th percentile {floor95:.3f}")
    for warning in card["training"].get("warnings", []):
        print(f"card warning: {warning}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
