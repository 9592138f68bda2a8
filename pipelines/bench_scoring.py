"""Benchmark of ``medfusion score``: is I/O hidden behind compute?

Writes a synthetic cohort of CT-only studies (DICOM series), trains a tiny model on a few of
them, then measures on the same studies and the same number of worker processes:

* **load**: loading + preprocessing every study in the worker pool, no inference;
* **infer**: pure model inference in one process on the already-prepared tensors;
* **end to end**: ``score_folder`` (discovery, workers, inference, journal, CSVs).

Target: end to end <= 1.3 x max(load, infer). With ``--rss`` it also runs ``score_folder``
in fresh processes on 100 and 1000 tiny studies and prints the peak resident memory of the
parent and of the workers (flat memory means the two runs peak at about the same size).

    .venv/bin/python pipelines/bench_scoring.py --studies 200 --workers 2
    .venv/bin/python pipelines/bench_scoring.py --rss-only --rss 100 1000

Numbers measured are written in docs/scoring.md (and the report of the change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cohort(root: Path, n: int, shape: tuple[int, int, int], seed: int) -> Path:
    from medfusion.testing.synthetic import write_cohort

    if (root / "done").exists():  # reuse a cohort written by an earlier run of the bench
        return root / "studies"
    shutil.rmtree(root, ignore_errors=True)

    paths = write_cohort(root, n, seed=seed, roles=("ct",),
                         subject_kwargs={"ct_shape": shape})
    (root / "done").write_text("ok")
    return paths.studies_dir


def _model(root: Path, shape: tuple[int, int, int], grid: int, encoder: str) -> Path:
    from medfusion.testing.synthetic import write_cohort
    from medfusion.training.trainer import train

    if (root / "model" / "model.json").exists():
        return root / "model"
    cohort = write_cohort(root / "train", 16, seed=99, roles=("ct",),
                          subject_kwargs={"ct_shape": shape})
    recipe = {"labels": ["normal", "abnormal"],
              "modalities": {"ct": {"grid": [grid, grid, grid], "encoder": encoder}},
              "epochs": 1, "val_fraction": 0.25, "test_fraction": 0.0}
    return Path(train(recipe, cohort.manifest, root / "model", progress=False,
                      cache_dir=root / "cache"))


def _pure_load(studies: Path, model_dir: Path, workers: int) -> tuple[float, list]:
    """Prepare every study in the worker pool, no inference; returns time and records."""
    from medfusion.scoring.discovery import discover_studies
    from medfusion.scoring.pool import LocalPool
    from medfusion.scoring.scorer import load_fusion_scorer

    found = discover_studies(studies)
    pool = LocalPool(workers, str(model_dir), factory=load_fusion_scorer)
    # Wait for the workers to start so that startup is not counted (score_folder pays it
    # too, but it is a constant, not a per-study cost).
    while len(pool.workers) < workers or not all(w.ready for w in pool.workers):
        pool.poll(0.1)
    t0 = time.perf_counter()
    todo = list(found.studies)
    records = []
    while todo or pool.busy():
        while todo and pool.capacity() > 0:
            pool.submit((todo.pop(0), None, False))
        records.extend(pool.poll(0.05))
    elapsed = time.perf_counter() - t0
    pool.close()
    return elapsed, records


def _pure_infer(model_dir: Path, records: list) -> float:
    import torch

    from medfusion.scoring.scorer import load_fusion_scorer

    scorer = load_fusion_scorer(str(model_dir))
    prepared = [r["prepared"] for r in records if r.get("ok")]
    scorer.predict(prepared[0], explain=False, alpha=0.1)  # warm-up (lazy inits)
    t0 = time.perf_counter()
    for item in prepared:
        with torch.no_grad():
            scorer.predict(item, explain=False, alpha=0.1)
    return time.perf_counter() - t0


def _end_to_end(studies: Path, model_dir: Path, out: Path, workers: int) -> tuple[float, dict]:
    from medfusion.scoring.engine import score_folder

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = score_folder(studies, model_dir, out, workers=workers, progress=False)
    return time.perf_counter() - t0, summary.to_dict()


def _descendants_rss_mb(root_pid: int) -> dict[int, float]:
    """Resident memory (MiB) of every live descendant of ``root_pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields.get("PPid", "0").strip() or 0)
        if "VmRSS" in fields:
            rss[pid] = int(fields["VmRSS"].split()[0]) / 1024
    out = {}
    for pid in rss:
        p = parents.get(pid, 0)
        while p and p != root_pid:
            p = parents.get(p, 0)
        if p == root_pid:
            out[pid] = rss[pid]
    return out


def _rss_child(studies: str, model_dir: str, out: str, workers: int) -> None:
    """Run in a fresh process: score, then print peak RSS (MiB) of itself and of its
    worker processes (sampled every 0.2 s: the fork server's children are not ours to
    wait for, so getrusage cannot see them)."""
    import threading

    from medfusion.scoring.engine import score_folder

    peaks = {"worker_max_mb": 0.0, "workers_total_max_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        me = os.getpid()
        while not stop.is_set():
            found = _descendants_rss_mb(me)
            if found:
                peaks["worker_max_mb"] = max(peaks["worker_max_mb"], max(found.values()))
                peaks["workers_total_max_mb"] = max(peaks["workers_total_max_mb"],
                                                    sum(found.values()))
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    summary = score_folder(studies, model_dir, out, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    print(json.dumps({
        "studies": summary.n_studies,
        "scored": summary.n_scored,
        "wall_s": round(wall, 2),
        "parent_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **{k: round(v, 1) for k, v in peaks.items()},
    }))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[192, 192, 96],
                        help="CT voxels per study (I J K)")
    parser.add_argument("--grid", type=int, default=48, help="model input grid (cube)")
    parser.add_argument("--encoder", default="smallcnn")
    parser.add_argument("--rss", type=int, nargs="*", default=[],
                        help="also measure peak memory for these study counts (e.g. 100 1000)")
    parser.add_argument("--rss-only", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep files here (default: temp)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _rss_child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return

    import torch

    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = tuple(args.shape)
    t0 = time.perf_counter()
    model_dir = _model(work, shape, args.grid, args.encoder)
    print(f"model trained in {time.perf_counter() - t0:.1f} s", flush=True)
    results: dict = {"workers": args.workers, "shape": list(shape), "grid": args.grid,
                     "encoder": args.encoder, "cpus": os.cpu_count()}
    if not args.rss_only:
        t0 = time.perf_counter()
        studies = _cohort(work / f"cohort-{args.studies}", args.studies, shape, seed=7)
        print(f"wrote {args.studies} studies in {time.perf_counter() - t0:.1f} s", flush=True)
        load_s, records = _pure_load(studies, model_dir, args.workers)
        infer_s = _pure_infer(model_dir, records)
        e2e_s, summary = _end_to_end(studies, model_dir, work / "out-e2e", args.workers)
        ratio = e2e_s / max(load_s, infer_s)
        results.update(
            studies=args.studies, load_s=round(load_s, 2), infer_s=round(infer_s, 2),
            end_to_end_s=round(e2e_s, 2), ratio_to_larger=round(ratio, 3),
            studies_per_s=round(args.studies / e2e_s, 2), scored=summary["n_scored"],
            failed=summary["n_failed"],
        )
        print(f"pure load (pool of {args.workers}): {load_s:.2f} s | pure inference: "
              f"{infer_s:.2f} s | end to end: {e2e_s:.2f} s | ratio to the larger: "
              f"{ratio:.2f} (target <= 1.3) | {args.studies / e2e_s:.2f} studies/s", flush=True)
    rss = {}
    for n in args.rss:
        studies = _cohort(work / f"rss-{n}", n, (40, 40, 24), seed=11)
        out = work / f"out-rss-{n}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(studies), str(model_dir), str(out),
             str(args.workers)], capture_output=True, text=True, check=True)
        rss[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{n} studies: {rss[n]}", flush=True)
    if rss:
        results["rss"] = rss
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
