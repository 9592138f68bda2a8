"""Epistemic uncertainty from stochastic passes: MC dropout and deep ensembles.

MC dropout (Gal & Ghahramani, 2016) keeps *only* the dropout layers stochastic at inference.
Every other module stays in eval mode, so BatchNorm uses (and never updates) its running
statistics: the model's buffers are bit-identical after any number of passes.

For a :class:`~medfusion.models.net.FusionNet`, all dropout lives in the fusion head, so the
cheap and exact scheme is one encoder pass, then ``n_samples`` head passes on the same
embeddings (measured at 96^3: 0.44 s for 20 head passes vs 4.3 s for 10 full passes).
A network without ``encode``/``head`` gets ``n_samples`` full forward passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medfusion.errors import CalibrationError
from medfusion.numerics import softmax

# every dropout flavour in torch derives from _DropoutNd (Dropout, Dropout1d/2d/3d,
# AlphaDropout, FeatureAlphaDropout)
_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)


def dropout_modules(net: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``net`` with a non-zero rate."""
    return [m for m in net.modules() if isinstance(m, _DROPOUT_TYPES) and float(m.p) > 0.0]


@contextlib.contextmanager
def dropout_only(net: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``net`` is in eval mode except its dropout layers (train mode).

    The previous ``training`` flag of every submodule is restored on exit, whatever happens.
    """
    previous = {m: m.training for m in net.modules()}
    try:
        net.eval()
        for m in dropout_modules(net):
            m.train(True)
        yield net
    finally:
        for m, flag in previous.items():
            m.training = flag


def _logits_of(output: Any) -> torch.Tensor:
    """Logits from a FusionOutput, a tuple whose first item is logits, or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CalibrationError("the network returned no logits tensor; cannot sample it.")


def _split_inputs(
    inputs: Any,
) -> tuple[Mapping[str, torch.Tensor | None], torch.Tensor | None, torch.Tensor | None]:
    if isinstance(inputs, Mapping):
        return inputs, None, None
    if isinstance(inputs, (tuple, list)) and len(inputs) == 3:
        images, clinical, present = inputs
        return images, clinical, present
    raise CalibrationError(
        "inputs must be (images, clinical, present) or an images mapping; "
        "or pass embeddings with present=..."
    )


def mc_dropout_probs(
    net: nn.Module,
    inputs: Any,
    n_samples: int = 20,
    seed: int = 0,
    *,
    present: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities of ``n_samples`` MC-dropout passes, shape (S, B, C).

    ``inputs`` is either the embeddings (B, M, E) from ``net.encode`` (then ``present`` is
    required and only the head is re-run), or ``(images, clinical, present)`` as for
    ``net.forward`` (then the encoder runs once, in eval mode, when ``net`` has
    ``encode``/``head``). ``temperature`` divides each pass's logits (use the fitted one so
    the samples are calibrated). Uses its own RNG stream seeded by ``seed``: the global torch
    RNG is left as it was, and the result is deterministic on CPU.
    """
    if int(n_samples) < 1:
        raise CalibrationError(f"n_samples must be at least 1, got {n_samples}.")
    if not float(temperature) > 0:
        raise CalibrationError(f"temperature must be positive, got {temperature}.")
    if not dropout_modules(net):
        raise CalibrationError(
            "the network has no dropout layer with p > 0, so MC dropout would return "
            "identical samples; train with dropout > 0 or use a deep ensemble."
        )
    has_parts = hasattr(net, "encode") and hasattr(net, "head")
    samples: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), dropout_only(net):
        torch.manual_seed(int(seed))
        if isinstance(inputs, torch.Tensor):
            if not has_parts or present is None:
                raise CalibrationError(
                    "embeddings need a network with encode/head and the present mask."
                )
            for _ in range(int(n_samples)):
                samples.append(_logits_of(net.head(inputs, present)))
        else:
            images, clinical, mask = _split_inputs(inputs)
            if has_parts:
                if mask is None:
                    mask = net.infer_present(images, clinical)
                # dropout_only leaves the encoders in eval mode: deterministic embeddings
                embeddings = net.encode(images, clinical, mask)
                for _ in range(int(n_samples)):
                    samples.append(_logits_of(net.head(embeddings, mask)))
            else:
                for _ in range(int(n_samples)):
                    samples.append(_logits_of(net(images)))
    logits = torch.stack(samples).double().numpy()
    return softmax(logits / float(temperature))


def ensemble_probs(
    members: Sequence[nn.Module],
    inputs: Any,
    *,
    temperatures: Sequence[float] | None = None,
) -> np.ndarray:
    """Class probabilities of each ensemble member (eval mode), shape (S, B, C).

    ``inputs`` is ``(images, clinical, present)``; ``temperatures`` holds one fitted
    temperature per member (default 1). Members' training flags are restored.
    """
    if not members:
        raise CalibrationError("an ensemble needs at least one member.")
    temps = [1.0] * len(members) if temperatures is None else [float(t) for t in temperatures]
    if len(temps) != len(members) or min(temps) <= 0:
        raise CalibrationError("give one positive temperature per ensemble member.")
    images, clinical, present = _split_inputs(inputs)
    out = []
    for member, t in zip(members, temps, strict=True):
        flag = member.training
        try:
            member.eval()
            with torch.no_grad():
                if present is not None or clinical is not None:
                    logits = _logits_of(member(images, clinical, present))
                else:
                    logits = _logits_of(member(images))
        finally:
            member.train(flag)
        out.append(softmax(logits.double().numpy() / t))
    return np.stack(out)
