"""Sanity checks for saliency maps (Adebayo et al., 2018; Samek et al., 2017).

* :func:`randomization_check`: re-initialise the network's weights and recompute the map.
  A saliency method that still draws the same picture explains the input, not the model;
  the Spearman rank correlation between the two maps should be low.
* :func:`deletion_auc`: remove voxels in order of decreasing saliency (replace them by a
  baseline value) and follow the target probability; a map that points at what the model
  uses makes it fall fast, i.e. a *smaller* area under the curve than a random ordering
  (:func:`random_deletion_auc`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from medfusion.errors import ExplanationError


def randomize_weights(net: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``net`` with every parameter re-initialised (``reset_parameters``),
    BatchNorm statistics reset too. The original is untouched."""
    clone = copy.deepcopy(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            reset_stats = getattr(module, "reset_running_stats", None)
            if callable(reset_stats):
                reset_stats()
    return clone


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps (0 when either is constant)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ExplanationError(f"maps differ in size: {a.shape} vs {b.shape}.")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def randomization_check(
    saliency_fn: Callable[[nn.Module], np.ndarray], net: nn.Module, seed: int = 0
) -> float:
    """Rank correlation between ``saliency_fn(net)`` and ``saliency_fn(randomized net)``."""
    return rank_correlation(saliency_fn(net), saliency_fn(randomize_weights(net, seed)))


def deletion_curve(
    prob_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    saliency: np.ndarray,
    *,
    steps: int = 20,
    baseline: float | None = None,
) -> np.ndarray:
    """Target probability after deleting the top 0, 1/steps, ..., all voxels by saliency.

    ``prob_fn`` maps a batch of images (n, *image.shape) to target probabilities (n,);
    ``baseline`` is the value deleted voxels get (default: the image's median, i.e.
    typical tissue; the minimum would carve dark holes the model has never seen).
    Ties in the saliency are broken by voxel order (deterministic).
    """
    image = np.asarray(image, dtype=np.float32)
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.shape != image.shape:
        raise ExplanationError(f"saliency {saliency.shape} and image {image.shape} differ.")
    fill = float(np.median(image)) if baseline is None else float(baseline)
    order = np.argsort(-saliency.ravel(), kind="stable")
    n = order.size
    batch = np.repeat(image.reshape(1, -1), steps + 1, axis=0)
    for s in range(1, steps + 1):
        batch[s, order[: int(round(n * s / steps))]] = fill
    return np.asarray(prob_fn(batch.reshape(steps + 1, *image.shape)), dtype=np.float64)


def deletion_auc(
    prob_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    saliency: np.ndarray,
    *,
    steps: int = 20,
    baseline: float | None = None,
) -> float:
    """Normalised area under the deletion curve (trapezoid over [0, 1]); lower is better."""
    curve = deletion_curve(prob_fn, image, saliency, steps=steps, baseline=baseline)
    return float(np.trapezoid(curve, dx=1.0 / steps))


def random_deletion_auc(
    prob_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    *,
    n_maps: int = 5,
    seed: int = 0,
    steps: int = 20,
    baseline: float | None = None,
) -> float:
    """Mean deletion AUC of ``n_maps`` random saliency maps (the reference to beat)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([
        deletion_auc(prob_fn, image, rng.random(np.shape(image)), steps=steps,
                     baseline=baseline)
        for _ in range(n_maps)
    ]))
