"""Per-study trust numbers for a trained model, computed from one encoder pass.

They combine uncertainty (MC dropout, feature shift) with explanation (Shapley values), so
they live here, above both. :func:`trust_outputs` is what ``FusionModel.predict_prepared``
calls: for a single-network
model it draws MC-dropout samples of the fusion head (mutual information and the spread of
the predicted class's probability; an ensemble gets those from its members instead), and
for every model it computes exact modality Shapley values and the feature-statistics shift
(:mod:`medfusion.uncertainty.shift`, flag ``OUT_OF_DISTRIBUTION``).

Determinism: every study gets its own dropout stream seeded by ``seed`` alone, so a study's
numbers do not depend on which other studies share its batch (1 worker == N workers).

Shapley target: for a binary model always the *positive* class (index 1), so the signs
compare across studies (positive = pushes towards the second label); for more classes the
predicted class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from medfusion.explain.attribution import modality_shapley
from medfusion.models.protocol import TrainedModel, base_rate, temperature_of
from medfusion.numerics import softmax
from medfusion.uncertainty.mc import dropout_modules, dropout_only
from medfusion.uncertainty.metrics import mutual_information
from medfusion.uncertainty.shift import (
    FLAG_OOD,
    SHIFT_FLAG_THRESHOLD,
    ShiftReference,
    raw_shift,
    record_shift,
    role_shifts_of,
)

#: MC-dropout head passes per study (head only: ~1 ms each for the default head)
DEFAULT_SAMPLES = 20


@dataclass(frozen=True)
class TrustOutputs:
    """``mutual_info`` / ``prob_std`` per study (None when MC dropout was not used),
    ``mc_probs`` (S, N, C) and ``shapley`` per study (None where not computable)."""

    mutual_info: list[float] | None
    prob_std: list[float] | None
    mc_probs: np.ndarray | None
    shapley: list[dict[str, float] | None]
    feature_shift: list[float] | None = None
    flags: list[tuple[str, ...]] | None = None
    #: conformal p-values of ``feature_shift`` against validation (None without reference)
    shift_pvalue: list[float] | None = None


def shapley_target(n_classes: int, probs_row: np.ndarray) -> int:
    """The class whose calibrated probability Shapley values decompose (see module doc)."""
    return 1 if n_classes == 2 else int(np.argmax(probs_row))


def trust_outputs(
    model: TrainedModel,
    images: Mapping[str, np.ndarray],
    clinical: np.ndarray | None,
    present: np.ndarray,
    probs: np.ndarray,
    *,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    shapley: bool = True,
    shift_reference: ShiftReference | None = None,
) -> TrustOutputs:
    """MC-dropout uncertainty (single-network models) and modality Shapley values.

    ``images`` / ``clinical`` / ``present`` are the stacked batch arrays the model predicted
    on, ``probs`` its calibrated probabilities (N, C); ``shift_reference`` the validation
    reference of the feature shift (None: the raw shift against a fixed threshold).
    """
    nets = list(model.nets)
    n = int(np.asarray(present).shape[0])
    temperature = temperature_of(model)
    use_mc = len(nets) == 1 and not model.kernels and bool(dropout_modules(nets[0]))
    n_classes = int(np.asarray(probs).shape[1])
    targets = [shapley_target(n_classes, np.asarray(probs)[i]) for i in range(n)]
    priors = {t: base_rate(model, t) for t in set(targets)}
    per_member: list[list[dict[str, float]]] = []
    mc = np.zeros((n_samples, n, n_classes)) if use_mc else None
    shifts: list[list[dict[str, float]]] = [[] for _ in range(n)]
    kernels = list(model.kernels)
    for member, net in enumerate(nets):
        kernel = kernels[member] if kernels else None
        was_training = net.training
        member_phi: list[dict[str, float]] = []
        try:
            net.eval()
            for i in range(n):
                imgs = {r: torch.from_numpy(np.ascontiguousarray(a[i:i + 1], dtype=np.float32))
                        for r, a in images.items()}
                clin = None if clinical is None else torch.from_numpy(
                    np.ascontiguousarray(clinical[i:i + 1], dtype=np.float32))
                pres = torch.from_numpy(np.ascontiguousarray(present[i:i + 1], dtype=bool))
                with record_shift(net.encoders) as rec, torch.no_grad():
                    emb = net.encode(imgs, clin, pres)
                shifts[i].append(role_shifts_of(rec))
                if shapley:
                    member_phi.append(modality_shapley(
                        net, emb, pres, targets[i], temperature=temperature,
                        base_rate=priors[targets[i]], kernel=kernel))
                if mc is not None:
                    with torch.random.fork_rng(devices=[]), torch.no_grad(), dropout_only(net):
                        torch.manual_seed(int(seed))
                        logits = net.head(emb.expand(n_samples, -1, -1),
                                          pres.expand(n_samples, -1)).logits
                    mc[:, i] = softmax(logits.double().numpy() / temperature)
        finally:
            net.train(was_training)
        per_member.append(member_phi)
    phi: list[dict[str, float] | None] = [None] * n
    if shapley:
        for i in range(n):
            keys = sorted(per_member[0][i])
            phi[i] = {k: float(np.mean([m[i][k] for m in per_member])) for k in keys}
    # per role, the mean over ensemble members; then normalised by the validation reference
    per_role = [{r: float(np.mean([m[r] for m in v])) for r in v[0]} for v in shifts]
    reference = shift_reference
    if reference is None:
        # The fixed threshold was set for image features averaged over many cells; a
        # note's pooled features score about 1 on typical notes, so without a validation
        # reference only the image roles are scored.
        text_roles = set(nets[0].config.texts) if nets else set()
        per_role = [{k: v for k, v in r.items() if k not in text_roles} for r in per_role]
    shift = [reference.score(r) if reference is not None else raw_shift(r) for r in per_role]
    pvalues = None
    if reference is not None:
        flagged = reference.flagged(shift)
        pvalues = [float(v) for v in reference.pvalues(shift)]
    else:  # a package trained before validation-fitted references
        flagged = np.asarray(shift) > SHIFT_FLAG_THRESHOLD
    flags = [(FLAG_OOD,) if bool(f) else () for f in flagged]
    if mc is None:
        return TrustOutputs(None, None, None, phi, shift, flags, pvalues)
    mean = mc.mean(axis=0)
    top = mean.argmax(axis=1)
    std = mc.std(axis=0)[np.arange(n), top]
    return TrustOutputs(
        mutual_info=[float(v) for v in mutual_information(mc)],
        prob_std=[float(v) for v in std],
        mc_probs=mc,
        shapley=phi,
        feature_shift=shift,
        flags=flags,
        shift_pvalue=pvalues,
    )
