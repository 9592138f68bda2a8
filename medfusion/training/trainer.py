"""The training loop: recipe + manifest -> a safe model package.

``train(recipe, manifest, out)`` reads and validates both, splits by patient, prepares and
caches the inputs, fits the clinical preprocessing on the training split, trains a
:class:`~medfusion.models.net.FusionNet` per ensemble member (AdamW, class-weighted cross
entropy, modality dropout, flips as augmentation, cosine learning rate, early stopping on
validation AUROC), fits the kernel SVM for ``fusion: kernel``, calibrates a temperature and
conformal scores on the validation split, measures the test split and writes the package
(``model.json`` + ``weights.safetensors``) plus a ``metrics.jsonl`` log.

Determinism: python, numpy and torch are seeded from ``seed``; batches are shuffled with a
dedicated generator, so the same inputs, recipe and seed give the same weights on one CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medfusion.device import module_device, select_device
from medfusion.errors import ManifestError, OutputError
from medfusion.inference import FusionModel
from medfusion.models.card import CARD_FORMAT
from medfusion.models.clinical import ClinicalPreprocessor
from medfusion.models.kernel import KernelFusionClassifier
from medfusion.models.net import (
    CLINICAL,
    FusionNet,
    NetConfig,
    RoleNetConfig,
    TextNetConfig,
    run_net,
)
from medfusion.models.package import save_package
from medfusion.models.text import NoteTokenizer
from medfusion.seeding import seed_everything
from medfusion.training.dataset import PreparedCache, PreparedDataset, build_dataset
from medfusion.training.manifest import assign_splits, grouped_holdout, read_manifest
from medfusion.training.recipe import Recipe, load_recipe
from medfusion.uncertainty.calibration import LogitScaler, TemperatureScaler, fit_calibration
from medfusion.uncertainty.conformal import ConformalPredictor
from medfusion.uncertainty.domain import InputDomain
from medfusion.uncertainty.metrics import mean_nll
from medfusion.uncertainty.shift import ShiftReference, model_role_shifts

log = logging.getLogger("medfusion.training")

FORMAT = CARD_FORMAT  # the model card's format version (checked when a package loads)
MIN_CALIBRATION = 10  # fewer validation studies than this: no temperature is fitted


def default_cache_dir(manifest: Path) -> Path:
    """Prepared inputs are cached next to the data they come from (never in the model
    folder, which is meant to be shared): ``$MEDFUSION_CACHE_DIR`` or
    ``<manifest folder>/.medfusion_cache``."""
    env = os.environ.get("MEDFUSION_CACHE_DIR")
    return Path(env) if env else manifest.resolve().parent / ".medfusion_cache"


# --- metrics -----------------------------------------------------------------------------
def auroc(probs: np.ndarray, y: np.ndarray) -> float | None:
    """Binary AUROC of class 1, or macro one-vs-rest; None when a class is absent."""
    from sklearn.metrics import roc_auc_score

    if len(y) == 0 or len(np.unique(y)) < probs.shape[1] and probs.shape[1] > 2:
        return None
    if len(np.unique(y)) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def summary_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """AUROC, accuracy, balanced accuracy, NLL and the count of a split."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    if len(y) == 0:
        return {"n": 0}
    pred = probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny split may lack a predicted class
        balanced = float(balanced_accuracy_score(y, pred))
    return {
        "n": int(len(y)),
        "auroc": auroc(probs, y),
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": balanced,
        "nll": mean_nll(probs, y),
    }


# --- batches -----------------------------------------------------------------------------
def _batch(data: PreparedDataset, clinical: np.ndarray | None, idx: np.ndarray,
           device: torch.device
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    images = {r: torch.from_numpy(a[idx]).to(device) for r, a in data.images.items()}
    clin = None if clinical is None else torch.from_numpy(clinical[idx]).to(device)
    return images, clin, torch.from_numpy(data.present[idx]).to(device)


def _epoch_batches(data: PreparedDataset, clinical: np.ndarray | None, train_idx: np.ndarray,
                   recipe: Recipe, gen: torch.Generator, device: torch.device
                   ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor | None,
                                       torch.Tensor]]:
    """One epoch of shuffled, augmented training batches: (indices, images, clinical,
    present). The shuffle and the augmentation draw from ``gen`` (deterministic)."""
    order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
    for start in range(0, len(order), recipe.batch_size):
        idx = np.sort(order[start:start + recipe.batch_size])
        if len(idx) < 2 and len(order) > 1:
            continue  # a lone last sample would make BatchNorm statistics degenerate
        images, clin, present = _batch(data, clinical, idx, device)
        if recipe.augment != "none":
            images = _augment(images, gen, recipe.augment)
        yield idx, images, clin, present


def _augment(images: dict[str, torch.Tensor], gen: torch.Generator, mode: str
             ) -> dict[str, torch.Tensor]:
    """Random flips per sample along each spatial axis (depth skipped for radiographs);
    ``flip_affine`` (the default) then turns, scales and shifts each sample a little (see
    ``_random_affine``); ``flip_permute`` instead permutes the axes of cubic grids (one
    permutation per batch), for orientation-free shape data such as segmentation masks."""
    out = {}
    for role, x in images.items():
        if x.ndim != 5:  # a text role's token ids are not augmented
            out[role] = x
            continue
        for dim in (2, 3, 4):
            if x.shape[dim] == 1:
                continue
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            if bool(flip.any()):
                x = torch.where(flip.view(-1, 1, 1, 1, 1).to(x.device), x.flip(dim), x)
        if mode == "flip_permute" and x.shape[2] == x.shape[3] == x.shape[4]:
            perm = torch.randperm(3, generator=gen).tolist()
            x = x.permute(0, 1, *[p + 2 for p in perm]).contiguous()
        if mode == "flip_affine":
            x = _random_affine(x, gen)
        out[role] = x
    return out


#: ``flip_affine``'s ranges: rotation about each axis (degrees), isotropic scaling
#: (fraction) and translation per axis (fraction of the field of view).
AFFINE_DEGREES = 10.0
AFFINE_SCALE = 0.1
AFFINE_SHIFT = 0.06


def _rotation(angle: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """(B, 3, 3) rotations by ``angle`` (B,) radians in the plane of coordinates i and j."""
    m = torch.eye(3).repeat(len(angle), 1, 1)
    c, s = torch.cos(angle), torch.sin(angle)
    m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
    return m


def _random_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each sample of ``x`` (B, C, I, J, K) turned by up to ``AFFINE_DEGREES`` about each
    axis, scaled by 1 +- ``AFFINE_SCALE`` and shifted by up to ``AFFINE_SHIFT`` of the field
    of view per axis, resampled trilinearly with border padding (one ``affine_grid`` +
    ``grid_sample`` for the whole batch). A radiograph (K = 1) turns and shifts in its own
    plane only. The angles are taken in the grid's normalised coordinates, so on a grid that
    is not cubic a turn also shears a little; for an augmentation of a few degrees that is
    harmless. On AdrenalMNIST3D this lifted test AUROC more than any other setting tried
    (see docs/training.md), at about a third more time per epoch."""
    b = x.shape[0]
    flat = x.shape[4] == 1
    # affine_grid's coordinates (0, 1, 2) run along the grid's K, J and I axes.
    angles = (torch.rand(b, 3, generator=gen) * 2 - 1) * math.radians(AFFINE_DEGREES)
    zoom = 1.0 + (torch.rand(b, generator=gen) * 2 - 1) * AFFINE_SCALE
    move = (torch.rand(b, 3, generator=gen) * 2 - 1) * (2.0 * AFFINE_SHIFT)
    if flat:  # only the rotation in the (J, I) plane, no shift along K
        angles[:, 1:] = 0.0
        move[:, 0] = 0.0
    turn = _rotation(angles[:, 0], 1, 2) @ _rotation(angles[:, 1], 0, 2) \
        @ _rotation(angles[:, 2], 0, 1)
    theta = torch.cat([turn / zoom.view(b, 1, 1), move.view(b, 3, 1)], dim=2)
    grid = torch.nn.functional.affine_grid(theta.to(device=x.device, dtype=x.dtype),
                                           list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


def _class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    counts[counts == 0] = 1.0
    w = counts.sum() / (n_classes * counts)
    return torch.tensor(w, dtype=torch.float32)


def _fit_member(net: torch.nn.Module, data: PreparedDataset, clinical: np.ndarray | None,
                recipe: Recipe, *, seed: int, member: int, log_handle: Any,
                progress: Any, task: Any, deadline: float | None) -> dict[str, Any]:
    """Train one network in place (on the GPU when there is one, see medfusion.device);
    returns its history summary (best epoch, val AUROC). The network ends on the CPU.

    A model with several modalities is trained ``staged`` by default (unimodal encoders
    first, then the fusion head on their frozen embeddings); ``fusion_training: joint``
    trains everything at once."""
    if recipe.fusion_training == "staged" and len(net.modalities) > 1:
        return _fit_staged(net, data, clinical, recipe, seed=seed, member=member,
                           log_handle=log_handle, progress=progress, task=task,
                           deadline=deadline)
    return _fit_joint(net, data, clinical, recipe, seed=seed, member=member,
                      log_handle=log_handle, progress=progress, task=task, deadline=deadline)


def _weight_average(model: torch.nn.Module, recipe: Recipe, steps_per_epoch: int
                    ) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics over
    about ``recipe.ema_epochs`` epochs of optimizer steps (None when 0): the averaged copy
    is what validation scores and what an epoch keeps, so the kept network is not one
    noisy step of the optimizer but the mean of its last few epochs."""
    if recipe.ema_epochs <= 0:
        return None
    decay = 1.0 - 1.0 / max(1.0, recipe.ema_epochs * steps_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _cosine_schedule(opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over about one epoch, then cosine decay to 0 over ``epochs``."""
    total_steps = steps_per_epoch * epochs
    warmup = min(steps_per_epoch, max(1, total_steps // 20))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _decisions_collapse(probs: np.ndarray, y: np.ndarray) -> bool:
    """Whether even the best per-class offset (and temperature) leaves one class predicted
    for every validation study while several are present: a ranking (AUROC) with no usable
    decision behind it. Such an epoch is never kept while another is usable."""
    from sklearn.linear_model import LogisticRegression

    if len(y) < 2 or len(np.unique(y)) < 2:
        return False
    logits = np.log(np.clip(probs, 1e-12, 1.0))
    features = logits - logits[:, :1]  # softmax is shift-invariant: class 0 as reference
    # A multinomial logistic regression on the logits contains every temperature + offset
    # recalibration (and is ~40x faster to fit here than the L-BFGS scaler, which matters
    # for the fusion head's hundreds of epochs).
    refit = LogisticRegression(C=100.0, max_iter=200).fit(features[:, 1:], y)
    return len(np.unique(refit.predict(features[:, 1:]))) < 2


def _stopping_score(probs: np.ndarray, y: np.ndarray, to_beat: float = -math.inf
                    ) -> tuple[float, dict[str, Any]]:
    """Early-stopping score: validation AUROC, NLL breaking ties and standing in when the
    validation split lacks a class; an epoch whose decisions collapse to one class even
    after recalibration scores below every epoch whose decisions do not. (The collapse
    check only runs for an epoch that would otherwise beat ``to_beat``, the best score so
    far: the penalty can only lower a score, so the choice is the same.)"""
    m = summary_metrics(probs, y)
    score = (m["auroc"] if m["auroc"] is not None else 0.0) - 1e-3 * m["nll"]
    if score > to_beat and _decisions_collapse(probs, y):
        m["collapsed"] = True
        score -= 1.0
    return score, m


# Stage 2 of staged training fits only the fusion head on cached embeddings: an epoch
# takes milliseconds, so it gets its own generous budget.
HEAD_EPOCHS = 300
HEAD_PATIENCE = 40
HEAD_WARMUP = 10  # epochs before the head's early stopping may pick a state
HEAD_BATCH = 64


def _selectable(epoch: int, recipe: Recipe) -> bool:
    """Whether 1-based ``epoch`` may be kept as the best one (and counts for patience): only
    the second half of the cosine schedule. While the learning rate is high, validation
    AUROC jumps around: on AdrenalMNIST3D's 98 validation studies an image encoder scored
    0.807 by chance at epoch 3 of 30, was kept and stopped at epoch 15, and that late-fusion
    model reached 0.814-0.816 test AUROC against 0.866-0.882 for the other heads of the run,
    whose encoders were kept at epochs 10-29. (A run cut short by ``max_minutes`` before the
    second half keeps its last epoch.)"""
    return epoch >= math.ceil(recipe.epochs / 2)


def _modality_modules(net: torch.nn.Module, modality: str) -> list[torch.nn.Module]:
    """The encoder and LayerNorm that produce one modality's embedding."""
    encoder = net.clinical_encoder if modality == CLINICAL else net.encoders[modality]
    return [encoder, net.norms[modality]]


def _fit_staged(net: torch.nn.Module, data: PreparedDataset, clinical: np.ndarray | None,
                recipe: Recipe, *, seed: int, member: int, log_handle: Any,
                progress: Any, task: Any, deadline: float | None) -> dict[str, Any]:
    """Staged fusion training.

    Joint training lets the modality that fits the training split fastest (an image
    encoder memorising 1,000 volumes) drive the training loss to zero, after which the
    other modalities get no gradient: on AdrenalMNIST3D + simulated clinical variables the
    jointly trained heads stayed within 0.01 AUC of image-only while the sum of the two
    unimodal models' logits was 0.04 ahead (docs/training.md). So:

    1. every encoder is trained on its own, through its own classifier, all in one pass
       over the data (each loss term touches one encoder only), and each keeps its best
       epoch (from the second half of the schedule, see ``_selectable``) by its own
       validation AUROC;
    2. the fusion head is trained on the frozen encoders' embeddings (modality dropout
       still applies), with early stopping on the fused validation AUROC.
    """

    device = select_device()
    net.to(device)
    train_idx, val_idx = data.indices("train"), data.indices("val")
    y_all = torch.from_numpy(data.labels)
    n_classes = len(recipe.labels)
    modalities = list(net.modalities)
    weight = (_class_weights(data.labels[train_idx], n_classes).to(device)
              if recipe.class_weighting else None)
    gen = torch.Generator().manual_seed(seed)
    e = net.config.embed_dim
    # Stage 1 -----------------------------------------------------------------------------
    heads = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Dropout(recipe.dropout), torch.nn.Linear(e, n_classes))
         for _ in modalities]).to(device)
    params = list(net.encoder_parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / recipe.batch_size))
    sched = _cosine_schedule(opt, steps_per_epoch, recipe.epochs)
    trained = torch.nn.ModuleList([net, heads])
    ema = _weight_average(trained, recipe, steps_per_epoch)
    # What validation scores and epochs keep: the weight average when there is one.
    scored_net, scored_heads = (net, heads) if ema is None else (ema.module[0], ema.module[1])
    best: list[dict[str, Any]] = [{"score": -math.inf, "epoch": -1, "auroc": None,
                                   "state": None} for _ in modalities]
    stale = [0] * len(modalities)
    epochs_run = 0
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        net.train()
        heads.train()
        losses = []
        for idx, images, clin, present in _epoch_batches(data, clinical, train_idx, recipe,
                                                         gen, device):
            emb = net.encode(images, clin, present)
            y = y_all[idx].to(device)
            # A sum, not a mean: each term reaches one encoder only, so every encoder gets
            # exactly the gradient it would get if trained alone.
            terms = [torch.nn.functional.cross_entropy(head(emb[present[:, j], j]),
                                                       y[present[:, j]], weight=weight)
                     for j, head in enumerate(heads) if bool(present[:, j].any())]
            loss = torch.stack(terms).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(trained)
            losses.append(float(loss.detach()))
        epochs_run = epoch + 1
        record: dict[str, Any] = {"member": member, "stage": "unimodal", "epoch": epoch + 1,
                                  "train_loss": float(np.mean(losses)) if losses else None,
                                  "lr": float(opt.param_groups[0]["lr"])}
        if len(val_idx):
            _, _, emb_val = run_net(scored_net,
                                    {r: a[val_idx] for r, a in data.images.items()},
                                    None if clinical is None else clinical[val_idx],
                                    data.present[val_idx])
            scored_heads.eval()
            for j, m in enumerate(modalities):
                rows = data.present[val_idx, j]
                if not rows.any():
                    continue
                with torch.no_grad():
                    logits = scored_heads[j](torch.from_numpy(emb_val[rows, j]).to(device))
                probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
                score, metrics = _stopping_score(probs, data.labels[val_idx][rows],
                                                 best[j]["score"])
                record[f"val_auroc_{m}"] = metrics["auroc"]
                record[f"val_accuracy_{m}"] = metrics["accuracy"]
                if metrics.get("collapsed"):
                    record[f"val_collapsed_{m}"] = True
                if not _selectable(epoch + 1, recipe):
                    continue
                if score > best[j]["score"]:
                    best[j] = {"score": score, "epoch": epoch + 1, "auroc": metrics["auroc"],
                               "state": [{k: v.detach().clone()
                                          for k, v in mod.state_dict().items()}
                                         for mod in _modality_modules(scored_net, m)]}
                    stale[j] = 0
                else:
                    stale[j] += 1
        record["seconds"] = round(time.perf_counter() - t0, 3)
        log_handle.write(json.dumps(record, sort_keys=True) + "\n")
        log_handle.flush()
        if progress is not None:
            progress.update(task, advance=1, description=(
                f"member {member + 1}/{recipe.ensemble} unimodal epoch {epoch + 1}"))
        if len(val_idx) and min(stale) >= recipe.patience:
            break
        if deadline is not None and time.monotonic() + record["seconds"] > deadline:
            log.warning("time budget (max_minutes) reached; stopping training early")
            break
    if progress is not None:
        progress.update(task, advance=recipe.epochs - epochs_run)
    for j, m in enumerate(modalities):
        if best[j]["state"] is not None:
            for mod, state in zip(_modality_modules(net, m), best[j]["state"], strict=True):
                mod.load_state_dict(state)
        elif ema is not None:  # no epoch was selectable (cut short): the average so far
            for mod, avg in zip(_modality_modules(net, m), _modality_modules(scored_net, m),
                                strict=True):
                mod.load_state_dict(avg.state_dict())
    # Stage 2 -----------------------------------------------------------------------------
    head_info = _fit_fusion_head(net, data, clinical, recipe, weight=weight, gen=gen,
                                 member=member, log_handle=log_handle)
    net.to("cpu")
    net.eval()
    return {"best_epoch": {m: best[j]["epoch"] for j, m in enumerate(modalities)},
            "val_auroc_unimodal": {m: best[j]["auroc"] for j, m in enumerate(modalities)},
            **head_info}


def _fit_fusion_head(net: torch.nn.Module, data: PreparedDataset, clinical: np.ndarray | None,
                     recipe: Recipe, *, weight: torch.Tensor | None, gen: torch.Generator,
                     member: int, log_handle: Any) -> dict[str, Any]:
    """Stage 2: the fusion head alone, on the frozen encoders' (eval-mode) embeddings."""

    device = module_device(net)
    train_idx, val_idx = data.indices("train"), data.indices("val")

    def embeddings(idx: np.ndarray) -> torch.Tensor:
        _, _, emb = run_net(net, {r: a[idx] for r, a in data.images.items()},
                            None if clinical is None else clinical[idx], data.present[idx])
        return torch.from_numpy(emb).to(device)

    emb_train, emb_val = embeddings(train_idx), embeddings(val_idx) if len(val_idx) else None
    present_train = torch.from_numpy(data.present[train_idx]).to(device)
    y_train = torch.from_numpy(data.labels[train_idx]).to(device)
    head = net.fusion_head
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.learning_rate,
                            weight_decay=recipe.weight_decay)
    best: dict[str, Any] = {"score": -math.inf, "epoch": -1, "val_auroc": None, "state": None}
    stale = 0
    net.train()  # modality dropout follows the network's mode; the encoders are not run
    for epoch in range(HEAD_EPOCHS):
        head.train()
        order = torch.randperm(len(train_idx), generator=gen).to(device)
        losses = []
        for start in range(0, len(order), HEAD_BATCH):
            idx = order[start:start + HEAD_BATCH]
            keep = net.drop_modalities(present_train[idx])
            emb = emb_train[idx] * keep.unsqueeze(-1).to(emb_train.dtype)
            logits, _ = head(emb, keep)
            loss = torch.nn.functional.cross_entropy(logits, y_train[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        record: dict[str, Any] = {"member": member, "stage": "fusion_head", "epoch": epoch + 1,
                                  "train_loss": float(np.mean(losses))}
        if emb_val is not None:
            head.eval()
            with torch.no_grad():
                logits, _ = head(emb_val, torch.from_numpy(data.present[val_idx]).to(device))
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            score, metrics = _stopping_score(probs, data.labels[val_idx], best["score"])
            record.update({"val_loss": metrics["nll"], "val_auroc": metrics["auroc"],
                           "val_accuracy": metrics["accuracy"]})
        else:
            score = -record["train_loss"]
        log_handle.write(json.dumps(record, sort_keys=True) + "\n")
        if epoch + 1 < HEAD_WARMUP:
            continue  # a barely fitted head can top a 100-study validation split by chance
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "val_auroc": record.get("val_auroc"),
                    "state": {k: v.detach().clone() for k, v in head.state_dict().items()}}
            stale = 0
        else:
            stale += 1
            if stale >= HEAD_PATIENCE:
                break
    log_handle.flush()
    if best["state"] is not None:
        head.load_state_dict(best["state"])
    net.eval()
    return {"head_epoch": best["epoch"], "val_auroc": best["val_auroc"]}


def _fit_joint(net: torch.nn.Module, data: PreparedDataset, clinical: np.ndarray | None,
               recipe: Recipe, *, seed: int, member: int, log_handle: Any,
               progress: Any, task: Any, deadline: float | None) -> dict[str, Any]:
    """Joint training: encoders and head together, with auxiliary per-modality losses."""

    device = select_device()
    net.to(device)
    train_idx = data.indices("train")
    val_idx = data.indices("val")
    y_all = torch.from_numpy(data.labels)
    n_classes = len(recipe.labels)
    weight = (_class_weights(data.labels[train_idx], n_classes).to(device)
              if recipe.class_weighting else None)
    gen = torch.Generator().manual_seed(seed)
    # Auxiliary per-modality heads (training only, not saved): each modality's embedding must
    # predict the label on its own too, so a quickly-learnt modality (a clinical shortcut)
    # cannot starve the image encoders of gradient ("modality competition").
    aux = None
    if recipe.aux_loss > 0 and len(net.modalities) > 1:
        aux = torch.nn.ModuleList(
            [torch.nn.Linear(net.config.embed_dim, n_classes) for _ in net.modalities]
        ).to(device)
    params = list(net.parameters()) + ([] if aux is None else list(aux.parameters()))
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate,
                            weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / recipe.batch_size))
    sched = _cosine_schedule(opt, steps_per_epoch, recipe.epochs)
    ema = _weight_average(net, recipe, steps_per_epoch)
    scored = net if ema is None else ema.module  # what validation scores and epochs keep
    best: dict[str, Any] = {"score": -math.inf, "epoch": -1, "state": None, "val_auroc": None}
    stale = 0
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        net.train()
        losses = []
        for idx, images, clin, present in _epoch_batches(data, clinical, train_idx, recipe,
                                                         gen, device):
            out = net(images, clin, present)
            y = y_all[idx].to(device)
            loss = torch.nn.functional.cross_entropy(out.logits, y, weight=weight)
            if aux is not None:
                # Modalities absent or dropped for a sample have an all-zero embedding.
                used = out.embeddings.abs().sum(dim=-1) > 0
                terms = [torch.nn.functional.cross_entropy(head(out.embeddings[used[:, j], j]),
                                                           y[used[:, j]], weight=weight)
                         for j, head in enumerate(aux) if bool(used[:, j].any())]
                if terms:
                    loss = loss + recipe.aux_loss * torch.stack(terms).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(float(loss.detach()))
        record: dict[str, Any] = {
            "member": member,
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)) if losses else None,
            "lr": float(opt.param_groups[0]["lr"]),
        }
        if len(val_idx):
            logits, _, _ = run_net(scored, {r: a[val_idx] for r, a in data.images.items()},
                                   None if clinical is None else clinical[val_idx],
                                   data.present[val_idx])
            probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
            score, m = _stopping_score(probs, data.labels[val_idx], best["score"])
            record.update({"val_loss": m["nll"], "val_auroc": m["auroc"],
                           "val_accuracy": m["accuracy"],
                           "val_collapsed": bool(m.get("collapsed", False))})
        else:
            score = -record["train_loss"] if record["train_loss"] is not None else 0.0
        record["seconds"] = round(time.perf_counter() - t0, 3)
        log_handle.write(json.dumps(record, sort_keys=True) + "\n")
        log_handle.flush()
        if not _selectable(epoch + 1, recipe):
            pass
        elif score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "val_auroc": record.get("val_auroc"),
                    "state": {k: v.detach().clone() for k, v in scored.state_dict().items()}}
            stale = 0
        else:
            stale += 1
        if progress is not None:
            auc = record.get("val_auroc")
            progress.update(task, advance=1, description=(
                f"member {member + 1}/{recipe.ensemble} epoch {epoch + 1}"
                + (f" val AUROC {auc:.3f}" if auc is not None else "")))
        if stale >= recipe.patience:
            if progress is not None:
                progress.update(task, advance=recipe.epochs - epoch - 1)
            break
        # Stop when another epoch like this one would overrun the time budget.
        if deadline is not None and time.monotonic() + record["seconds"] > deadline:
            log.warning("time budget (max_minutes) reached; stopping training early")
            if progress is not None:
                progress.update(task, advance=recipe.epochs - epoch - 1)
            break
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    elif ema is not None:  # no epoch was selectable (cut short): the average so far
        net.load_state_dict(scored.state_dict())
    net.to("cpu")  # calibration, the kernel SVM and the package work on CPU tensors
    net.eval()
    return {"best_epoch": best["epoch"], "val_auroc": best["val_auroc"]}


def fit_note_tokenizers(data: PreparedDataset, rec: Recipe, train_idx: np.ndarray
                        ) -> dict[str, NoteTokenizer]:
    """Fit each text role's tokenizer on the training split's notes (grouped by patient:
    a word enters the vocabulary only when the notes of ``min_patients`` distinct patients
    hold it; ``minilm`` brings its own) and put every row's token ids, (N, max_tokens)
    float32, into ``data.images[role]``. The notes themselves stay in memory."""
    out: dict[str, NoteTokenizer] = {}
    for role, opts in rec.text.items():
        notes = data.notes[role]
        if opts.encoder == "minilm":
            tokenizer = NoteTokenizer.minilm(opts.max_tokens)
        else:
            rows = [i for i in train_idx if notes[i] is not None]
            if not rows:
                raise ManifestError(f"No training study has a `{role}` note: the text role "
                                    "cannot be fitted. Fill the column or drop the role.")
            tokenizer = NoteTokenizer.fit([notes[i] for i in rows],  # type: ignore[misc]
                                          [data.rows[i].patient_id for i in rows],
                                          min_patients=opts.min_patients,
                                          max_tokens=opts.max_tokens)
            log.info("text role %s: %d words kept (each in the notes of at least %d of %d "
                     "training patients)", role, tokenizer.vocab_size - 2, opts.min_patients,
                     tokenizer.n_patients)
        ids = np.zeros((len(notes), tokenizer.max_tokens), dtype=np.float32)
        for i, text in enumerate(notes):
            if text is not None:
                ids[i] = tokenizer.encode(text)
        data.images[role] = ids
        out[role] = tokenizer
    return out


def input_standardization(images: np.ndarray, present: np.ndarray, train_idx: np.ndarray
                          ) -> dict[str, float]:
    """``input_shift`` / ``input_scale`` for one imaging role (``images`` (N, 1, *grid),
    ``present`` (N,) bool): the mean and standard deviation of every voxel of its prepared
    training inputs, accumulated in float64. A constant input keeps scale 1."""
    rows = train_idx[present[train_idx]]
    if len(rows) == 0:
        return {"input_shift": 0.0, "input_scale": 1.0}
    total = total_sq = 0.0
    count = 0
    for i in rows:
        x = images[i].astype(np.float64, copy=False)
        total += float(x.sum())
        total_sq += float(np.square(x).sum())
        count += x.size
    mean = total / count
    var = max(0.0, total_sq / count - mean * mean)
    std = math.sqrt(var)
    return {"input_shift": mean, "input_scale": std if std > 1e-6 * max(1.0, abs(mean)) else 1.0}


def _counts(data: PreparedDataset, labels: tuple[str, ...], roles: tuple[str, ...]
            ) -> dict[str, Any]:
    """Training-data summary without any identifier: counts per split/label and missing."""
    out: dict[str, Any] = {}
    for split in ("train", "val", CALIBRATION_SPLIT, "test"):
        idx = data.indices(split)
        if split == CALIBRATION_SPLIT and not len(idx):
            continue
        c = Counter(int(data.labels[i]) for i in idx)
        out[split] = {
            "n": int(len(idx)),
            "labels": {labels[k]: int(c.get(k, 0)) for k in range(len(labels))},
            "missing": {r: int((~data.present[idx, j]).sum()) for j, r in enumerate(roles)}
            if len(idx) else {},
        }
    return out


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


def train(recipe: str | Path | Mapping[str, Any] | Recipe, manifest: str | Path,
          out: str | Path, *, seed: int = 0, progress: bool = True,
          cache_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Train a model from ``recipe`` on ``manifest`` and write its package to ``out``.

    Returns the package folder. Raises RecipeError / ManifestError on bad input (see
    docs/training.md); studies whose files fail to load are skipped, logged and counted in
    the card (``training.skipped``). ``out`` must be absent or empty (``OUTPUT_EXISTS``
    otherwise, before any work) unless ``overwrite``: then the package files are replaced
    and nothing else in the folder is touched.
    """
    started = time.monotonic()
    rec = load_recipe(recipe)
    manifest = Path(manifest)
    out = Path(out)
    rows = read_manifest(manifest, rec)
    _check_output_folder(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError:
        raise OutputError("The model folder cannot be created or written: choose a writable "
                          "--out folder.") from None
    splits = assign_splits(rows, val_fraction=rec.val_fraction, test_fraction=rec.test_fraction,
                           seed=seed)
    cache = PreparedCache(Path(cache_dir) if cache_dir is not None
                          else default_cache_dir(manifest))
    data = build_dataset(rows, splits, rec, cache)
    topped_up = _top_up_validation(data, rec, seed)
    _carve_calibration(data, rec, seed)
    train_idx, val_idx, test_idx = (data.indices(s) for s in ("train", "val", "test"))
    calib_idx = data.indices(CALIBRATION_SPLIT)
    if len(calib_idx) == 0:
        calib_idx = val_idx  # too few validation studies to hold some back: say so below
    if len(train_idx) == 0 or len(np.unique(data.labels[train_idx])) < 2:
        raise ManifestError("The training split needs studies of at least two labels (after "
                            "skipping studies that failed to load).")
    if data.skipped:
        log.warning("skipped %d studies that failed to load: %s",
                    sum(data.skipped.values()), dict(sorted(data.skipped.items())))

    tokenizers = fit_note_tokenizers(data, rec, train_idx)

    seed_everything(seed)
    preproc = None
    clinical = None
    if rec.clinical:
        preproc = ClinicalPreprocessor({k: dict(v) for k, v in rec.clinical.items()})
        preproc.fit([data.clinical_rows[i] for i in train_idx])
        clinical = np.asarray(preproc.transform(data.clinical_rows), dtype=np.float32)

    config = NetConfig(
        roles={r: RoleNetConfig(encoder=o.encoder, spatial_dims=o.spatial_dims, grid=o.grid,
                                **input_standardization(
                                    data.images[r], data.present[:, rec.roles.index(r)],
                                    train_idx))
               for r, o in rec.modalities.items()},
        n_clinical=0 if clinical is None else int(clinical.shape[1]),
        n_classes=len(rec.labels),
        fusion=rec.fusion,
        embed_dim=rec.embed_dim,
        dropout=rec.dropout,
        modality_dropout=rec.modality_dropout,
        texts={r: TextNetConfig(encoder=o.encoder, vocab_size=tokenizers[r].vocab_size,
                                max_tokens=o.max_tokens,
                                embedding_dropout=o.embedding_dropout)
               for r, o in rec.text.items()},
    )
    deadline = None if rec.max_minutes is None else started + 60.0 * rec.max_minutes
    tensors: dict[str, torch.Tensor] = {}
    members: list[dict[str, Any]] = []
    bar = _progress(progress)
    log_path = out / "metrics.jsonl"
    with log_path.open("w", encoding="utf-8") as handle:
        if bar is not None:
            bar.start()
        task = bar.add_task("training", total=rec.epochs * rec.ensemble) if bar else None
        try:
            for m in range(rec.ensemble):
                member_seed = seed * 1009 + m
                seed_everything(member_seed)
                net = FusionNet(config)
                # The time budget is shared evenly by the members still to train, so a slow
                # first member never leaves the last ones one epoch each.
                member_deadline = None if deadline is None else time.monotonic() + (
                    deadline - time.monotonic()) / (rec.ensemble - m)
                info = _fit_member(net, data, clinical, rec, seed=member_seed, member=m,
                                   log_handle=handle, progress=bar, task=task,
                                   deadline=member_deadline)
                prefix = f"m{m}."
                if rec.weights_dtype == "float16":
                    # Round in place first so calibration, metrics and the kernel SVM all
                    # see exactly the weights the (half-size) package will hold.
                    net.load_state_dict({k: v.half().to(v.dtype) if v.is_floating_point()
                                         else v for k, v in net.state_dict().items()})
                for k, v in net.state_dict().items():
                    v = v.detach().contiguous().clone()
                    if rec.weights_dtype == "float16" and v.is_floating_point():
                        v = v.half()
                    tensors[prefix + k] = v
                entry: dict[str, Any] = {"prefix": prefix, **info}
                if rec.fusion == "kernel":
                    _, _, emb = run_net(net, {r: a[train_idx] for r, a in data.images.items()},
                                        None if clinical is None else clinical[train_idx],
                                        data.present[train_idx])
                    kernel = KernelFusionClassifier(seed=member_seed).fit(
                        emb, data.present[train_idx], data.labels[train_idx])
                    kstate, karrays = kernel.state()
                    entry["kernel"] = kstate
                    for name, arr in karrays.items():
                        tensors[f"{prefix}kernel.{name}"] = torch.from_numpy(
                            np.ascontiguousarray(arr)).clone()
                members.append(entry)
        finally:
            if bar is not None:
                bar.stop()

        card: dict[str, Any] = {
            "format": FORMAT,
            "recipe": rec.to_dict(),
            "labels": list(rec.labels),
            "roles": list(rec.roles),
            "modalities": list(config.modalities),
            "net": config.to_dict(),
            "role_specs": {r: o.role_spec().to_dict() for r, o in rec.modalities.items()},
            "text": {r: t.to_dict() for r, t in tokenizers.items()},
            "clinical": None if preproc is None else {
                "schema": {k: dict(v) for k, v in rec.clinical.items()},
                "preprocessor": preproc.to_dict(),
                "features": list(getattr(preproc, "feature_names", [])),
            },
            "members": members,
            "training": {
                "seed": seed,
                "splits": _counts(data, rec.labels, tuple(config.modalities)),
                "validation_from_train": topped_up,
                "skipped": dict(sorted(data.skipped.items())),
                "seconds": None,
            },
            "metrics": {},
            "calibration": None,
            "input_domain": _input_domain(data, train_idx, rec).to_dict(),
        }
        # A first, uncalibrated model gives the raw probabilities to calibrate on.
        model = FusionModel.from_parts(card, tensors)
        metrics: dict[str, Any] = {}
        calibration: dict[str, Any] | None = None
        def split_arrays(idx: np.ndarray) -> tuple[dict[str, np.ndarray], Any, np.ndarray]:
            return ({r: a[idx] for r, a in data.images.items()},
                    None if clinical is None else clinical[idx], data.present[idx])

        if len(calib_idx):
            # The scaler (two numbers at most) is fitted on the whole validation split: on
            # the held-back half alone (49 studies, 11 positive, on AdrenalMNIST3D) its
            # temperature swung from 0.34 to 0.55 between seeds. Epoch selection ranks by
            # AUROC, which no temperature or offset changes, so the selection half adds
            # studies without adding a choice made on the probabilities' scale.
            fit_idx = np.union1d(val_idx, calib_idx)
            # Raw probabilities and feature shifts depend on the weights only, not on the
            # calibration: one pass over the validation studies serves every step below.
            raw_fit = model.raw_probabilities_arrays(*split_arrays(fit_idx))
            shifts_fit = model_role_shifts(model.nets, *split_arrays(fit_idx))
            fit_rows = {"val": np.searchsorted(fit_idx, val_idx),
                        "calibration": np.searchsorted(fit_idx, calib_idx)}
            prior = (-np.log(_class_weights(data.labels[train_idx], len(rec.labels)).numpy())
                     if rec.class_weighting else None)
            scaler, fit_report = _fit_scaler(raw_fit, data.labels[fit_idx], prior)
            cal = fit_rows["calibration"]
            calibration = _calibrate(scaler, fit_report, raw_fit[cal], data.labels[calib_idx],
                                     [shifts_fit[i] for i in cal])
            # Scores from studies that neither training nor epoch selection saw hold their
            # coverage on new data; the selection split's are optimistic.
            calibration["independent"] = bool(len(data.indices(CALIBRATION_SPLIT)))
            card["calibration"] = calibration
            model = FusionModel.from_parts(card, tensors)
            for name, idx in (("val", val_idx), ("calibration", calib_idx)):
                if name == "calibration" and not calibration["independent"]:
                    continue
                scores = (None if model.shift_reference is None
                          else model.shift_reference.scores_of(
                              [shifts_fit[i] for i in fit_rows[name]]))
                metrics[name] = summary_metrics(model.calibrated(raw_fit[fit_rows[name]], scores),
                                                data.labels[idx])
        if len(test_idx):
            raw_test = model.raw_probabilities_arrays(*split_arrays(test_idx))
            shifts_test = None if model.shift_reference is None else [
                model.shift_reference.score(v)
                for v in model_role_shifts(model.nets, *split_arrays(test_idx))]
            metrics["test"] = summary_metrics(model.calibrated(raw_test, shifts_test),
                                              data.labels[test_idx])
        card["metrics"] = metrics
        card["training"]["seconds"] = round(time.monotonic() - started, 1)
        handle.write(json.dumps({"event": "final", "metrics": metrics,
                                 "temperature": None if calibration is None
                                 else calibration["temperature"]["temperature"]},
                                sort_keys=True) + "\n")
    card["training"]["history"] = _history(log_path)
    card["training"]["warnings"] = _training_warnings(card, data, train_idx, rec)
    for warning in card["training"]["warnings"]:
        log.warning("%s", warning)
    save_package(out, card=card, tensors=tensors)
    return out


_HISTORY_KEYS = ("member", "stage", "epoch", "train_loss", "val_loss", "val_auroc",
                 "val_accuracy", "val_collapsed")


def _history(log_path: Path) -> list[dict[str, Any]]:
    """The per-epoch validation metrics of the encoder epochs (the fusion head's hundreds of
    millisecond epochs stay in metrics.jsonl), for the card and the console summary."""
    out = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "epoch" not in record or record.get("stage") == "fusion_head":
            continue
        out.append({k: v for k, v in record.items()
                    if k in _HISTORY_KEYS or k.startswith(("val_auroc_", "val_accuracy_"))})
    return out


def _training_warnings(card: Mapping[str, Any], data: PreparedDataset, train_idx: np.ndarray,
                       rec: Recipe) -> list[str]:
    """What a user must know before trusting the package: decisions no better than always
    answering the majority label, a degenerate calibration, inputs that do not fit their
    normalisation preset. Plain sentences, no identifiers."""
    warnings: list[str] = []
    splits = card["training"]["splits"]
    for split in ("val", "test"):
        metrics = card["metrics"].get(split) or {}
        counts = list((splits.get(split) or {}).get("labels", {}).values())
        if not metrics.get("n") or not counts or metrics.get("accuracy") is None:
            continue
        majority = max(counts) / sum(counts)
        if metrics["accuracy"] < majority - 1e-9:
            warnings.append(
                f"{split} accuracy {metrics['accuracy']:.3f} is below the majority rate "
                f"{majority:.3f} (always answering the most frequent label): the decisions are "
                "not usable as they are; check the class balance and the calibration.")
    calibration = card.get("calibration") or {}
    scaler = calibration.get("temperature") or {}
    if scaler.get("bound_hit"):
        warnings.append(
            f"calibration hit its search bound (T = {scaler.get('temperature', 1.0):.3g}): "
            "the validation split gives no usable calibration; the probabilities are not "
            "calibrated. Use a larger or more representative validation split.")
    if calibration and not calibration.get("independent", True):
        warnings.append(
            "fewer than 20 validation studies: calibration and conformal scores come from the "
            "studies that also chose the epoch, so prediction-set coverage may be optimistic.")
    if scaler.get("separable"):
        warnings.append(
            "the validation split is separated perfectly, so no calibration was fitted "
            "(T = 1): probabilities may be over-confident; use a larger validation split.")
    warnings += _preset_warnings(data, train_idx, rec)
    return warnings


def _preset_warnings(data: PreparedDataset, train_idx: np.ndarray, rec: Recipe) -> list[str]:
    """A CT preset given intensities that are not Hounsfield units (no air in any study)."""
    out = []
    for role, opts in rec.modalities.items():
        if opts.normalization != "ct":
            continue
        quantities = [q for i in train_idx if (q := data.quantities.get(role, [])[i])]
        lows = [q["p01"] for q in quantities if "p01" in q]
        highs = [q["p99"] for q in quantities if "p99" in q]
        if not lows or min(lows) < -200.0:
            continue
        lo, hi = opts.ct_window
        fit = ("normalization: none" if max(highs) <= 1.5 and min(lows) >= -0.5
               else "normalization: mr (z-score per volume)")
        out.append(
            f"`{role}` uses the CT preset (HU window [{lo:g}, {hi:g}]), but no training study "
            f"has air (1st intensity percentiles {min(lows):g} to {max(lows):g}, 99th up to "
            f"{max(highs):g}): these intensities do not look like Hounsfield units. Convert "
            f"them to HU, or set {fit} for `{role}` in the recipe.")
    return out


CALIBRATION_SPLIT = "calibration"


#: share of the training split moved to a small validation split when the recipe says `auto`
AUTO_VALIDATION_FROM_TRAIN = 0.15


def _top_up_validation(data: PreparedDataset, rec: Recipe, seed: int) -> dict[str, Any]:
    """Move part of the training split (grouped by patient, stratified) to the validation
    split, which fits the calibration: ``validation_from_train`` of it, or with ``auto``
    (None) 15% when the validation split holds fewer than half of ``val_fraction`` of the
    studies, as when a manifest names a small one. A small validation split places the
    probabilities' level poorly: 22 positive studies leave the log-odds of the rate
    uncertain by about 0.24, and a named split can differ from the test split in a way no
    calibration fitted on it alone can see. Returns what the card records."""
    train_idx = data.indices("train")
    n_val = len(data.indices("val"))
    share = n_val / max(1, len(data.splits))
    fraction = rec.validation_from_train
    if fraction is None:
        fraction = AUTO_VALIDATION_FROM_TRAIN if share < rec.val_fraction / 2 else 0.0
    record = {"setting": "auto" if rec.validation_from_train is None else "fixed",
              "fraction": fraction, "moved": 0, "val_share_before": round(share, 4)}
    if fraction <= 0 or len(train_idx) == 0:
        return record
    groups = np.array([data.rows[i].patient_id for i in train_idx])
    move = grouped_holdout(data.labels[train_idx], groups, fraction, seed + 5)
    for i in train_idx[move]:
        data.splits[i] = "val"
    record["moved"] = int(move.sum())
    log.info("moved %d of %d training studies to the validation split, which held %d "
             "(validation_from_train %s = %.2f)", record["moved"], len(train_idx), n_val,
             record["setting"], fraction)
    return record


def _carve_calibration(data: PreparedDataset, rec: Recipe, seed: int) -> None:
    """Hold back ``calibration_fraction`` of the validation split (grouped by patient,
    stratified) for calibration, the feature-shift reference and conformal scores: the
    epoch and the fusion head are then chosen on the rest, so the conformal scores come
    from studies the selection never saw. Needs at least 2 x MIN_CALIBRATION validation
    studies; with fewer, validation serves both (recorded as ``independent: false``)."""
    val_idx = data.indices("val")
    if rec.calibration_fraction <= 0 or len(val_idx) < 2 * MIN_CALIBRATION:
        if rec.calibration_fraction > 0 and len(val_idx):
            log.warning("only %d validation studies: calibration uses the same studies as "
                        "epoch selection (conformal coverage may be optimistic)", len(val_idx))
        return
    groups = np.array([data.rows[i].patient_id for i in val_idx])
    hold = grouped_holdout(data.labels[val_idx], groups, rec.calibration_fraction, seed + 3)
    for i in val_idx[hold]:
        data.splits[i] = CALIBRATION_SPLIT


def _check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse to write a package over anything, unless told to (and even then only the
    package's own files are replaced)."""
    if overwrite or not out.is_dir():
        return
    try:
        occupied = any(out.iterdir())
    except OSError:
        raise OutputError("The model folder cannot be read: choose a writable --out folder."
                          ) from None
    if occupied:
        what = "a model package" if (out / "model.json").exists() else "files"
        raise OutputError(
            f"The model folder already holds {what}; choose a new --out folder, or pass "
            "--overwrite to replace the package files in it (other files are kept).",
            code="OUTPUT_EXISTS",
        )


def _input_domain(data: PreparedDataset, train_idx: np.ndarray, rec: Recipe) -> InputDomain:
    """The acquisition and clinical ranges of the training split (uncertainty.domain)."""
    role_quantities = {
        role: [q for i in train_idx if (q := data.quantities.get(role, [])[i]) is not None]
        for role in rec.roles}
    numeric = [c for c, spec in rec.clinical.items() if spec.get("type", "numeric") == "numeric"]
    return InputDomain.fit(role_quantities, [data.clinical_rows[i] for i in train_idx], numeric)


def _fit_scaler(raw_probs: np.ndarray, y: np.ndarray, prior_bias: np.ndarray | None = None
                ) -> tuple[LogitScaler, dict[str, Any] | None]:
    """Temperature scaling, with a per-class offset when cross-validation prefers it (on
    log raw probabilities; ``prior_bias`` is the correction class weighting needs)."""
    logits = np.log(np.clip(raw_probs, 1e-12, 1.0))
    if len(y) >= MIN_CALIBRATION and len(np.unique(y)) == raw_probs.shape[1]:
        return fit_calibration(logits, y, prior_bias=prior_bias)
    # A handful of validation studies cannot pin a temperature down (a fit on 3 studies
    # gave T = 0.06, i.e. wildly over-confident): keep T = 1 and say so in the card.
    log.warning("validation split too small to fit a temperature; using T = 1")
    return TemperatureScaler.from_dict({"temperature": 1.0, "n_samples": 0}), None


def _calibrate(scaler: LogitScaler, fit_report: dict[str, Any] | None, raw_probs: np.ndarray,
               y: np.ndarray, role_shifts: list[dict[str, float]]) -> dict[str, Any]:
    """The card's calibration entry: the fitted ``scaler``, and the feature-shift reference
    and conformal scores fitted on ``(raw_probs, y)`` (the distance-aware probabilities
    predictions use), which are the studies epoch selection never saw when the validation
    split is large enough to hold some back."""
    logits = np.log(np.clip(raw_probs, 1e-12, 1.0))
    probs = scaler.transform(logits)
    reference = None
    if len(y) >= MIN_CALIBRATION:
        reference = ShiftReference.fit(role_shifts)
        probs = reference.adjust(probs, reference.scores_of(role_shifts))
    else:
        # The same few studies would make the largest of them the out-of-distribution
        # threshold: keep the package's shift unfitted (fixed flag, no adjustment).
        log.warning("validation split too small to fit the feature-shift reference")
    conformal = ConformalPredictor(method="lac").fit(probs, y)
    return {"temperature": scaler.to_dict(), "fit": fit_report,
            "conformal": conformal.to_dict(),
            "shift": None if reference is None else reference.to_dict(), "n": int(len(y))}
