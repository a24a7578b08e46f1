"""The encoder output contract: what every image and text encoder returns, and all objectives consume.

Objectives read these fields and nothing model-specific, so any objective works with any backbone that fills the
fields it needs (ARCHITECTURE.md, "Encoder output contract"). ``global`` is a Python keyword, hence
``global_emb``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageOutput:
    """One batch of encoded images (2D radiographs or 3D volumes), in the backbone's feature space.

    ``local`` holds one feature per grid cell in row-major order over ``grid_shape`` ((h, w) or (d, h, w)), so
    ``local.reshape(B, *grid_shape, D)`` recovers the map. ``attention`` is the [CLS] -> local attention of the
    last transformer block (averaged over heads, each row sums to 1); ``None`` for CNNs.
    """

    global_emb: Tensor  # (B, D)
    local: Tensor  # (B, N, D), N = prod(grid_shape)
    local_mask: Tensor  # (B, N) bool, True = a real cell (all True for fixed-size inputs)
    grid_shape: tuple[int, ...]  # (h, w) or (d, h, w)
    attention: Tensor | None = None  # (B, N)

    def grid(self) -> Tensor:
        """The local features as a channels-first map (B, D, *grid_shape), for dense heads and heat maps."""
        return locals_to_map(self.local, self.grid_shape)


def locals_to_map(local: Tensor, grid_shape: tuple[int, ...]) -> Tensor:
    """(B, N, D) row-major cells -> (B, D, *grid_shape): cell i * w + j lands at [:, :, i, j]. The one inverse of
    the encoders' flattening (PRIOR's official code used ``view`` without a permute and scrambled it, bug 1)."""
    b, _, d = local.shape
    return local.transpose(1, 2).reshape(b, d, *grid_shape)


@dataclass
class TextOutput:
    """One batch of encoded reports: token, word, sentence and report-level embeddings with their masks.

    Words and sentences are mean-pooled from their tokens through the data layer's indices, so word pieces and
    truncation are handled once, there. A batch encoded without indices has W = 0 / S = 0 (empty tensors).
    ``cls_attention`` is the [CLS] -> token attention of the last transformer layer (averaged over heads, each row
    sums to 1 over the real tokens, 0 on padding); ``None`` unless the encoder was asked for it.
    """

    global_emb: Tensor  # (B, D): [CLS], masked mean or attention pool, per the encoder's ``pooling``
    tokens: Tensor  # (B, T, D)
    token_mask: Tensor  # (B, T) bool, True = a real (non-padding) token, special tokens included
    words: Tensor  # (B, W, D)
    word_mask: Tensor  # (B, W) bool, True = the word has at least one token
    sentences: Tensor  # (B, S, D)
    sentence_mask: Tensor  # (B, S) bool
    token_sentence: Tensor  # (B, T) long, sentence index of each token, -1 = none
    token_word: Tensor | None = None  # (B, T) long, word index of each token, -1 = none
    pool_weights: Tensor | None = None  # (B, T) the attention-pool weights when pooling == "attention"
    cls_attention: Tensor | None = None  # (B, T)

    @property
    def n_sentences(self) -> Tensor:
        """(B,) number of sentences with at least one token."""
        return self.sentence_mask.sum(dim=1)


def full_mask(batch: int, n: int, device: torch.device) -> Tensor:
    """An all-True (B, N) mask: every cell of a fixed-size feature grid is real."""
    return torch.ones(batch, n, dtype=torch.bool, device=device)
