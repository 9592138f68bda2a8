"""FusionNet: one encoder per imaging role, an MLP for the clinical record, a fusion head.

Data flow (B = batch, M = number of modalities, E = ``embed_dim``)::

    images[role] (B, 1, I, J, K) --encoder[role]--> LayerNorm --> v_role (B, E)
    images[text] (B, L) token ids --encoder[text]--> LayerNorm --> v_text (B, E)
    clinical (B, n_clinical)     --MLP-----------> LayerNorm --> v_clinical (B, E)
    stack -> embeddings (B, M, E) --head(embeddings, present)--> logits (B, n_classes)

``modalities`` is the sorted imaging roles, then the sorted text roles (free-text notes,
:mod:`medfusion.models.text`), then ``"clinical"`` when ``n_clinical > 0``; ``present``
(B, M) bool follows that order. A text role's input travels in the same mapping as the
images, as ``(B, max_tokens)`` token ids (float32, ``[PAD]`` = 0). An encoder only ever
sees the samples in which its modality is present: absent inputs may be anything (zeros)
and are never read, and their embedding is zero. ``forward == head(encode(...), present)``
in eval mode; in training mode ``forward`` first applies modality dropout (never dropping
every modality of a sample).

The per-modality LayerNorm puts every modality's embedding on a common scale, which the
attention scores, the gates and the kernel SVM all compare across modalities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medfusion.device import module_device
from medfusion.errors import InvalidValuesError, ModalityMismatchError, RecipeError
from medfusion.models.registry import (
    DEFAULT_ENCODER,
    DEFAULT_FUSION,
    ENCODERS,
    FUSION_HEADS,
    MIN_GRID,
    build_encoder,
    get_fusion_head,
)
from medfusion.models.text import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEXT_ENCODER,
    EMBEDDING_DROPOUT,
    TEXT_ENCODERS,
    build_text_encoder,
)

CLINICAL = "clinical"


@contextlib.contextmanager
def _frozen_batchnorm(module: nn.Module) -> Iterator[None]:
    """Temporarily put every BatchNorm of ``module`` in eval mode."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    states = [m.training for m in bns]
    try:
        for m in bns:
            m.eval()
        yield
    finally:
        for m, state in zip(bns, states, strict=True):
            m.train(state)


@dataclass(frozen=True)
class RoleNetConfig:
    """How one imaging role is encoded: encoder name, 2D/3D, the input grid (I, J, K) and
    the input standardisation ``(x - input_shift) / input_scale``.

    An X-ray role has ``spatial_dims=2`` and ``grid=(I, J, 1)``. The trainer sets
    ``input_shift`` / ``input_scale`` to the mean and standard deviation of the role's
    prepared training inputs (a package written before they existed reads 0 / 1, identity).
    Why: a CT window maps soft tissue to about 0.5 with contrasts of a few hundredths; that
    offset next to the encoder's zero padding made the default recipe's training diverge
    to a constant output on AdrenalMNIST3D (docs/training.md, "Input standardisation").
    """

    encoder: str = DEFAULT_ENCODER
    spatial_dims: int = 3
    grid: tuple[int, int, int] = (32, 32, 32)
    input_shift: float = 0.0
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise RecipeError(
                f"unknown encoder {self.encoder!r}; choose one of: {', '.join(sorted(ENCODERS))}"
            )
        if self.spatial_dims not in (2, 3):
            raise RecipeError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        try:
            grid = tuple(int(g) for g in self.grid)
        except (TypeError, ValueError):
            raise RecipeError(f"grid must be three positive integers, got {self.grid!r}") from None
        if len(grid) != 3 or min(grid) < 1:
            raise RecipeError(f"grid must be three positive integers, got {self.grid!r}")
        if self.spatial_dims == 2 and grid[2] != 1:
            raise RecipeError(f"a 2D (X-ray) role needs a grid of depth 1, got {grid}")
        low = MIN_GRID[self.encoder]
        if min(grid[: self.spatial_dims]) < low:
            raise RecipeError(
                f"encoder {self.encoder!r} needs a grid of at least {low} per axis, got {grid}"
            )
        object.__setattr__(self, "grid", grid)
        shift, scale = float(self.input_shift), float(self.input_scale)
        if not (math.isfinite(shift) and math.isfinite(scale) and scale > 0.0):
            raise RecipeError(
                f"input standardisation needs a finite shift and a positive scale, got "
                f"({self.input_shift!r}, {self.input_scale!r})"
            )
        object.__setattr__(self, "input_shift", shift)
        object.__setattr__(self, "input_scale", scale)

    @property
    def standardizes(self) -> bool:
        """Whether the input standardisation is anything but the identity."""
        return self.input_shift != 0.0 or self.input_scale != 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "spatial_dims": self.spatial_dims,
                "grid": list(self.grid), "input_shift": self.input_shift,
                "input_scale": self.input_scale}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoleNetConfig:
        return cls(
            encoder=str(d.get("encoder", DEFAULT_ENCODER)),
            spatial_dims=int(d.get("spatial_dims", 3)),
            grid=tuple(d.get("grid", (32, 32, 32))),  # type: ignore[arg-type]
            input_shift=float(d.get("input_shift", 0.0)),
            input_scale=float(d.get("input_scale", 1.0)),
        )


@dataclass(frozen=True)
class TextNetConfig:
    """How one text role is encoded: the text encoder, the tokenizer's vocabulary size and
    the number of token ids per note (``max_tokens``), and the ``gru`` encoder's dropout on
    its token embeddings while training (``embedding_dropout``)."""

    encoder: str = DEFAULT_TEXT_ENCODER
    vocab_size: int = 2
    max_tokens: int = DEFAULT_MAX_TOKENS
    embedding_dropout: float = EMBEDDING_DROPOUT

    def __post_init__(self) -> None:
        if self.encoder not in TEXT_ENCODERS:
            raise RecipeError(f"unknown text encoder {self.encoder!r}; choose one of: "
                              f"{', '.join(sorted(TEXT_ENCODERS))}")
        if int(self.vocab_size) < 2 or int(self.max_tokens) < 1:
            raise RecipeError(f"a text role needs vocab_size >= 2 and max_tokens >= 1, got "
                              f"{self.vocab_size}, {self.max_tokens}")
        object.__setattr__(self, "vocab_size", int(self.vocab_size))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "vocab_size": self.vocab_size,
                "max_tokens": self.max_tokens, "embedding_dropout": self.embedding_dropout}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextNetConfig:
        return cls(encoder=str(d.get("encoder", DEFAULT_TEXT_ENCODER)),
                   vocab_size=int(d.get("vocab_size", 2)),
                   max_tokens=int(d.get("max_tokens", DEFAULT_MAX_TOKENS)),
                   embedding_dropout=float(d.get("embedding_dropout", EMBEDDING_DROPOUT)))


@dataclass(frozen=True, kw_only=True)
class NetConfig:
    """Everything needed to rebuild a :class:`FusionNet` (stored in the model card)."""

    roles: Mapping[str, RoleNetConfig] = field(default_factory=dict)
    n_clinical: int = 0
    n_classes: int
    fusion: str = DEFAULT_FUSION
    embed_dim: int = 64
    dropout: float = 0.2
    modality_dropout: float = 0.2
    #: text role -> TextNetConfig (free-text notes); empty for image/clinical models
    texts: Mapping[str, TextNetConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        texts = {}
        for name, cfg in dict(self.texts).items():
            if not isinstance(name, str) or not name or name == CLINICAL or name in self.roles:
                raise RecipeError(f"text role names must be non-empty, not {CLINICAL!r} and "
                                  f"not an imaging role, got {name!r}")
            texts[name] = cfg if isinstance(cfg, TextNetConfig) else TextNetConfig.from_dict(cfg)
        object.__setattr__(self, "texts", dict(sorted(texts.items())))
        roles = {}
        for name, cfg in dict(self.roles).items():
            if not isinstance(name, str) or not name or name == CLINICAL:
                raise RecipeError(
                    f"imaging role names must be non-empty and not {CLINICAL!r}, got {name!r}"
                )
            roles[name] = cfg if isinstance(cfg, RoleNetConfig) else RoleNetConfig.from_dict(cfg)
        object.__setattr__(self, "roles", dict(sorted(roles.items())))
        if int(self.n_clinical) < 0:
            raise RecipeError(f"n_clinical must be >= 0, got {self.n_clinical}")
        if not roles and not texts and int(self.n_clinical) == 0:
            raise RecipeError("a model needs at least one imaging or text role or clinical "
                              "features")
        if int(self.n_classes) < 2:
            raise RecipeError(f"n_classes must be at least 2, got {self.n_classes}")
        if self.fusion not in FUSION_HEADS:
            raise RecipeError(
                f"unknown fusion {self.fusion!r}; choose one of: {', '.join(sorted(FUSION_HEADS))}"
            )
        if int(self.embed_dim) < 2:
            raise RecipeError(f"embed_dim must be at least 2, got {self.embed_dim}")
        for key in ("dropout", "modality_dropout"):
            value = float(getattr(self, key))
            if not 0.0 <= value < 1.0:
                raise RecipeError(f"{key} must be in [0, 1), got {value}")

    def __hash__(self) -> int:  # roles is a dict: hash the canonical JSON instead
        return hash(self.to_json())

    @property
    def modalities(self) -> list[str]:
        """Imaging roles in sorted order, then text roles in sorted order, then
        ``"clinical"`` when there are clinical features."""
        return [*self.roles, *self.texts, *([CLINICAL] if self.n_clinical > 0 else [])]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["roles"] = {k: v.to_dict() for k, v in self.roles.items()}
        d["texts"] = {k: v.to_dict() for k, v in self.texts.items()}
        if not self.texts:
            d.pop("texts")  # cards of models without notes stay as they were
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetConfig:
        if not isinstance(d, Mapping):
            raise RecipeError(f"a network config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"unknown network config keys {unknown}; known: {sorted(known)}")
        if "n_classes" not in d:
            raise RecipeError("network config lacks n_classes")
        roles = d.get("roles", {}) or {}
        if not isinstance(roles, Mapping):
            raise RecipeError("network config 'roles' must map role names to settings")
        texts = d.get("texts", {}) or {}
        if not isinstance(texts, Mapping):
            raise RecipeError("network config 'texts' must map text roles to settings")
        return cls(
            texts={str(k): TextNetConfig.from_dict(v) for k, v in texts.items()},
            roles={str(k): RoleNetConfig.from_dict(v) for k, v in roles.items()},
            n_clinical=int(d.get("n_clinical", 0)),
            n_classes=int(d["n_classes"]),
            fusion=str(d.get("fusion", DEFAULT_FUSION)),
            embed_dim=int(d.get("embed_dim", 64)),
            dropout=float(d.get("dropout", 0.2)),
            modality_dropout=float(d.get("modality_dropout", 0.2)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NetConfig:
        return cls.from_dict(json.loads(text))


@dataclass
class FusionOutput:
    """``logits`` (B, n_classes); ``weights`` (B, M) attention alphas or gates, else None;
    ``embeddings`` (B, M, E) with zeros for absent modalities."""

    logits: torch.Tensor
    weights: torch.Tensor | None
    embeddings: torch.Tensor


class FusionNet(nn.Module):
    """The multimodal network described in the module docstring."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.modalities: list[str] = config.modalities
        e = config.embed_dim
        self.encoders = nn.ModuleDict(
            {
                role: build_encoder(
                    rc.encoder, spatial_dims=rc.spatial_dims, in_channels=1, embed_dim=e
                )
                for role, rc in config.roles.items()
            }
        )
        for role, tc in config.texts.items():
            self.encoders[role] = build_text_encoder(
                tc.encoder, vocab_size=tc.vocab_size, embed_dim=e,
                embedding_dropout=tc.embedding_dropout)
        self.clinical_encoder: nn.Module | None = None
        if config.n_clinical > 0:
            hidden = max(32, e)
            self.clinical_encoder = nn.Sequential(
                nn.Linear(config.n_clinical, hidden), nn.ReLU(), nn.Linear(hidden, e)
            )
        self.norms = nn.ModuleDict({m: nn.LayerNorm(e) for m in self.modalities})
        self.fusion_head = get_fusion_head(config.fusion)(
            len(self.modalities), e, config.n_classes, config.dropout
        )

    # -- parameters ------------------------------------------------------------------------
    def head_parameters(self):  # noqa: ANN201 - an iterator of Parameters
        """Parameters of the fusion head (where all dropout lives)."""
        return self.fusion_head.parameters()

    def encoder_parameters(self):  # noqa: ANN201
        """Parameters of the encoders and per-modality norms (everything but the head)."""
        head = {id(p) for p in self.fusion_head.parameters()}
        return (p for p in self.parameters() if id(p) not in head)

    # -- inputs ----------------------------------------------------------------------------
    def infer_present(
        self, images: Mapping[str, torch.Tensor | None], clinical: torch.Tensor | None
    ) -> torch.Tensor:
        """A presence mask with every given input present (a role's tensor, the clinical
        tensor), for callers whose batches hold complete studies."""
        batch = None
        for x in [*images.values(), clinical]:
            if x is not None:
                batch = int(x.shape[0])
                break
        if batch is None:
            raise ModalityMismatchError("no inputs given: pass at least one modality")
        cols = [images.get(r) is not None for r in [*self.config.roles, *self.config.texts]]
        if self.config.n_clinical > 0:
            cols.append(clinical is not None)
        return torch.tensor(cols, dtype=torch.bool).unsqueeze(0).expand(batch, -1).clone()

    def _check_present(self, present: torch.Tensor) -> torch.Tensor:
        present = torch.as_tensor(present)
        m = len(self.modalities)
        if present.ndim != 2 or present.shape[1] != m:
            raise ModalityMismatchError(
                f"present must be (batch, {m}) for modalities {self.modalities}, "
                f"got {tuple(present.shape)}"
            )
        present = present.to(torch.bool)
        if not bool(present.any(dim=1).all()):
            raise ModalityMismatchError(
                f"a study has none of the modalities {self.modalities}; at least one is needed"
            )
        return present

    def dummy_inputs(
        self, batch_size: int = 1
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """Zero inputs of the right shapes with every modality present (for tests, tracing)."""
        images = {
            r: torch.zeros(batch_size, 1, *rc.grid) for r, rc in self.config.roles.items()
        }
        for r, tc in self.config.texts.items():
            images[r] = torch.zeros(batch_size, tc.max_tokens)
            images[r][:, 0] = 1.0  # one [UNK] token: a note must have at least one
        clinical = (
            torch.zeros(batch_size, self.config.n_clinical) if self.config.n_clinical else None
        )
        present = torch.ones(batch_size, len(self.modalities), dtype=torch.bool)
        return images, clinical, present

    # -- modality dropout ------------------------------------------------------------------
    def drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Training-time modality dropout: hide each present modality with probability
        ``modality_dropout``, keeping at least one per sample (uses torch's global RNG, so
        it follows ``torch.manual_seed``). Identity in eval mode."""
        p = self.config.modality_dropout
        if not self.training or p <= 0.0 or present.shape[1] < 2:
            return present
        keep = (torch.rand(present.shape, device=present.device) >= p) & present
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            # Re-admit one present modality, chosen at random, in every emptied sample.
            scores = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
            choice = scores.argmax(dim=1)
            rows = torch.nonzero(empty).squeeze(1)
            keep[rows, choice[rows]] = True
        return keep

    # -- the network -----------------------------------------------------------------------
    def encode(
        self,
        images: Mapping[str, torch.Tensor | None],
        clinical: torch.Tensor | None,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """Embeddings (B, M, E); rows of absent modalities are zero and their inputs unread."""
        present = self._check_present(present)
        batch = present.shape[0]
        cols: list[torch.Tensor] = []
        for i, (role, rc) in enumerate(self.config.roles.items()):
            idx = torch.nonzero(present[:, i]).squeeze(1)
            x = images.get(role)
            expected = (batch, 1, *rc.grid)
            if idx.numel() > 0:
                if x is None:
                    raise ModalityMismatchError(
                        f"modality {role!r} is marked present but no image was given"
                    )
                if tuple(x.shape) != expected:
                    raise ModalityMismatchError(
                        f"modality {role!r} must be shaped {expected} (batch, channel, grid), "
                        f"got {tuple(x.shape)}: preprocess it to the model's grid"
                    )
            if x is not None and rc.standardizes:
                x = (x - rc.input_shift) * (1.0 / rc.input_scale)
            cols.append(self._encode_part(role, self.encoders[role], x, idx, batch))
        for role, tc in self.config.texts.items():
            i = len(cols)
            idx = torch.nonzero(present[:, i]).squeeze(1)
            x = images.get(role)
            if idx.numel() > 0:
                if x is None:
                    raise ModalityMismatchError(
                        f"text role {role!r} is marked present but no token ids were given")
                if tuple(x.shape) != (batch, tc.max_tokens):
                    raise ModalityMismatchError(
                        f"text role {role!r} must be token ids shaped "
                        f"{(batch, tc.max_tokens)}, got {tuple(x.shape)}")
            cols.append(self._encode_part(role, self.encoders[role], x, idx, batch))
        if self.clinical_encoder is not None:
            idx = torch.nonzero(present[:, -1]).squeeze(1)
            if idx.numel() > 0:
                expected_c = (batch, self.config.n_clinical)
                if clinical is None or tuple(clinical.shape) != expected_c:
                    got = None if clinical is None else tuple(clinical.shape)
                    raise ModalityMismatchError(
                        f"clinical features must be shaped {expected_c}, got {got}"
                    )
            cols.append(self._encode_part(CLINICAL, self.clinical_encoder, clinical, idx, batch))
        return torch.stack(cols, dim=1)

    def _encode_part(
        self,
        name: str,
        encoder: nn.Module,
        x: torch.Tensor | None,
        idx: torch.Tensor,
        batch: int,
    ) -> torch.Tensor:
        e = self.config.embed_dim
        dtype = next(self.norms[name].parameters()).dtype
        device = next(self.norms[name].parameters()).device
        out = torch.zeros(batch, e, dtype=dtype, device=device)
        if idx.numel() == 0 or x is None:
            return out
        sel = x if idx.numel() == batch else x.index_select(0, idx.to(x.device))
        sel = sel.to(dtype=dtype, device=device)
        if not bool(torch.isfinite(sel).all()):
            raise InvalidValuesError(
                f"modality {name!r} contains NaN or Inf values; fix or fill them before predicting"
            )
        if self.training and sel.shape[0] == 1:
            # One sample gives BatchNorm no batch statistics (and fails on a 1-voxel map):
            # use the running statistics for it, leaving them unchanged.
            with _frozen_batchnorm(encoder):
                h = encoder(sel)
        else:
            h = encoder(sel)
        v = self.norms[name](h)
        if idx.numel() == batch:
            return v
        return out.index_copy(0, idx.to(device), v)

    def head(self, embeddings: torch.Tensor, present: torch.Tensor) -> FusionOutput:
        """Fuse embeddings (B, M, E) of the present modalities into logits."""
        present = self._check_present(present).to(embeddings.device)
        logits, weights = self.fusion_head(embeddings, present)
        return FusionOutput(logits=logits, weights=weights, embeddings=embeddings)

    def forward(
        self,
        images: Mapping[str, torch.Tensor | None],
        clinical: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> FusionOutput:
        """``head(encode(images, clinical, present), present)``, after modality dropout in
        training mode. ``present=None`` means every given input is present."""
        if present is None:
            present = self.infer_present(images, clinical)
        present = self.drop_modalities(self._check_present(present))
        return self.head(self.encode(images, clinical, present), present)


# --- inference on arrays -----------------------------------------------------------------
def run_net(net: FusionNet, images: Mapping[str, np.ndarray], clinical: np.ndarray | None,
            present: np.ndarray, batch_size: int = 32
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Eval-mode forward pass in batches: (logits (N,C), weights (N,M) | None,
    embeddings (N,M,E)) as numpy. The network's train/eval mode is restored afterwards."""
    was_training = net.training
    net.eval()
    device = module_device(net)  # the trainer validates on the GPU when there is one
    logits, weights, embeddings = [], [], []
    n = int(present.shape[0])
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                imgs = {r: torch.from_numpy(np.ascontiguousarray(a[sl])).to(device)
                        for r, a in images.items()}
                clin = None if clinical is None else torch.from_numpy(
                    np.ascontiguousarray(clinical[sl])).to(device)
                pres = torch.from_numpy(np.ascontiguousarray(present[sl])).to(device)
                out = net.head(net.encode(imgs, clin, pres), pres)
                logits.append(out.logits.float().cpu().numpy())
                embeddings.append(out.embeddings.float().cpu().numpy())
                if out.weights is not None:
                    weights.append(out.weights.float().cpu().numpy())
    finally:
        net.train(was_training)
    return (np.concatenate(logits), np.concatenate(weights) if weights else None,
            np.concatenate(embeddings))


def tta_variants(images: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The batch under every combination of flips of the spatial axes (identity first).

    Only axes that some image can flip take part: a radiograph's unit depth and a text
    role's token ids (N, L) are never flipped, so a radiograph model gets 4 variants and a
    text-only model 1, not copies of the same batch run through the network again."""
    volumes = [a for a in images.values() if a.ndim == 5]
    flippable = tuple(ax for ax in (2, 3, 4) if any(a.shape[ax] > 1 for a in volumes))
    variants = []
    for axes in itertools.chain.from_iterable(
            itertools.combinations(flippable, k) for k in range(len(flippable) + 1)):
        variants.append({r: np.flip(a, axis=[ax for ax in axes if a.shape[ax] > 1])
                         if a.ndim == 5 and any(a.shape[ax] > 1 for ax in axes) else a
                         for r, a in images.items()})
    return variants
