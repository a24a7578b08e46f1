"""Pieces every local-alignment objective uses: masked softmax / log-sum-exp and grid geometry."""

from __future__ import annotations

import torch
from torch import Tensor

# The project's one masked softmax (masked entries exactly 0, an all-masked slice all zeros, never NaN) and masked
# mean, shared with the attention pools and the fusion blocks; re-exported here for the local objectives.
from radalign.models.pooling import masked_mean, masked_softmax

__all__ = ["NEG", "grid_positions", "masked_fill_logits", "masked_mean", "masked_softmax", "normalised_grid_distances"]

NEG = -1e4  # a large negative logit that stays finite in half precision (no NaN from all-masked rows)


def masked_fill_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """``logits`` with positions where ``mask`` (broadcastable, True = keep) is False set to a large negative."""
    return logits.masked_fill(~mask, NEG)


def grid_positions(grid_shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """(N, len(grid_shape)) integer coordinates of the cells of a grid in row-major order (the ``local`` order)."""
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in grid_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid_shape))


def normalised_grid_distances(grid_shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """(N, N) Euclidean distances between cells divided by the grid diagonal sqrt(sum of squared sides) (LoVT)."""
    positions = grid_positions(grid_shape, device)
    diagonal = torch.tensor([float(s) for s in grid_shape], device=device).pow(2).sum().sqrt()
    return torch.cdist(positions, positions) / diagonal
