"""Momentum distillation and hard-negative mining (ALBEF, Li et al. 2021), the pieces MLIP's divergence encoder and
image-text matching stand on (docs/methods/ once MLIP lands; issue 19).

- :func:`momentum_targets`: the soft targets alpha x softmax(sim_momentum / tau) + (1 - alpha) x one-hot that an
  online similarity distribution is trained towards (ALBEF's ``alpha = 0.4``).
- :func:`momentum_distillation_loss`: ALBEF's image-text contrast towards those targets, both directions, with
  the batch gathered across processes as the InfoNCE gathers it;
- :func:`ramped_alpha`: ALBEF ramps alpha up linearly over the first epoch, so the momentum model's still random
  similarities do not teach at the start.
- :func:`hard_negatives`: for each image a text, and for each text an image, drawn with probability softmax(sim)
  over the other items of the batch (the pair itself never), from a given generator: deterministic by seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radalign.errors import ConfigError
from radalign.objectives.contrastive import contrastive_targets, gather_rows


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


def momentum_distillation_loss(
    image: Tensor, text: Tensor, image_m: Tensor, text_m: Tensor, alpha: float, temperature: float
) -> Tensor:
    """Mean over both directions of the cross-entropy between softmax(online similarities / tau) and
    :func:`momentum_targets` of the momentum ones: image (B, D) against every text of the (gathered) batch
    towards alpha x softmax(image_m . text_m / tau) + (1 - alpha) x one-hot, and text against images alike.

    ``image_m`` / ``text_m`` (B, D) come from the momentum (divergence) encoders and carry no gradient. Inputs are
    L2-normalised here; computed in at least float32.
    """
    if not image.shape == text.shape == image_m.shape == text_m.shape or image.ndim != 2:
        raise ConfigError(
            "momentum distillation: image, text and their momentum versions must all be (B, D), got "
            f"{tuple(image.shape)}, {tuple(text.shape)}, {tuple(image_m.shape)}, {tuple(text_m.shape)}"
        )
    dtype = torch.promote_types(image.dtype, torch.float32)
    with torch.autocast(device_type=image.device.type, enabled=False):
        online = F.normalize(torch.cat([image, text], dim=1).to(dtype).unflatten(1, (2, -1)), dim=-1).flatten(1)
        momentum = F.normalize(torch.cat([image_m, text_m], dim=1).detach().to(dtype).unflatten(1, (2, -1)), dim=-1)
        image, text = online.unflatten(1, (2, -1)).unbind(1)
        image_m, text_m = momentum.unbind(1)
        both, offset = gather_rows(online)
        image_all, text_all = both.unflatten(1, (2, -1)).unbind(1)
        both_m, _ = gather_rows(momentum.flatten(1), with_grad=False)
        image_m_all, text_m_all = both_m.unflatten(1, (2, -1)).unbind(1)
        loss = image.new_zeros(())
        for anchor, columns, anchor_m, columns_m in ((image, text_all, image_m, text_m_all),
                                                     (text, image_all, text_m, image_m_all)):  # fmt: skip
            targets = momentum_targets(anchor_m @ columns_m.T, alpha, temperature, offset)
            loss = loss + -(targets * (anchor @ columns.T / temperature).log_softmax(dim=1)).sum(dim=1).mean()
        return loss / 2


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
