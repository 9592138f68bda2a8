"""``explain_prediction``: every explanation of one prepared study, as an Explanation.

* ``saliency``: occlusion sensitivity (the default), Grad-CAM or Grad-CAM++ per present
  imaging role, averaged over ensemble
  members, mapped onto the source volume's exact grid (roles whose source volume was not
  kept, e.g. ``PreparedInputs.lite()``, are skipped);
* ``modality_weights``: the fusion head's attention alphas / gates (None for heads without);
* ``shapley``: exact modality Shapley values of the calibrated target probability;
* ``clinical_attributions``: integrated gradients per original clinical variable.

Shapley values and clinical attributions explain the fusion network's own head, averaged
over ensemble members; for ``kernel`` fusion the prediction comes from the SVM instead, so
they describe the network it was trained from, not the SVM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

from medfusion.errors import ExplanationError
from medfusion.explain.attribution import (
    CLINICAL,
    attention_weights,
    clinical_attributions,
    modality_shapley,
)
from medfusion.explain.export import saliency_to_source
from medfusion.explain.gradcam import METHODS, role_cam
from medfusion.explain.occlusion import role_occlusion
from medfusion.models.net import FusionNet
from medfusion.models.protocol import TrainedModel, base_rate, temperature_of
from medfusion.types import Explanation, Volume

__all__ = ["CAM_METHODS", "DEFAULT_CAM_METHOD", "base_rate", "explain_prediction"]

#: saliency methods by their command-line name (``--cam-method``) -> internal name
CAM_METHODS = {"occlusion": "occlusion", "gradcam": "gradcam", "gradcam++": "gradcampp"}
#: what ``--explain`` draws unless told otherwise: the method that measurably finds the
#: evidence (medfusion.explain.occlusion); Grad-CAM is one forward pass instead of ~1,300
DEFAULT_CAM_METHOD = "occlusion"

log = logging.getLogger("medfusion.explain")


class PreparedStudy(Protocol):
    """What explanations read from one prepared study
    (``medfusion.inference.PreparedInputs`` has it)."""

    tensors: Mapping[str, np.ndarray]
    present: np.ndarray
    clinical: np.ndarray | None
    prepared: Mapping[str, Volume]
    sources: Mapping[str, Volume]


def _inputs(prepared: PreparedStudy, net: FusionNet
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    images = {
        r: torch.from_numpy(np.ascontiguousarray(prepared.tensors[r], dtype=np.float32))[None]
        for r in [*net.config.roles, *net.config.texts]
        if r in prepared.tensors
    }
    clinical = None
    if prepared.clinical is not None:
        clinical = torch.from_numpy(np.asarray(prepared.clinical, dtype=np.float32))[None]
    present = torch.from_numpy(np.asarray(prepared.present, dtype=bool))[None]
    return images, clinical, present


def explain_prediction(
    model: TrainedModel,
    prepared: PreparedStudy,
    target: int,
    method: str = DEFAULT_CAM_METHOD,
    *,
    clinical: bool = True,
) -> Explanation:
    """Explain class ``target`` for one study prepared by ``FusionModel.prepare``.

    ``model`` is any :class:`~medfusion.models.protocol.TrainedModel` (a loaded
    ``medfusion.FusionModel`` is one); ``method`` is ``"occlusion"`` (default),
    ``"gradcam"`` or ``"gradcampp"`` (``"gradcam++"`` is the same); ``clinical=False``
    skips integrated gradients.
    """
    method = CAM_METHODS.get(method, method)
    if method != "occlusion" and method not in METHODS:
        raise ExplanationError(f"unknown saliency method {method!r}; use one of "
                               f"{sorted(CAM_METHODS)}.")
    nets = list(model.nets)
    modalities = list(model.modalities)
    present_flags = [bool(p) for p in np.asarray(prepared.present).ravel()]
    if len(present_flags) != len(modalities):
        raise ExplanationError("prepared inputs do not match the model's modalities.")
    temperature = temperature_of(model)
    prior = base_rate(model, target)

    cams: dict[str, list[np.ndarray]] = {}
    shapley_runs: list[dict[str, float]] = []
    clinical_runs: list[dict[str, float]] = []
    weight_runs: list[Mapping[str, float]] = []
    preproc = model.preprocessor
    kernels = list(model.kernels)
    for member, net in enumerate(nets):
        kernel = kernels[member] if kernels else None  # fusion: kernel predicts with an SVM
        images, clin, present = _inputs(prepared, net)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                embeddings = net.encode(images, clin, present)
                weights = net.head(embeddings, present).weights
            w = attention_weights(weights, modalities, present_flags)
            if w is not None:
                weight_runs.append(w)
            shapley_runs.append(modality_shapley(
                net, embeddings, present, target, temperature=temperature, base_rate=prior,
                kernel=kernel))
            if (clinical and preproc is not None and clin is not None
                    and CLINICAL in modalities and present_flags[modalities.index(CLINICAL)]):
                clinical_runs.append(clinical_attributions(
                    net, embeddings, present, clin, target, list(preproc.feature_names),
                    variables=[*preproc.numeric, *preproc.categorical] or None,
                    temperature=temperature, kernel=kernel))
            for role in net.config.roles:
                if present_flags[modalities.index(role)] and role in prepared.sources:
                    cams.setdefault(role, []).append(
                        role_occlusion(net, role, images, clin, present, target)[0]
                        if method == "occlusion"
                        else role_cam(net, role, images, clin, present, target, method)[0])
        finally:
            net.train(was_training)

    saliency: dict[str, Volume] = {}
    for role, maps in sorted(cams.items()):
        mean = np.mean(maps, axis=0)
        top = float(mean.max())
        mean = mean / top if top > 0 else mean
        saliency[role] = saliency_to_source(mean, prepared.prepared[role],
                                            prepared.sources[role])
    skipped = [r for r in net.config.roles
               if present_flags[modalities.index(r)] and r not in prepared.sources]
    if skipped:
        log.info("no source volume kept for %s; saliency not mapped", ", ".join(skipped))
    return Explanation(
        saliency=saliency,
        modality_weights=_mean_dict(weight_runs),
        shapley=_mean_dict(shapley_runs),
        clinical_attributions=_mean_dict(clinical_runs),
        method=method,
    )


def _mean_dict(runs: list[Mapping[str, float]]) -> dict[str, float] | None:
    if not runs:
        return None
    keys = sorted(set().union(*runs))
    return {k: float(np.mean([r.get(k, 0.0) for r in runs])) for k in keys}
