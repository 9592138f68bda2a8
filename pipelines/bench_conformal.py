"""Do the prediction sets hold their coverage on held-out studies? Through the command line.

Two cohorts, each trained with ``medfusion train`` (default recipe) and predicted with
``medfusion predict`` on its **test split only** (studies no training, selection or
calibration step saw):

* ``lesion``: synthetic anisotropic CT volumes (40x40x24 voxels of 0.9x0.9x2.5 mm) with a
  planted lesion deciding the label, 360 train / 80 validation / 120 test studies (grouped
  by patient), written as NIfTI by ``medfusion.testing.synthetic.write_cohort``;
* ``adrenal``: AdrenalMNIST3D, official splits (1188 / 98 / 298), as in
  ``bench_default_recipe.py`` (role ``ct``, 1.5 mm, values 0/255).

For alpha in 0.05, 0.1 and 0.2 it prints

* the model's own sets (``predict --alpha A``: calibration scores stored in the card):
  coverage on the test split, mean set size, empty-set rate, abstention rate;
* 10 random calibration/test halvings of the test split's calibrated probabilities
  (``ConformalPredictor`` refitted on one half, measured on the other): mean and minimum
  coverage, mean set size, empty-set rate.

The bound to meet is ``1 - alpha - 0.02``; the abstention rate is reported beside the test
AUROC (an accurate model should rarely abstain on its own distribution).

    .venv/bin/python pipelines/bench_conformal.py --cohort lesion
    .venv/bin/python pipelines/bench_conformal.py --cohort adrenal --workdir /tmp/bdr
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ALPHAS = (0.05, 0.1, 0.2)
SPLITS = 10
LESION_RECIPE = "labels: [normal, abnormal]\nmodalities:\n  ct: {}\n"


def lesion_cohort(root: Path, seed: int) -> tuple[Path, Path, tuple[str, str]]:
    """560 studies, splits reassigned per patient to 360 / 80 / 120."""
    from medfusion.testing.synthetic import write_cohort

    cohort = write_cohort(root, 560, seed=seed, roles=("ct",), formats={"ct": "nifti"})
    with cohort.manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    patients = sorted({r["patient_id"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    split_of, counts = {}, {"test": 0, "val": 0}
    size = {p: sum(r["patient_id"] == p for r in rows) for p in patients}
    for k in order:
        patient = patients[k]
        if counts["test"] < 120:
            split_of[patient] = "test"
        elif counts["val"] < 80:
            split_of[patient] = "val"
        else:
            split_of[patient] = "train"
        if split_of[patient] in counts:
            counts[split_of[patient]] += size[patient]
    for r in rows:
        r["split"] = split_of[r["patient_id"]]
    for name, keep in (("manifest.csv", rows),
                       ("test.csv", [r for r in rows if r["split"] == "test"])):
        with (root / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(keep)
    (root / "recipe.yaml").write_text(LESION_RECIPE)
    return root / "manifest.csv", root / "test.csv", ("normal", "abnormal")


def adrenal_cohort(root: Path) -> tuple[Path, Path, tuple[str, str]]:
    from bench_adrenal import LABELS, load_splits
    from bench_default_recipe import RECIPE, write_studies

    manifest, test = write_studies(load_splits(28), root, None)
    (root / "recipe.yaml").write_text(RECIPE)
    return manifest, test, tuple(LABELS)  # type: ignore[return-value]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", choices=("lesion", "adrenal"), default="lesion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None,
                        help="reuse a model trained on this cohort's manifest")
    args = parser.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    from medfusion.uncertainty.conformal import ConformalPredictor

    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"conformal_{args.cohort}_"))
    data = work / f"conformal_{args.cohort}"
    data.mkdir(parents=True, exist_ok=True)
    if args.cohort == "lesion":
        manifest, test, labels = lesion_cohort(data, args.seed)
    else:
        manifest, test, labels = adrenal_cohort(data)
    cli = [sys.executable, "-m", "medfusion.cli"]
    env = {**os.environ, "MEDFUSION_CACHE_DIR": str(work / "cache")}
    model = args.model or work / f"model_{args.cohort}_seed{args.seed}"
    if args.model is None:
        run = subprocess.run([*cli, "train", str(data / "recipe.yaml"), "--manifest",
                              str(manifest), "--out", str(model), "--seed", str(args.seed),
                              "--overwrite", "--quiet"], env=env, capture_output=True,
                             text=True)
        if run.returncode:
            print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
            return 1
        print(run.stdout[-1500:])
    truth = {r["study_id"]: labels.index(r["label"]) for r in _read(test)}
    print(f"{args.cohort}: test split n={len(truth)}, model {model}")
    print(f"{'alpha':>6} | {'own sets: cover':>15} {'size':>5} {'empty':>6} {'abstain':>7} | "
          f"{'10 halvings: cover':>18} {'min':>6} {'size':>5} {'empty':>6} | bound")
    auc = None
    for alpha in ALPHAS:
        out = work / f"pred_{args.cohort}_{alpha}.csv"
        run = subprocess.run([*cli, "predict", str(model), "--manifest", str(test), "--out",
                              str(out), "--alpha", str(alpha)], env=env, capture_output=True,
                             text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        rows = [r for r in _read(out) if not r.get("error")]
        y = np.array([truth[r["study_id"]] for r in rows])
        probs = np.array([[float(r[f"prob_{lab}"]) for lab in labels] for r in rows])
        sets = [[labels.index(s) for s in r["prediction_set"].split("|") if s] for r in rows]
        own_cover = np.mean([yi in s for yi, s in zip(y, sets, strict=True)])
        own_size = np.mean([len(s) for s in sets])
        own_empty = np.mean([len(s) == 0 for s in sets])
        abstain = np.mean([r["abstain"] == "true" for r in rows])
        auc = roc_auc_score(y, probs[:, 1])
        covers, sizes, empties = [], [], []
        for k in range(SPLITS):
            perm = np.random.default_rng(1000 + k).permutation(len(y))
            cal, held = perm[: len(y) // 2], perm[len(y) // 2:]
            cp = ConformalPredictor("lac").fit(probs[cal], y[cal])
            got = cp.prediction_sets(probs[held], alpha=alpha)
            covers.append(np.mean([yi in s for yi, s in zip(y[held], got, strict=True)]))
            sizes.append(np.mean([len(s) for s in got]))
            empties.append(np.mean([len(s) == 0 for s in got]))
        print(f"{alpha:>6} | {own_cover:>15.3f} {own_size:>5.2f} {own_empty:>6.3f} "
              f"{abstain:>7.3f} | {np.mean(covers):>18.3f} {np.min(covers):>6.3f} "
              f"{np.mean(sizes):>5.2f} {np.mean(empties):>6.3f} | {1 - alpha - 0.02:.2f}")
    print(f"test AUROC {auc:.3f} (n={len(truth)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
