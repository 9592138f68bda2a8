"""Which modality, which clinical variable drove a prediction.

Modality Shapley values (exact). The players are the study's *present* modalities; the
value of a subset ``S`` is the calibrated probability of the target class when the network
sees only ``S`` (the others marked absent, exactly as for a study that lacks them: the
missing-modality path the network was trained with via modality dropout). The empty set has
no network output, so ``v({})`` is the *base rate*: the target class's prevalence in the
training data when known, else ``1 / n_classes``. Then ``sum_i phi_i = v(all) - v({})``.
Encoders run once; each of the ``2^M - 1`` subsets costs one pass of the fusion head, all in
a single batch (M <= 10 enforced, 1023 head rows).

Clinical attributions: integrated gradients (captum) of the calibrated target probability
with respect to the preprocessed clinical features, from a baseline of zeros (the training
mean of every standardised numeric feature and of its missing indicator; "no category" for
one-hot columns), then summed back onto the original variables (``sex=F`` and ``sex=M``
onto ``sex``, ``crp_missing`` onto ``crp``). The image embeddings are held fixed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medfusion.errors import ExplanationError

CLINICAL = "clinical"
MAX_SHAPLEY_PLAYERS = 10


def _eval_head_probs(
    net: nn.Module, embeddings: torch.Tensor, present: torch.Tensor, temperature: float
) -> torch.Tensor:
    logits = net.head(embeddings, present).logits
    return torch.softmax(logits.double() / float(temperature), dim=-1)


def modality_shapley(
    net: nn.Module,
    embeddings: torch.Tensor,
    present: torch.Tensor,
    target: int,
    *,
    temperature: float = 1.0,
    base_rate: float | None = None,
    kernel: object | None = None,
) -> dict[str, float]:
    """Exact Shapley value of every present modality of ONE study (batch of 1).

    ``embeddings`` (1, M, E) from ``net.encode``; ``present`` (1, M) bool. Returns
    ``{modality: phi}`` for the present modalities (absent ones are not players).
    ``kernel``: for ``fusion: kernel`` models, the fitted
    :class:`~medfusion.models.kernel.KernelFusionClassifier` whose probabilities (not the
    network head's) the model predicts with; the subsets then go through its kernels.
    """
    modalities = list(net.modalities)
    present = torch.as_tensor(present).to(torch.bool)
    if embeddings.ndim != 3 or embeddings.shape[0] != 1 or present.shape != (1, len(modalities)):
        raise ExplanationError("modality_shapley explains one study: embeddings (1, M, E).")
    n_classes = int(net.config.n_classes)
    if not 0 <= int(target) < n_classes:
        raise ExplanationError(f"target class {target} is outside 0..{n_classes - 1}.")
    players = [i for i in range(len(modalities)) if bool(present[0, i])]
    m = len(players)
    if m == 0:
        raise ExplanationError("the study has no modality present.")
    if m > MAX_SHAPLEY_PLAYERS:
        raise ExplanationError(
            f"{m} modalities make 2^{m} subsets; exact Shapley is limited to "
            f"{MAX_SHAPLEY_PLAYERS}."
        )
    v0 = 1.0 / n_classes if base_rate is None else float(base_rate)
    if not 0.0 <= v0 <= 1.0:
        raise ExplanationError(f"base_rate must be a probability, got {base_rate}.")
    subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    masks = torch.zeros(len(subsets), len(modalities), dtype=torch.bool)
    for row, subset in enumerate(subsets):
        for p in subset:
            masks[row, players[p]] = True
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            if kernel is None:
                probs = _eval_head_probs(
                    net, embeddings.expand(len(subsets), -1, -1), masks, temperature
                )[:, int(target)]
            else:
                emb = embeddings.expand(len(subsets), -1, -1).double().numpy()
                emb = emb * masks.numpy()[:, :, None]  # absent = zero, as net.encode does
                raw = np.asarray(kernel.predict_proba(emb, masks.numpy()), dtype=np.float64)
                logits = torch.from_numpy(np.log(np.clip(raw, 1e-12, 1.0)))
                probs = torch.softmax(logits / float(temperature), dim=-1)[:, int(target)]
    finally:
        net.train(was_training)
    value = {frozenset(s): float(p) for s, p in zip(subsets, probs.tolist(), strict=True)}
    value[frozenset()] = v0
    phi = {}
    for i in range(m):
        others = [j for j in range(m) if j != i]
        total = 0.0
        for r in range(m):
            weight = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
            for s in itertools.combinations(others, r):
                total += weight * (value[frozenset((*s, i))] - value[frozenset(s)])
        phi[modalities[players[i]]] = total
    return phi


def variable_of(feature: str, variables: Sequence[str]) -> str:
    """The original clinical variable a preprocessed feature column belongs to.

    Follows :class:`medfusion.models.clinical.ClinicalPreprocessor` naming: ``age``,
    ``age_missing`` (indicator), ``sex=F`` (one-hot level).
    """
    known = set(variables)
    if feature in known:
        return feature
    if "=" in feature and feature.split("=", 1)[0] in known:
        return feature.split("=", 1)[0]
    if feature.endswith("_missing") and feature[: -len("_missing")] in known:
        return feature[: -len("_missing")]
    return feature


def clinical_attributions(
    net: nn.Module,
    embeddings: torch.Tensor,
    present: torch.Tensor,
    clinical: torch.Tensor,
    target: int,
    feature_names: Sequence[str],
    *,
    variables: Sequence[str] | None = None,
    temperature: float = 1.0,
    baseline: torch.Tensor | None = None,
    n_steps: int = 32,
    kernel: object | None = None,
) -> dict[str, float]:
    """Integrated gradients per original clinical variable for a batch of ONE study.

    ``embeddings`` (1, M, E) as from ``net.encode`` (image rows are reused); ``clinical``
    (1, F) preprocessed features named by ``feature_names``; ``variables`` the original
    variable names (default: derived from the feature names). Completeness holds:
    the attributions sum to ``p(clinical) - p(baseline)`` up to the integration error.

    With ``kernel`` (a ``fusion: kernel`` model's SVM, which has no gradients) the
    attributions are captum's Shapley value sampling over the variables instead (each
    variable's features switched between baseline and value together; the values add up
    to ``p(clinical) - p(baseline)`` exactly), of the SVM's calibrated probability.
    """
    from captum.attr import IntegratedGradients, ShapleyValueSampling

    modalities = list(net.modalities)
    if CLINICAL not in modalities:
        raise ExplanationError("the model has no clinical input to attribute.")
    c = modalities.index(CLINICAL)
    present = torch.as_tensor(present).to(torch.bool)
    if not bool(present[0, c]):
        raise ExplanationError("the study has no clinical record; nothing to attribute.")
    clinical = torch.as_tensor(clinical, dtype=embeddings.dtype)
    if clinical.ndim != 2 or clinical.shape[0] != 1 or clinical.shape[1] != len(feature_names):
        raise ExplanationError(
            f"clinical must be (1, {len(feature_names)}) matching feature_names, "
            f"got {tuple(clinical.shape)}."
        )
    clinical_only = torch.zeros_like(present)
    clinical_only[:, c] = True
    fixed = embeddings.detach()

    def forward(features: torch.Tensor) -> torch.Tensor:
        k = features.shape[0]
        emb_clin = net.encode({}, features, clinical_only.expand(k, -1))[:, c]
        emb = fixed.expand(k, -1, -1).clone()
        emb[:, c] = emb_clin
        if kernel is not None:
            raw = np.asarray(kernel.predict_proba(emb.detach().double().numpy(),
                                                  present.expand(k, -1).numpy()))
            logits = torch.from_numpy(np.log(np.clip(raw, 1e-12, 1.0)))
            return torch.softmax(logits / float(temperature), dim=-1)[:, int(target)]
        return _eval_head_probs(net, emb, present.expand(k, -1), temperature)[:, int(target)]

    base = torch.zeros_like(clinical) if baseline is None else torch.as_tensor(
        baseline, dtype=clinical.dtype
    ).reshape(clinical.shape)
    names = list(variables) if variables is not None else sorted(
        {f.split("=", 1)[0] for f in feature_names}
    )
    groups = [variable_of(f, names) for f in feature_names]
    was_training = net.training
    try:
        net.eval()
        if kernel is not None:
            order = sorted(set(groups))
            mask = torch.tensor([[order.index(g) for g in groups]])
            with torch.no_grad():
                attr = ShapleyValueSampling(forward).attribute(
                    clinical.detach().clone(), baselines=base, feature_mask=mask,
                    n_samples=max(1, int(n_steps)))
            # every feature of a variable carries the variable's value: take it once
            return {g: float(attr[0, groups.index(g)]) for g in order}
        with torch.enable_grad():
            attr = IntegratedGradients(forward).attribute(
                clinical.detach().clone(), baselines=base, n_steps=int(n_steps),
                method="gausslegendre",
            )
    finally:
        net.train(was_training)
    out: dict[str, float] = {}
    for var, value in zip(groups, attr[0].tolist(), strict=True):
        out[var] = out.get(var, 0.0) + float(value)
    return out


def attention_weights(weights: torch.Tensor | np.ndarray | None,
                      modalities: Sequence[str],
                      present: Sequence[bool]) -> Mapping[str, float] | None:
    """The head's per-modality weights of one study as ``{modality: weight}`` (present only)."""
    if weights is None:
        return None
    w = np.asarray(weights.detach().cpu() if hasattr(weights, "detach") else weights).ravel()
    return {m: float(w[i]) for i, m in enumerate(modalities) if bool(present[i])}
