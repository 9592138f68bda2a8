"""Seeding: the one place that seeds Python, numpy and torch together."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (network init, modality dropout and any
    randomness at inference use them)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def study_seed(seed: int, study_id: str) -> int:
    """A per-study seed: the same study gets the same randomness whatever the order in
    which studies finish (so any worker count gives the same bytes)."""
    digest = hashlib.sha256(f"{int(seed)}:{study_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")
