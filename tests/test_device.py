"""Device selection: CUDA for training when present, the CPU otherwise, clear errors."""

from __future__ import annotations

import pytest
import torch

from medfusion.device import module_device, select_device
from medfusion.errors import MedfusionError


def test_auto_picks_cuda_only_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDFUSION_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    assert select_device("cpu").type == "cpu"


def test_environment_forces_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFUSION_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")


def test_unknown_or_unavailable_device_is_a_clear_error() -> None:
    with pytest.raises(MedfusionError, match="auto, cpu, cuda"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedfusionError, match="no CUDA GPU"):
            select_device("cuda")


def test_module_device() -> None:
    assert module_device(torch.nn.Linear(2, 2)).type == "cpu"
    assert module_device(torch.nn.ReLU()).type == "cpu"
