"""Train the tiny demo model bundled in ``data_samples/demo_model/``.

A synthetic cohort is generated in a temporary folder with the same generator as the
bundled sample studies (``medfusion.testing.synthetic.write_cohort``: CT DICOM series, MR
NIfTI, DX radiograph, clinical record; some modalities missing), then trained through the
public path (``medfusion.train``) with a small CNN per modality, the clinical MLP and
attention fusion. Takes a couple of minutes on 2 CPU cores; the cohort is not kept.

    .venv/bin/python pipelines/train_demo_model.py            # rewrites data_samples/demo_model
    .venv/bin/python pipelines/train_demo_model.py --out /tmp/demo_model
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data_samples" / "demo_model"
N_STUDIES = 160
COHORT_SEED = 7  # make_samples.py uses another seed: the samples are unseen by the model

RECIPE = {
    "labels": ["normal", "abnormal"],
    "modalities": {
        "ct": {"grid": [32, 32, 24], "normalization": "ct", "ct_window": [-200, 400]},
        "mr": {"grid": [32, 32, 20], "normalization": "mr"},
        "xray": {"grid": [64, 64, 1], "normalization": "xray"},
    },
    "clinical": {
        "age": {"type": "numeric"},
        "sex": {"type": "categorical"},
        "smoker": {"type": "categorical"},
        "crp": {"type": "numeric"},
    },
    "fusion": "attention",
    "encoder": "smallcnn",
    "embed_dim": 32,
    "epochs": 20,
    "batch_size": 16,
    "patience": 8,
    "modality_dropout": 0.25,
    "weights_dtype": "float16",  # halves the package (about 4.5 MB) at no measured cost
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--studies", type=int, default=N_STUDIES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from medfusion.testing.synthetic import write_cohort
    from medfusion.training.trainer import train

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medfusion_demo_") as tmp:
        cohort = Path(tmp) / "cohort"
        write_cohort(cohort, args.studies, seed=COHORT_SEED, missing_rate=0.15)
        staging = Path(tmp) / "model"
        train(RECIPE, cohort / "manifest.csv", staging, seed=args.seed, progress=True,
              cache_dir=Path(tmp) / "cache")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, args.out)
    card = json.loads((args.out / "model.json").read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    print(f"demo model written to {args.out} ({size:.1f} MB) in "
          f"{time.perf_counter() - started:.0f} s")
    print("metrics:", json.dumps(card["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
