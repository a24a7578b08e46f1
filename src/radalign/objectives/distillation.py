"""Momentum distillation and hard-negative mining (ALBEF, Li et al. 2021), the pieces MLIP's divergence encoder and
image-text matching stand on (docs/methods/ once MLIP lands; issue 19).

- :func:`momentum_targets`: the soft targets alpha x softmax(sim_momentum / tau) + (1 - alpha) x one-hot that an
  online similarity distribution is trained towards (ALBEF's ``alpha = 0.4``).
- :func:`ramped_alpha`: ALBEF ramps alpha up linearly over the first epoch, so the momentum model's still random
  similarities do not teach at the start.
- :func:`hard_negatives`: for each image a text, and for each text an image, drawn with probability softmax(sim)
  over the other items of the batch (the pair itself never), from a given generator: deterministic by seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from radalign.errors import ConfigError
from radalign.objectives.contrastive import contrastive_targets


def momentum_targets(sim_momentum: Tensor, alpha: float, temperature: float, offset: int = 0) -> Tensor:
    """(B, N) similarities of the momentum (divergent) encoders -> (B, N) target distributions: alpha x
    softmax(sim / tau) + (1 - alpha) x one-hot at column ``offset + i`` (this process's rows in a gathered batch)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"momentum distillation: alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ConfigError(f"momentum distillation: temperature must be > 0, got {temperature}")
    b, n = sim_momentum.shape
    one_hot = contrastive_targets(b, n, offset, device=sim_momentum.device, dtype=sim_momentum.dtype)
    soft = (sim_momentum.detach() / temperature).softmax(dim=1)
    return alpha * soft + (1.0 - alpha) * one_hot


def ramped_alpha(alpha: float, step: int, steps_per_epoch: int) -> float:
    """ALBEF's warm-up: alpha x min(1, step / steps_per_epoch) (the first epoch ramps from 0)."""
    if steps_per_epoch <= 0:
        return alpha
    return alpha * min(1.0, step / steps_per_epoch)


def hard_negatives(sim: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(B, B) image-text similarities (row i = image i) -> (text index for each image, image index for each text),
    each drawn from softmax over its row (column for texts) with the pair itself excluded.

    A batch of one has no negative: an error that says so. Equal similarities give a uniform draw.
    """
    b = sim.shape[0]
    if sim.ndim != 2 or sim.shape[1] != b:
        raise ConfigError(f"hard negatives: expected a square (B, B) similarity matrix, got {tuple(sim.shape)}")
    if b < 2:
        raise ConfigError("hard negatives: a batch of one sample has no negative; use a batch of at least 2")
    sim = sim.detach().float().cpu()
    eye = torch.eye(b, dtype=torch.bool)
    weights_i2t = sim.masked_fill(eye, float("-inf")).softmax(dim=1)
    weights_t2i = sim.T.masked_fill(eye, float("-inf")).softmax(dim=1)
    texts = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    images = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return texts, images
