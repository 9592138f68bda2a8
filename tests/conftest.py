"""Shared fixtures. Tests stay fast: tiny volumes, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real scanner data (../shared/data, or $MEDFUSION_SHARED_DATA)."""
    env = os.environ.get("MEDFUSION_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"real scanner data not found at {path} (set MEDFUSION_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
