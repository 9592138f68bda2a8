"""Prepared model inputs for training: load, preprocess, cache on disk without pickle.

Each imaging input of a manifest row is read with ``load_volume``, brought to its role's
grid with ``prepare_volume`` and stored as a float32 ``.npy`` file (``np.save``; read back
with ``allow_pickle=False``) keyed by a digest of the input path, its size and mtime (every
file of a DICOM folder) and the role's preprocessing spec. Re-running training with the same
inputs and spec skips the expensive part.

A study whose file fails to load or preprocess is skipped with a PHI-free warning (its CSV
line and the error code) and counted: one bad row never stops a training run.

Notes (text roles) are read here (``medfusion.io.notes``: size checked before reading,
UTF-8 only; a note that fails skips its row like an image that fails) and kept in memory
only: they are tokenized by the trainer once the vocabulary is fitted on the training split,
and never cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfusion import __version__
from medfusion.atomic import atomic_open
from medfusion.errors import MedfusionError
from medfusion.io.notes import resolve_note
from medfusion.io.volume import load_volume
from medfusion.models.clinical import clinical_present
from medfusion.preprocess import prepare_volume, to_tensor_input
from medfusion.training.manifest import ManifestRow
from medfusion.training.recipe import Recipe
from medfusion.types import Volume
from medfusion.uncertainty.domain import volume_quantities

log = logging.getLogger("medfusion.training")

_CACHE_VERSION = "1"


def _input_fingerprint(path: Path) -> list[Any]:
    """Size and mtime of a file, or of every file under a folder (a DICOM series)."""
    if path.is_dir():
        items = []
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            st = sub.stat()
            items.append([str(sub.relative_to(path)), st.st_size, st.st_mtime_ns])
        return items
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def cache_key(path: Path, spec: Mapping[str, Any]) -> str:
    """Digest of an input (resolved path + sizes + mtimes) and its preprocessing spec."""
    payload = json.dumps(
        [_CACHE_VERSION, __version__, str(path.resolve()), _input_fingerprint(path), dict(spec)],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class PreparedCache:
    """A folder of ``<digest>.npy`` arrays. ``None`` directory = no caching."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                log.warning("prepared-input cache folder not writable; caching disabled")
                self.directory = None

    def get(self, key: str) -> np.ndarray | None:
        if self.directory is None:
            return None
        target = self.directory / f"{key}.npy"
        if not target.is_file():
            return None
        try:
            return np.load(target, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged cache entry is simply recomputed

    def get_quantities(self, key: str) -> dict[str, float] | None:
        """The cached acquisition quantities of an input (see uncertainty.domain)."""
        if self.directory is None:
            return None
        target = self.directory / f"{key}.quantities.json"
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}

    def put_quantities(self, key: str, quantities: Mapping[str, float]) -> None:
        if self.directory is None:
            return
        try:
            with atomic_open(self.directory / f"{key}.quantities.json", "w") as handle:
                json.dump(dict(quantities), handle, sort_keys=True)
        except OSError:
            log.warning("could not write a prepared-input cache entry; continuing without it")

    def put(self, key: str, array: np.ndarray) -> None:
        if self.directory is None:
            return
        try:
            with atomic_open(self.directory / f"{key}.npy", "wb") as handle:
                np.save(handle, np.ascontiguousarray(array, dtype=np.float32),
                        allow_pickle=False)
        except OSError:
            log.warning("could not write a prepared-input cache entry; continuing without it")


def load_input_volume(path: Path) -> Volume:
    """``medfusion.io.volume.load_volume`` (a DICOM folder/file or a NIfTI file)."""
    return load_volume(path)


def prepare_input(path: Path, spec: Any, cache: PreparedCache
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """One role input as the model tensor (1, I, J, K) float32 and the acquisition
    quantities of the volume as loaded (for the package's input domain), both cached."""
    key = cache_key(path, spec.to_dict())
    hit = cache.get(key)
    quantities = cache.get_quantities(key)
    if hit is not None and quantities is not None:
        return hit, quantities
    volume = load_input_volume(path)
    quantities = volume_quantities(volume)
    tensor = np.asarray(to_tensor_input(prepare_volume(volume, spec)), dtype=np.float32)
    cache.put(key, tensor)
    cache.put_quantities(key, quantities)
    return tensor, quantities


@dataclass
class PreparedDataset:
    """All usable rows of a manifest, as arrays ready for the network.

    ``images[role]`` is (N, 1, I, J, K) float32 (zeros where missing), ``present`` is (N, M)
    bool in network modality order (imaging roles sorted, then clinical), ``clinical_rows`` the
    raw clinical records (transformed later by the fitted preprocessor).
    """

    rows: list[ManifestRow]
    splits: list[str]
    images: dict[str, np.ndarray]
    present: np.ndarray
    labels: np.ndarray
    clinical_rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    #: ``quantities[role][i]``: acquisition quantities of row i's input (None when absent)
    quantities: dict[str, list[dict[str, float] | None]] = field(default_factory=dict)
    #: ``notes[text_role][i]``: row i's note text (None when missing); in memory only
    notes: dict[str, list[str | None]] = field(default_factory=dict, repr=False)

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)


def build_dataset(rows: Sequence[ManifestRow], splits: Sequence[str], recipe: Recipe,
                  cache: PreparedCache,
                  on_progress: Callable[[int, int], None] | None = None) -> PreparedDataset:
    """Load and prepare every row; rows that fail are skipped, logged and counted."""
    specs = {role: opts.role_spec() for role, opts in recipe.modalities.items()}
    kept_rows: list[ManifestRow] = []
    kept_splits: list[str] = []
    per_role: dict[str, list[np.ndarray | None]] = {role: [] for role in recipe.roles}
    per_role_quantities: dict[str, list[dict[str, float] | None]] = {
        role: [] for role in recipe.roles}
    present: list[list[bool]] = []
    skipped: dict[str, int] = {}
    per_text: dict[str, list[str | None]] = {role: [] for role in recipe.text_roles}
    for n, (row, split) in enumerate(zip(rows, splits, strict=False)):
        tensors: dict[str, np.ndarray | None] = {}
        quantities: dict[str, dict[str, float] | None] = {}
        notes: dict[str, str | None] = {}
        try:
            for role in recipe.roles:
                path = row.paths.get(role)
                tensors[role], quantities[role] = (
                    (None, None) if path is None else prepare_input(path, specs[role], cache))
            for role in recipe.text_roles:
                notes[role] = resolve_note(row.notes.get(role), role)
        except MedfusionError as exc:
            log.warning("skipping manifest line %d: %s input failed (%s)", row.line, role,
                        exc.code)
            skipped[exc.code] = skipped.get(exc.code, 0) + 1
            continue
        mask = [tensors[r] is not None for r in recipe.roles]
        mask += [notes[r] is not None for r in recipe.text_roles]
        if recipe.clinical:
            mask.append(clinical_present(row.clinical, list(recipe.clinical)))
        if not any(mask):
            log.warning("skipping manifest line %d: no modality present", row.line)
            skipped["NO_MODALITY"] = skipped.get("NO_MODALITY", 0) + 1
            continue
        kept_rows.append(row)
        kept_splits.append(split)
        present.append(mask)
        for role in recipe.roles:
            per_role[role].append(tensors[role])
            per_role_quantities[role].append(quantities[role])
        for role in recipe.text_roles:
            per_text[role].append(notes[role])
        if on_progress is not None:
            on_progress(n + 1, len(rows))
    images: dict[str, np.ndarray] = {}
    for role, opts in recipe.modalities.items():
        shape = (1, *opts.grid)
        stack = np.zeros((len(kept_rows), *shape), dtype=np.float32)
        for i, t in enumerate(per_role[role]):
            if t is not None:
                if t.shape != shape:
                    raise MedfusionError(
                        f"Prepared `{role}` input has shape {t.shape}, expected {shape}.",
                        code="MODALITY_MISMATCH")
                stack[i] = t
        images[role] = stack
    labels = np.array([-1 if r.label is None else r.label for r in kept_rows], dtype=np.int64)
    n_mod = len(recipe.roles) + len(recipe.text_roles) + (1 if recipe.clinical else 0)
    return PreparedDataset(
        rows=kept_rows,
        splits=kept_splits,
        images=images,
        present=np.array(present, dtype=bool).reshape(len(kept_rows), n_mod),
        labels=labels,
        clinical_rows=[dict(r.clinical or {}) for r in kept_rows],
        skipped=skipped,
        quantities=per_role_quantities,
        notes=per_text,
    )
