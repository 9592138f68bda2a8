"""One study ready for the network, and a batch of them as arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medfusion.types import Volume


@dataclass(frozen=True, eq=False)
class PreparedInputs:
    """One study, ready for the network. Small enough to send between processes when
    ``sources`` is empty (see :meth:`lite`).

    ``tensors[role]``: (1, I, J, K) float32 for every trained imaging role and
    (max_tokens,) float32 token ids for every text role (zeros when absent);
    ``present``: (M,) bool over ``modalities`` (imaging roles sorted, text roles sorted,
    then "clinical");
    ``clinical``: (F,) float32 preprocessed features or None for an image-only model;
    ``prepared[role]`` / ``sources[role]``: the model-grid Volume and the Volume as loaded
    (for mapping explanations back to the scanner grid).
    """

    study_key: str
    modalities: tuple[str, ...]
    tensors: Mapping[str, np.ndarray]
    present: np.ndarray
    clinical: np.ndarray | None
    prepared: Mapping[str, Volume] = field(default_factory=dict)
    sources: Mapping[str, Volume] = field(default_factory=dict)
    flags: tuple[str, ...] = ()

    @property
    def modalities_used(self) -> tuple[str, ...]:
        return tuple(m for m, p in zip(self.modalities, self.present, strict=False) if p)

    def lite(self) -> PreparedInputs:
        """A copy without the full-size source volumes (cheap to ship between processes)."""
        return dataclasses.replace(self, sources={})

    def tensors_only(self) -> PreparedInputs:
        """A copy without any Volume (what prediction without explanations needs)."""
        return dataclasses.replace(self, prepared={}, sources={})


def stack_prepared(batch: Sequence[PreparedInputs], roles: Sequence[str]
                   ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """Batch arrays (images per role, clinical (N,F) or None, present (N,M))."""
    images = {r: np.stack([p.tensors[r] for p in batch]).astype(np.float32) for r in roles}
    clin = None
    if batch and batch[0].clinical is not None:
        clin = np.stack([p.clinical for p in batch]).astype(np.float32)
    present = np.stack([p.present for p in batch]).astype(bool)
    return images, clin, present
