"""Which torch device does the heavy work.

Training uses CUDA when a GPU is present (``MEDFUSION_DEVICE=auto``, the default) and the CPU
otherwise. ``MEDFUSION_DEVICE=cpu`` forces the CPU, e.g. for byte-identical reruns: CUDA
kernels are not bitwise deterministic, CPU ones are. Scoring and explanation run on the CPU,
where medfusion guarantees identical scores for identical inputs, model and seed.
"""

from __future__ import annotations

import os

import torch

from medfusion.errors import MedfusionError


def select_device(requested: str | None = None) -> torch.device:
    """``requested`` (or ``$MEDFUSION_DEVICE``): ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""
    choice = (requested or os.environ.get("MEDFUSION_DEVICE") or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MedfusionError(
                f"MEDFUSION_DEVICE={choice} but no CUDA GPU is available to torch; use 'auto' "
                "or 'cpu'.",
                code="BAD_ARGUMENT",
            )
        return torch.device(choice)
    raise MedfusionError(
        f"unknown device {choice!r}; MEDFUSION_DEVICE takes auto, cpu, cuda or cuda:N.",
        code="BAD_ARGUMENT",
    )


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's parameters live on (CPU for a module without parameters)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
