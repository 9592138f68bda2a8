"""Fusion heads: per-modality embeddings (B, M, E) + presence mask (B, M) -> class logits.

Every head ignores absent modalities exactly (their embedding is masked, never read), so
any non-empty subset of modalities predicts. All dropout of the fused model lives in the
head, so Monte-Carlo dropout can re-run only the head after one encoder pass.

``attention``  e_i = g(v_i); alpha = softmax of e over the present modalities only (absent
               ones get -inf, hence alpha = 0); z = sum_i alpha_i v_i; y = h(z).
``concat``     y = h([m_1 v_1, ..., m_M v_M, m]): zeroed embeddings plus the mask itself.
``gated``      g_i = sigmoid(w_i . v_i + b_i), one gate per modality;
               z = sum_i m_i g_i v_i / sum_i m_i; y = h(z).
``late``       one classifier per modality; logits = mean of the present modalities' logits.
``kernel``     trains exactly like ``concat``; at the end of training its embeddings feed a
               multiple-kernel SVM (:mod:`medfusion.models.kernel`).
"""

from __future__ import annotations

import torch
from torch import nn


def _mlp(in_features: int, hidden: int, n_classes: int, dropout: float) -> nn.Sequential:
    """The classifier h: dropout, one hidden layer, dropout, linear."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_classes),
    )


class FusionHead(nn.Module):
    """Base class: ``forward(embeddings, present) -> (logits, weights | None)``."""

    #: whether ``weights`` are returned (attention alphas or gates)
    has_weights: bool = False

    def __init__(self, n_modalities: int, embed_dim: int, n_classes: int, dropout: float):
        super().__init__()
        self.n_modalities = n_modalities
        self.embed_dim = embed_dim
        self.n_classes = n_classes

    def forward(
        self, embeddings: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError


class AttentionHead(FusionHead):
    """Modality attention (see the module docstring); weights are the alphas."""

    has_weights = True

    def __init__(self, n_modalities: int, embed_dim: int, n_classes: int, dropout: float):
        super().__init__(n_modalities, embed_dim, n_classes, dropout)
        hidden = max(8, embed_dim // 2)
        # g scores each modality's embedding with shared weights, so a modality's score
        # depends on its content, not only on which slot it occupies.
        self.score = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.classifier = _mlp(embed_dim, embed_dim, n_classes, dropout)

    def forward(
        self, embeddings: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(embeddings).squeeze(-1)  # (B, M)
        scores = scores.masked_fill(~present, float("-inf"))
        alpha = torch.softmax(scores, dim=1)
        z = (alpha.unsqueeze(-1) * embeddings).sum(dim=1)
        return self.classifier(z), alpha


class ConcatHead(FusionHead):
    """Concatenation of the masked embeddings and the presence mask."""

    def __init__(self, n_modalities: int, embed_dim: int, n_classes: int, dropout: float):
        super().__init__(n_modalities, embed_dim, n_classes, dropout)
        self.classifier = _mlp(
            n_modalities * embed_dim + n_modalities, embed_dim, n_classes, dropout
        )

    def forward(
        self, embeddings: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        mask = present.to(embeddings.dtype)
        x = torch.cat([(embeddings * mask.unsqueeze(-1)).flatten(1), mask], dim=1)
        return self.classifier(x), None


class KernelHead(ConcatHead):
    """Trained like ``concat``; its embeddings are what the kernel SVM fuses."""


class GatedHead(FusionHead):
    """Learned sigmoid gate per modality; weights are the gates (0 where absent)."""

    has_weights = True

    def __init__(self, n_modalities: int, embed_dim: int, n_classes: int, dropout: float):
        super().__init__(n_modalities, embed_dim, n_classes, dropout)
        self.gate_weight = nn.Parameter(torch.zeros(n_modalities, embed_dim))
        self.gate_bias = nn.Parameter(torch.zeros(n_modalities))
        nn.init.normal_(self.gate_weight, std=embed_dim**-0.5)
        self.classifier = _mlp(embed_dim, embed_dim, n_classes, dropout)

    def forward(
        self, embeddings: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = present.to(embeddings.dtype)
        gates = torch.sigmoid((embeddings * self.gate_weight).sum(-1) + self.gate_bias) * mask
        z = (gates.unsqueeze(-1) * embeddings).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.classifier(z), gates


class LateHead(FusionHead):
    """One classifier per modality, logits averaged over the present modalities."""

    def __init__(self, n_modalities: int, embed_dim: int, n_classes: int, dropout: float):
        super().__init__(n_modalities, embed_dim, n_classes, dropout)
        self.classifiers = nn.ModuleList(
            _mlp(embed_dim, embed_dim, n_classes, dropout) for _ in range(n_modalities)
        )

    def forward(
        self, embeddings: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        mask = present.to(embeddings.dtype)
        per = torch.stack(
            [clf(embeddings[:, i]) for i, clf in enumerate(self.classifiers)], dim=1
        )  # (B, M, C)
        logits = (per * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return logits, None
