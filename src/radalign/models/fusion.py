"""Cross-attention fusion blocks (MLIP): report tokens enriched with knowledge, and image-text pairs fused for
matching. One pre-norm cross-attention layer each, with a residual: the smallest block that lets one side read
the other ([design], docs/methods/mlip.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.models.pooling import masked_mean


class CrossAttention(nn.Module):
    """queries (B, Q, D) read keys (B or 1, K, D): queries + MultiheadAttention(LN(queries), keys, keys)."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(
                f"cross-attention: dim {dim} is not divisible by heads {heads}; choose heads that divide it"
            )
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``key_mask`` (B, K) bool, True = a real key; keys of batch size 1 are shared by every query row."""
        if keys.shape[0] == 1 and queries.shape[0] > 1:
            keys = keys.expand(queries.shape[0], -1, -1)
        padding = None if key_mask is None else ~key_mask.bool()
        attended, _ = self.attention(self.norm(queries), keys, keys, key_padding_mask=padding, need_weights=False)
        return queries + attended


class KnowledgeAttention(nn.Module):
    """MLIP's token-knowledge step: each report token attends to the knowledge embeddings K (M, D)."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.block = CrossAttention(dim, heads)

    def forward(self, tokens: Tensor, knowledge: Tensor) -> Tensor:
        """tokens (B, W, D), knowledge (M, D) -> knowledge-enhanced tokens (B, W, D)."""
        return self.block(tokens, knowledge.unsqueeze(0).to(tokens.dtype))


class MatchingHead(nn.Module):
    """Image-text matching: report words read the image's patches, the fused words are mean-pooled and a 2-way
    classifier says match (1) or not (0)."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.fuse = CrossAttention(dim, heads)
        self.classifier = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))

    def forward(self, words: Tensor, word_mask: Tensor, patches: Tensor, patch_mask: Tensor) -> Tensor:
        """words (P, W, D), patches (P, N, D) of P image-text pairs -> (P, 2) logits."""
        fused = self.fuse(words, patches, patch_mask)
        pooled = masked_mean(fused, word_mask.bool().unsqueeze(-1), dim=1)
        return self.classifier(pooled)


def matching_pairs(n: int, text_for_image: Tensor, image_for_text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ALBEF's pairs from hard negatives: (image index, text index, label) for the n positives (i, i), then
    (i, text_for_image[i]) and (image_for_text[i], i) as negatives: one positive and two negatives per sample."""
    arange = torch.arange(n, device=text_for_image.device)
    images = torch.cat([arange, arange, image_for_text.to(arange.device)])
    texts = torch.cat([arange, text_for_image.to(arange.device), arange])
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(arange.device)
    return images, texts, labels
