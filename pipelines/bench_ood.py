"""Out-of-distribution benchmark: does uncertainty rise on inputs unlike the training data?

For a model trained by ``medfusion.train`` (by default one trained here on a synthetic
CT + MR + clinical cohort; or any package with ``--model DIR --manifest CSV``), the held-out
studies of the manifest's ``test`` split are predicted as they are and in three
out-of-distribution variants:

* ``noise``     every imaging volume replaced by Gaussian noise of the same mean and SD;
* ``swapped``   the imaging volumes rotated between roles (CT given as MR and so on; only
                for models with two or more imaging roles);
* ``foreign``   every imaging volume replaced by one other scan (``--foreign FILE``, e.g. a
                real MR from ../shared/data given to a model trained on something else).

Printed per condition: mean entropy, MC-dropout mutual information, conformal set size,
abstention rate, feature shift, its p-value against validation and the
``OUT_OF_DISTRIBUTION`` rate; and, per score, the AUROC of telling the OOD studies from the
held-out ones (0.5 = no signal, 1 = perfect).

    .venv/bin/python pipelines/bench_ood.py                       # synthetic, ~2 min
    .venv/bin/python pipelines/bench_ood.py --model M --manifest data.csv --foreign mr.nii.gz
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCORES = ("entropy", "mutual_info", "set_size", "feature_shift")


def _synthetic_model(work: Path, n: int, grid: int, epochs: int, seed: int, ensemble: int
                     ) -> tuple[Path, Path]:
    from medfusion.testing.synthetic import write_cohort
    from medfusion.training.trainer import train

    cohort = write_cohort(work / "cohort", n, seed=seed, roles=("ct", "mr"),
                          formats={"ct": "nifti", "mr": "nifti"})
    recipe = {"labels": ["normal", "abnormal"],
              "modalities": {"ct": {"grid": [grid] * 3}, "mr": {"grid": [grid] * 3}},
              "clinical": {"age": {"type": "numeric"}, "sex": {"type": "categorical"},
                           "crp": {"type": "numeric"}},
              "fusion": "attention", "epochs": epochs, "batch_size": 16, "ensemble": ensemble,
              "val_fraction": 0.25, "test_fraction": 0.25}
    model = train(recipe, cohort.manifest, work / "model", seed=seed, progress=False)
    return model, cohort.manifest


def _variants(volumes: dict, kind: str, rng: np.random.Generator, foreign=None) -> dict | None:
    if kind == "held-out":
        return volumes
    if kind == "noise":
        return {r: dataclasses.replace(v, array=rng.normal(
            float(v.array.mean()), float(v.array.std()) or 1.0, v.array.shape
        ).astype(np.float32)) for r, v in volumes.items()}
    if kind == "swapped":
        roles = sorted(volumes)
        if len(roles) < 2:
            return None
        return {r: dataclasses.replace(volumes[roles[(i + 1) % len(roles)]], modality=volumes[r]
                                       .modality) for i, r in enumerate(roles)}
    if kind == "foreign":
        return None if foreign is None else {r: foreign for r in volumes}
    raise ValueError(kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--manifest", type=Path, default=None)
    parser.add_argument("--foreign", type=Path, default=None,
                        help="a scan given in place of every imaging role")
    parser.add_argument("--n", type=int, default=120, help="synthetic cohort size")
    parser.add_argument("--grid", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ensemble", type=int, default=1,
                        help="members (mutual information then comes from their disagreement)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many test studies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from sklearn.metrics import roc_auc_score

    from medfusion.inference import FusionModel
    from medfusion.io.volume import load_volume
    from medfusion.training.dataset import load_input_volume
    from medfusion.training.manifest import read_manifest
    from medfusion.training.recipe import load_recipe
    from medfusion.types import Study

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model is None:
        work = Path(tempfile.mkdtemp(prefix="ood_bench_"))
        model_dir, manifest = _synthetic_model(work, args.n, args.grid, args.epochs, args.seed,
                                               args.ensemble)
        source = (f"SYNTHETIC cohort (n={args.n}, CT + MR {args.grid}^3 + clinical), "
                  f"attention model trained by medfusion.train, {args.epochs} epochs, "
                  f"ensemble {args.ensemble}")
    else:
        if args.manifest is None:
            parser.error("--model needs --manifest")
        model_dir, manifest = args.model, args.manifest
        source = f"model {model_dir.name}, manifest {manifest.name}"
    model = FusionModel.load(model_dir)
    if model.shift_reference is None:
        print("note: this package has no validation shift reference (trained before it "
              "existed): fixed threshold, no distance-aware probabilities")
    rows = [r for r in read_manifest(manifest, load_recipe(model.card["recipe"]),
                                     require_labels=False, require_columns=False)
            if r.split == "test"][: args.limit]
    foreign = load_volume(args.foreign) if args.foreign else None
    rng = np.random.default_rng(args.seed)
    table: dict[str, dict[str, list[float]]] = {}
    for kind in ("held-out", "noise", "swapped", "foreign"):
        acc: dict[str, list[float]] = {k: [] for k in (*SCORES, "abstain", "pvalue", "flagged")}
        for row in rows:
            volumes = {r: load_input_volume(p) for r, p in row.paths.items() if p is not None}
            variant = _variants(volumes, kind, rng, foreign)
            if variant is None or not variant:
                continue
            pred = model.predict(Study(key="st-ood", volumes=variant, clinical=row.clinical))
            acc["entropy"].append(pred.entropy)
            acc["mutual_info"].append(pred.mutual_info if pred.mutual_info is not None
                                      else float("nan"))
            acc["set_size"].append(len(pred.prediction_set or ()))
            acc["feature_shift"].append(pred.feature_shift)
            acc["abstain"].append(float(bool(pred.abstain)))
            acc["pvalue"].append(pred.shift_pvalue if pred.shift_pvalue is not None
                                 else float("nan"))
            acc["flagged"].append(float("OUT_OF_DISTRIBUTION" in pred.flags))
        if acc["entropy"]:
            table[kind] = acc
    print(f"\nOOD benchmark: {source}; {len(rows)} held-out test studies; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{'condition':<10}{'n':>5}{'entropy':>9}{'MI':>8}{'set':>6}{'abstain':>9}"
          f"{'shift':>10}{'p-value':>9}{'flagged':>9}")
    for kind, acc in table.items():
        print(f"{kind:<10}{len(acc['entropy']):>5}{np.mean(acc['entropy']):>9.3f}"
              f"{np.nanmean(acc['mutual_info']) if not np.all(np.isnan(acc['mutual_info'])) else float('nan'):>8.3f}"  # noqa: E501
              f"{np.mean(acc['set_size']):>6.2f}{np.mean(acc['abstain']):>9.2f}"
              f"{np.median(acc['feature_shift']):>10.4g}"
              f"{np.nanmedian(acc['pvalue']) if not np.all(np.isnan(acc['pvalue'])) else float('nan'):>9.3f}"  # noqa: E501
              f"{np.mean(acc['flagged']):>9.2f}")
    print("\nAUROC of telling each OOD condition from held-out (0.5 = no signal):")
    print(f"{'condition':<10}" + "".join(f"{s:>15}" for s in SCORES))
    ref = table["held-out"]
    for kind, acc in table.items():
        if kind == "held-out":
            continue
        cells = []
        for s in SCORES:
            x = np.r_[ref[s], acc[s]]
            y = np.r_[np.zeros(len(ref[s])), np.ones(len(acc[s]))]
            cells.append(float("nan") if np.isnan(x).any() else roc_auc_score(y, x))
        print(f"{kind:<10}" + "".join(f"{c:>15.3f}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
