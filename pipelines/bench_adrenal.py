"""AdrenalMNIST3D through medfusion's public training path, beside published baselines.

Real data (MedMNIST v2, CC BY 4.0): 1584 adrenal-gland shape volumes from abdominal CT,
labels normal / hyperplasia, official splits train 1188 / val 98 / test 298. This script
writes every volume as a NIfTI file plus a manifest (official ``split`` column) in a temp
folder, trains with ``medfusion.train`` (the same path as ``medfusion train``), scores the test
split with ``predict_manifest`` (the same path as ``medfusion predict``) and prints test AUC /
ACC next to the MedMNIST v2 baselines.

    .venv/bin/python pipelines/bench_adrenal.py --size 28
    .venv/bin/python pipelines/bench_adrenal.py --size 64 --minutes 20
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASELINES = [  # MedMNIST v2 (Sci Data 2023), AdrenalMNIST3D test AUC / ACC
    ("ResNet-18 + 3D", 0.827, 0.721),
    ("ResNet-18 + ACS", 0.839, 0.754),
    ("ResNet-50 + 3D", 0.828, 0.745),
    ("auto-sklearn", 0.828, 0.802),
]
LABELS = ("normal", "hyperplasia")


def data_path(size: int) -> Path:
    root = Path(os.environ.get("MEDFUSION_SHARED_DATA",
                               Path(__file__).resolve().parents[2] / "shared" / "data"))
    return root / "medmnist" / ("adrenalmnist3d.npz" if size == 28 else "adrenalmnist3d_64.npz")


def load_splits(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official splits as (images uint8 (N, S, S, S), labels (N,))."""
    with np.load(data_path(size), allow_pickle=False) as npz:
        return {s: (npz[f"{s}_images"], npz[f"{s}_labels"].reshape(-1).astype(int))
                for s in ("train", "val", "test")}


def write_dataset(splits: dict[str, tuple[np.ndarray, np.ndarray]], root: Path,
                  role: str = "adrenal", limit: int | None = None,
                  extra_columns: dict[str, list[str]] | None = None, *,
                  spacing_mm: float = 1.0, raw_values: bool = False) -> Path:
    """NIfTI per volume + manifest.csv with the official split. Voxels are ``spacing_mm``
    isotropic; values 0/1 (float), or with ``raw_values`` the dataset's 0/255 as shipped
    (int16), as a new user would write them."""
    import nibabel as nib

    (root / "vol").mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    rows = []
    for split, (images, labels) in splits.items():
        n = len(labels) if limit is None else min(limit, len(labels))
        for i in range(n):
            sid = f"{split}-{i:04d}"
            path = root / "vol" / f"{sid}.nii.gz"
            if not path.exists():
                values = (images[i].astype(np.int16) if raw_values
                          else (images[i] > 127).astype(np.float32))
                img = nib.Nifti1Image(values, affine)
                nib.save(img, path)
            rows.append({"study_id": sid, "label": LABELS[labels[i]], "split": split,
                         role: f"vol/{sid}.nii.gz"})
    if extra_columns:
        for j, row in enumerate(rows):
            for col, values in extra_columns.items():
                row[col] = values[j]
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_metrics(model_dir: Path, manifest: Path, out_csv: Path) -> tuple[float, float]:
    """Test AUC / ACC from predictions written by predict_manifest (public path)."""
    from sklearn.metrics import roc_auc_score

    from medfusion.inference import predict_manifest

    rows = {r["study_id"]: r for r in csv.DictReader(manifest.open())}
    test_ids = [sid for sid, r in rows.items() if r["split"] == "test"]
    sub = manifest.parent / "test_manifest.csv"  # paths are relative to the manifest
    with sub.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[test_ids[0]]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[s] for s in test_ids)
    predict_manifest(model_dir, sub, out_csv)
    preds = list(csv.DictReader(out_csv.open()))
    y = np.array([LABELS.index(rows[p["study_id"]]["label"]) for p in preds])
    p1 = np.array([float(p[f"prob_{LABELS[1]}"]) for p in preds])
    return float(roc_auc_score(y, p1)), float(np.mean((p1 >= 0.5) == y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, choices=(28, 64), default=28)
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--encoder", default="smallcnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patience", type=int, default=25)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--augment", default="flip_permute")
    parser.add_argument("--no-tta", action="store_true", help="no test-time flip averaging")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="studies per split (smoke)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from medfusion.training.trainer import train

    if not data_path(args.size).is_file():
        print(f"AdrenalMNIST3D not found at {data_path(args.size)}", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="adrenal_"))
    t0 = time.perf_counter()
    manifest = write_dataset(load_splits(args.size), work / f"data{args.size}", limit=args.limit)
    t_write = time.perf_counter() - t0
    recipe = {
        "labels": list(LABELS),
        "modalities": {"adrenal": {"grid": [args.size] * 3, "normalization": "none",
                                   "encoder": args.encoder}},
        "fusion": "concat",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "patience": args.patience,
        "ensemble": args.ensemble,
        "max_minutes": args.minutes,
        "modality_dropout": 0.0,
        # Masks have no canonical orientation: flips and axis permutations are label-safe.
        "augment": args.augment,
        "tta": not args.no_tta,
    }
    t1, c1 = time.perf_counter(), time.process_time()
    model = train(recipe, manifest, work / f"model{args.size}", seed=args.seed, progress=True)
    t_train, c_train = time.perf_counter() - t1, time.process_time() - c1
    auc, acc = test_metrics(model, manifest, work / f"pred{args.size}.csv")
    print(f"\nAdrenalMNIST3D {args.size}^3, official test split (n=298), medfusion "
          f"{args.encoder} x{args.ensemble}, augment {args.augment}, tta {not args.no_tta}, "
          f"seed {args.seed}, {args.threads} threads")
    print(f"data written in {t_write:.0f} s; training (incl. preprocessing) {t_train / 60:.1f} min "
          f"wall, {c_train / 60:.1f} CPU-min (budget: {args.minutes:g} min x {args.threads} "
          "cores)")
    print(f"{'model':<28}{'AUC':>7}{'ACC':>7}")
    for name, b_auc, b_acc in BASELINES:
        print(f"{name:<28}{b_auc:>7.3f}{b_acc:>7.3f}")
    print(f"{'medfusion (this run)':<28}{auc:>7.3f}{acc:>7.3f}")
    print(f"model folder: {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
