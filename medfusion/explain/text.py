"""Token attributions of a note: which words moved the prediction.

**They quote the note** (each token is a word of it, lower-cased, or ``[UNK]``), so they
are offered through the Python API only and never written by ``predict``, ``score`` or
``report``: handle the result as the note itself.

Integrated gradients (captum ``LayerIntegratedGradients``) on the ``gru`` encoder's token
embeddings, from a baseline note of the same length made of ``[UNK]`` tokens (what the model
sees for words it does not know) to the note, of the
logit of class ``target`` divided by the calibration temperature, with every other input
of the study held fixed; averaged over the ensemble members. The attributions of one member
sum to the change of that logit from the baseline (completeness; captum's convergence delta
is returned to check it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from medfusion.errors import ExplanationError
from medfusion.models.protocol import TrainedModel, temperature_of
from medfusion.models.text import UNK, GRUTextEncoder, NoteTokenizer


class PreparedNote(Protocol):
    """What token attributions read from one prepared study (``PreparedInputs`` has it)."""

    tensors: Mapping[str, np.ndarray]
    present: np.ndarray
    clinical: np.ndarray | None


@dataclass(frozen=True)
class TokenAttributions:
    """``tokens[i]`` and its attribution ``scores[i]`` for the first ``len(tokens)`` tokens
    of the note; ``delta``: the largest completeness error over the ensemble members."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    target: int
    delta: float

    def pairs(self) -> list[tuple[str, float]]:
        return list(zip(self.tokens, self.scores, strict=True))


def token_attributions(model: TrainedModel, prepared: PreparedNote, role: str,
                       target: int = 1, *, n_steps: int = 32) -> TokenAttributions:
    """Attributions of each token of ``role``'s note to class ``target`` (see the module
    docstring; ExplanationError when the role is not a ``gru`` text role or the study has no
    such note)."""
    from captum.attr import LayerIntegratedGradients

    text_cards = model.card.text
    if role not in text_cards:
        raise ExplanationError(f"the model has no text role {role!r} "
                               f"(text roles: {sorted(text_cards)}).")
    modalities = list(model.modalities)
    j = modalities.index(role)
    if not bool(np.asarray(prepared.present)[j]):
        raise ExplanationError(f"the study has no `{role}` note to attribute.")
    tokenizer = NoteTokenizer.from_dict(text_cards[role])
    ids = np.asarray(prepared.tensors[role], dtype=np.float32)
    length = int(np.max(np.nonzero(ids)[0], initial=-1)) + 1
    tokens = tuple(str(tokenizer.tokenizer.id_to_token(int(i))) for i in ids[:length])
    unk = tokenizer.tokenizer.token_to_id(UNK)
    temperature = temperature_of(model)
    runs, deltas = [], []
    for net in model.nets:
        encoder = net.encoders[role]
        if not isinstance(encoder, GRUTextEncoder):
            raise ExplanationError("token attributions need the `gru` text encoder.")
        others = {r: torch.from_numpy(np.ascontiguousarray(prepared.tensors[r],
                                                           dtype=np.float32))[None]
                  for r in [*net.config.roles, *net.config.texts] if r != role}
        clin = (None if prepared.clinical is None else
                torch.from_numpy(np.asarray(prepared.clinical, dtype=np.float32))[None])
        present = torch.from_numpy(np.asarray(prepared.present, dtype=bool))[None]

        def forward(x: torch.Tensor, net=net, others=others, clin=clin,  # noqa: ANN001
                    present=present) -> torch.Tensor:
            b = x.shape[0]
            images = {r: t.expand(b, *t.shape[1:]) for r, t in others.items()}
            images[role] = x
            c = None if clin is None else clin.expand(b, -1)
            p = present.expand(b, -1)
            return net.head(net.encode(images, c, p), p).logits[:, target] / temperature

        was_training = net.training
        net.eval()
        try:
            x = torch.from_numpy(ids)[None]
            lig = LayerIntegratedGradients(forward, encoder.embedding)
            # An all-[PAD] baseline would be a note of length one to the packed GRU, a
            # different function from the path's start: completeness then failed by a
            # constant (0.066 whatever the number of steps). Same length, unknown words:
            baseline = torch.where(x > 0, torch.full_like(x, float(unk)), torch.zeros_like(x))
            attr, delta = lig.attribute(x, baselines=baseline, n_steps=n_steps,
                                        return_convergence_delta=True)
        finally:
            net.train(was_training)
        runs.append(attr.sum(dim=-1)[0, :length].detach().double().numpy())
        deltas.append(float(delta.abs().max()))
    scores = np.mean(runs, axis=0)
    return TokenAttributions(tokens=tokens, scores=tuple(float(v) for v in scores),
                             target=int(target), delta=max(deltas))
