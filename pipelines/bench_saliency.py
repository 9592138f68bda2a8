"""Does the saliency peak find the lesion when a decoy is present? Trained the way a user trains.

A decoy cohort (:func:`medfusion.explain.benchmark.lesion_cohort` with ``decoy_radius_mm``):
anisotropic CT-like volumes (default 48 x 48 x 16 voxels of 1.0 x 1.0 x 2.5 mm, written as
NIfTI in HU: 40 + 400 x the synthetic intensity), every study carrying a bright decoy sphere
(radius 6 mm, present in both classes, so it cannot decide the label) and positives carrying
the lesion (radius 4.5 mm). The model is trained through the real path,
:func:`medfusion.training.trainer.train`, with the default recipe (``modalities: {ct: {}}``:
its default grid, ``smallcnn``, attention fusion) and the manifest's fixed splits; only ``epochs``
is set (2 CPU cores).

For every positive test study the map is computed on the model grid, mapped onto the
study's source grid (:func:`medfusion.explain.export.saliency_to_source`) and its peak
located in world millimetres. A *hit*: the peak voxel centre lies within the lesion sphere
plus half a source-voxel diagonal (0.5 x |(1, 1, 2.5)| = 1.35 mm; the map is sampled at
voxel centres), the same rule as the test suite. The same rule around the decoy counts
*decoy* peaks. Printed side by side: ``explain_prediction`` (what ``predict --explain``
writes) and Grad-CAM / Grad-CAM++ at each candidate encoder layer, each with the model
randomisation check (Adebayo et al. 2018): the mean Spearman correlation, over the first
``SANITY_STUDIES`` positives, between the map and the map of the same network with its
weights re-initialised. A map that explains the model changes when the model does (a low
correlation); one that stays the same explains the input only.

    .venv/bin/python pipelines/bench_saliency.py --figure saliency.png
    .venv/bin/python pipelines/bench_saliency.py --train 120 --val 40 --test 60 --epochs 8 \\
        --figure saliency.png                                         # quicker
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LABELS = ("normal", "lesion")
SHAPE = (48, 48, 16)
SPACING = (1.0, 1.0, 2.5)
DECOY_MM = 6.0
#: "on the lesion": within the sphere plus half a source-voxel diagonal
TOL_MM = 0.5 * float(np.linalg.norm(SPACING))
SANITY_STUDIES = 10


def write_cohort(root: Path, sizes: dict[str, int], seed: int) -> dict[str, object]:
    """NIfTI per study + manifest.csv; returns study id -> LesionStudy (truth in world mm)."""
    import nibabel as nib

    from medfusion.explain.benchmark import lesion_cohort

    (root / "ct").mkdir(parents=True, exist_ok=True)
    rows, truth = [], {}
    for s_i, (split, n) in enumerate(sizes.items()):
        studies = lesion_cohort(n, seed=seed * 10 + s_i, shape=SHAPE, spacing=SPACING,
                                grid=(8, 8, 8), decoy_radius_mm=DECOY_MM)
        for i, s in enumerate(studies):
            sid = f"{split}-{i:04d}"
            hu = (40.0 + 400.0 * s.source.array).astype(np.int16)
            nib.save(nib.Nifti1Image(hu, s.source.affine), str(root / "ct" / f"{sid}.nii.gz"))
            rows.append({"study_id": sid, "label": LABELS[s.label], "patient_id": sid,
                         "split": split, "ct": f"ct/{sid}.nii.gz"})
            truth[sid] = s
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return truth


def classify(peak: np.ndarray, study: object) -> tuple[bool, bool, float]:
    """(on the lesion, on the decoy, distance to the lesion surface in mm)."""
    d_lesion = float(np.linalg.norm(peak - np.asarray(study.lesion_world)))
    d_decoy = float(np.linalg.norm(peak - np.asarray(study.decoy_world)))
    return (d_lesion <= study.radius_mm + TOL_MM, d_decoy <= study.decoy_radius_mm + TOL_MM,
            max(0.0, d_lesion - study.radius_mm))


def figure(path: Path, panels: list[tuple[object, object, bool, np.ndarray]], title: str
           ) -> None:
    """Axial source slice through each lesion, the map overlaid, lesion (solid) and decoy
    (dashed) circled at their in-slice cross-section, the peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (study, sal, hit, peak) in zip(axes[0], panels, strict=True):
        inv = np.linalg.inv(study.source.affine)
        ijk = (inv @ np.array([*study.lesion_world, 1.0]))[:3]
        k = int(round(ijk[2]))
        z_mm = (study.source.affine @ np.array([0.0, 0.0, k, 1.0]))[2]
        # rows = j, columns = i; voxel units (in-plane spacing is 1 mm)
        ax.imshow(study.source.array[:, :, k].T, cmap="gray", origin="upper")
        ax.imshow(sal.array[:, :, k].T, cmap="jet", alpha=0.35, origin="upper",
                  vmin=0.0, vmax=1.0)
        for centre, radius, style, colour in (
                (study.lesion_world, study.radius_mm, "-", "lime"),
                (study.decoy_world, study.decoy_radius_mm, "--", "white")):
            c_ijk = (inv @ np.array([*centre, 1.0]))[:3]
            dz = abs(centre[2] - z_mm)
            r = np.sqrt(max(radius ** 2 - dz ** 2, 0.0)) / SPACING[0]
            if r > 0:
                ax.add_patch(Circle((c_ijk[0], c_ijk[1]), r, fill=False, ls=style, lw=1.5,
                                    ec=colour))
            else:  # the decoy misses this slice: mark where it is in-plane
                ax.plot(c_ijk[0], c_ijk[1], "x", color=colour, ms=8)
        p_ijk = (inv @ np.array([*peak, 1.0]))[:3]
        ax.plot(p_ijk[0], p_ijk[1], "+", color="red", ms=12, mew=2)
        ax.set_title(f"{'HIT' if hit else 'MISS'}  peak slice {int(round(p_ijk[2]))}, "
                     f"lesion {k}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=360)
    parser.add_argument("--val", type=int, default=80)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, required=True, help="PNG to write")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None,
                        help="a package trained by an earlier run of this script with the same "
                             "--seed and sizes (the cohort is rebuilt identically): skip training")
    args = parser.parse_args(argv)

    from medfusion.explain import explain_prediction, role_cam, target_layer
    from medfusion.explain.api import DEFAULT_CAM_METHOD
    from medfusion.explain.benchmark import peak_world
    from medfusion.explain.export import saliency_to_source
    from medfusion.explain.gradcam import candidate_layers
    from medfusion.explain.occlusion import role_occlusion
    from medfusion.explain.sanity import randomize_weights, rank_correlation
    from medfusion.inference.model import FusionModel
    from medfusion.training.dataset import load_input_volume
    from medfusion.training.trainer import train
    from medfusion.types import Study

    torch.manual_seed(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_saliency_"))
    started = time.monotonic()
    truth = write_cohort(work, {"train": args.train, "val": args.val, "test": args.test},
                         args.seed)
    recipe = {"labels": list(LABELS), "modalities": {"ct": {}}, "epochs": args.epochs}
    model_dir = args.model or train(recipe, work / "manifest.csv", work / "model",
                                    seed=args.seed, progress=False, overwrite=True)
    model = FusionModel.load(model_dir)
    net = model.net
    trained_s = time.monotonic() - started
    auroc = model.card["metrics"].get("test", {}).get("auroc")
    print(f"cohort {args.train}/{args.val}/{args.test} (train/val/test), source {SHAPE} "
          f"voxels of {SPACING} mm, decoy r={DECOY_MM} mm, lesion r=4.5 mm; default recipe, "
          f"{args.epochs} epochs; trained in {trained_s:.0f} s; test AUROC {auroc}")
    auto = target_layer(net, "ct")
    grid = tuple(net.config.roles["ct"].grid)
    print(f"default: gradcam at the automatic layer, at {grid}: {auto}; "
          f"hit tolerance {TOL_MM:.2f} mm beyond the lesion radius")

    layers = candidate_layers(net, "ct")
    methods = [(f"explain_prediction (default: {DEFAULT_CAM_METHOD})", None, None)] + [
        (f"{m} @ {lay}", m, lay) for lay in layers for m in ("gradcam", "gradcampp")]
    counts = {name: [0, 0, 0.0] for name, _, _ in methods}
    sanity: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    random_net = randomize_weights(net, seed=args.seed + 1)
    panels = []
    positives = [sid for sid in sorted(truth) if sid.startswith("test-")
                 and truth[sid].label == 1]
    for sid in positives:
        study = truth[sid]
        volume = load_input_volume(work / "ct" / f"{sid}.nii.gz")
        prepared = model.prepare(Study(key=sid, volumes={"ct": volume}))
        images = {"ct": torch.from_numpy(prepared.tensors["ct"])[None]}
        present = torch.ones(1, 1, dtype=torch.bool)
        for name, method, layer in methods:
            if method is None:
                sal = explain_prediction(model, prepared, target=1, clinical=False).saliency["ct"]
            elif method == "occlusion":
                cam = role_occlusion(net, "ct", images, None, present, 1)[0]
                sal = saliency_to_source(cam, prepared.prepared["ct"], prepared.sources["ct"])
            else:
                cam = role_cam(net, "ct", images, None, present, 1, method, layer=layer)[0]
                sal = saliency_to_source(cam, prepared.prepared["ct"], prepared.sources["ct"])
            peak = peak_world(sal)
            hit, decoy, dist = classify(peak, study)
            counts[name][0] += hit
            counts[name][1] += decoy
            counts[name][2] += dist
            if method is None and len(panels) < 6:
                panels.append((study, sal, hit, peak))
            if len(sanity[name]) < SANITY_STUDIES:
                cam_method = method or DEFAULT_CAM_METHOD
                if cam_method == "occlusion":
                    maps = [role_occlusion(n_, "ct", images, None, present, 1)[0]
                            for n_ in (net, random_net)]
                else:
                    maps = [role_cam(n_, "ct", images, None, present, 1, cam_method,
                                     layer=layer or auto)[0] for n_ in (net, random_net)]
                sanity[name].append(rank_correlation(*maps))
    n = len(positives)
    print(f"\n{n} positive test studies; peak on the lesion / on the decoy / mean distance "
          "from the peak to the lesion surface")
    print(f"{'map':44s} {'lesion':>12s} {'decoy':>12s} {'mean mm':>8s} {'rand. rho':>9s}")
    for name, (hit, decoy, dist) in counts.items():
        print(f"{name:44s} {hit:4d} ({100 * hit / n:3.0f}%) {decoy:4d} ({100 * decoy / n:3.0f}%)"
              f" {dist / n:8.2f} {np.mean(sanity[name]):9.3f}")
    hit = counts[methods[0][0]][0]
    figure(args.figure, panels,
           f"explain_prediction default ({DEFAULT_CAM_METHOD}): peak on the lesion {hit}/{n}; "
           "lesion solid green, decoy dashed white (x: decoy centre off this slice), "
           "peak red +")
    print(f"\nfigure: {args.figure}  ({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
