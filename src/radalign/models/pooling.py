"""Pooling: attention pooling that returns its weights, and mean pooling of tokens into words or sentences.

Attention pooling (LoVT, PRIOR) returns its weights because methods reuse them, detached, as weights of local
losses. Segment pooling uses the data layer's token -> word / sentence indices and is one batched matmul: no
Python loop over samples or segments (the seed methods' loops are the slow part of their training steps).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.errors import ConfigError


def masked_mean(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] = -1) -> Tensor:
    """Mean over ``dim`` of the positions where ``mask`` is True; 0, still connected to the graph, where none is.

    where() rather than a product, so a masked value (even NaN or inf from a padded row) never reaches the sum.
    """
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum(dim) / mask.sum(dim).clamp_min(1).to(values.dtype)


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax that gives masked entries exactly zero weight, and an all-masked row all zeros (never NaN).

    Filled with the dtype's lowest value, a masked entry's exp(min - max) underflows to exactly 0 in any row that
    has a valid entry (which then sums to 1 as it is); only all-masked rows, uniform after the softmax, need zeroing.
    """
    if mask is None:
        return scores.softmax(dim=dim)
    weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=dim)
    return weights * mask.any(dim=dim, keepdim=True)


class AttentionPool(nn.Module):
    """Multi-head attention of one query over a set of local features; returns (pooled, weights).

    The query is a learned vector (``query="learned"``) or the masked mean of the inputs (``"mean"``, as CLIP's
    AttentionPool2d and PRIOR do). Weights are averaged over heads and sum to 1 over the unmasked inputs.

    ``grid=(h, w)`` makes it CLIP's AttentionPool2d: a learned positional embedding for the mean token and the
    h * w inputs, and the mean token is also one of the keys; the returned weights are then those of the inputs
    (summing to 1 minus the mean token's share). Another grid (images of another size) gets the embedding
    resized bicubically, as CLIP does for other resolutions.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        query: Literal["learned", "mean"] = "learned",
        out_dim: int | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"attention pool: dim {dim} is not divisible by heads {heads}; pick a divisor of {dim}")
        if query not in ("learned", "mean"):
            raise ConfigError(f"attention pool: query must be 'learned' or 'mean', got {query!r}")
        self.heads = heads
        self.query_kind = query
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5) if query == "learned" else None
        if grid is not None and query != "mean":
            raise ConfigError("attention pool: a positional grid (CLIP's AttentionPool2d) goes with query='mean'")
        self.grid = tuple(grid) if grid is not None else None
        self.positional = nn.Parameter(torch.randn(grid[0] * grid[1] + 1, dim) * dim**-0.5) if grid else None
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, out_dim or dim)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, grid_shape: tuple[int, ...] | None = None
    ) -> tuple[Tensor, Tensor]:
        """x (B, N, D), mask (B, N) bool (True = real) -> pooled (B, out_dim), weights (B, N); ``grid_shape`` is
        the (h, w) of the N inputs when the pool has a positional grid."""
        b, n, d = x.shape
        h, hd = self.heads, d // self.heads
        if self.query is not None:
            q = self.query.to(x.dtype).expand(b, d)
        elif mask is None:
            q = x.mean(dim=1)
        else:
            m = mask.to(x.dtype).unsqueeze(-1)
            q = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        if self.positional is not None:
            pos = self._positions(n, grid_shape).to(x.dtype)
            q = q + pos[0]
            x = torch.cat([q.unsqueeze(1), x + pos[1:]], dim=1)  # the mean token is a key too, as in CLIP
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
            n = n + 1
        q = self.q_proj(q).view(b, h, 1, hd)  # (B, H, 1, hd)
        k = self.k_proj(x).view(b, n, h, hd).transpose(1, 2)  # (B, H, N, hd)
        v = self.v_proj(x).view(b, n, h, hd).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, 1, N)
        weights = masked_softmax(scores, None if mask is None else mask[:, None, None, :])
        pooled = (weights @ v).reshape(b, d)  # (B, H, 1, hd) -> (B, D)
        weights = weights.mean(dim=1).squeeze(1)
        if self.positional is not None:
            weights = weights[:, 1:]
        return self.out_proj(pooled), weights

    def _positions(self, n: int, grid_shape: tuple[int, ...] | None) -> Tensor:
        assert self.positional is not None and self.grid is not None
        if grid_shape is None or tuple(grid_shape) == self.grid:
            if n + 1 != self.positional.shape[0]:
                raise ConfigError(
                    f"attention pool: built for a {self.grid[0]}x{self.grid[1]} grid, got {n} inputs and no grid "
                    "shape to resize its positional embedding to"
                )
            return self.positional
        h, w = (int(v) for v in grid_shape)
        if h * w != n:
            raise ConfigError(f"attention pool: grid {grid_shape} does not hold {n} inputs")
        table = self.positional[1:].T.reshape(1, -1, *self.grid)  # (1, D, h0, w0)
        resized = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([self.positional[:1], resized.reshape(-1, h * w).T], dim=0)


def segment_mean(values: Tensor, index: Tensor, num_segments: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean of the tokens of each segment (word or sentence): values (B, T, D), index (B, T) with -1 = none.

    Returns means (B, S, D) and mask (B, S) (True = the segment has at least one token; empty segments are
    zeros). S defaults to the largest index + 1 in the batch. One (B, S, T) @ (B, T, D) matmul: deterministic on
    GPUs and autocast-friendly, unlike scatter-add.
    """
    member = _membership(index, values.shape[:2], num_segments)
    counts = member.sum(dim=2)  # (B, S)
    weights = member.to(values.dtype) / counts.clamp_min(1).unsqueeze(-1).to(values.dtype)
    return weights @ values, counts > 0


def segment_sum(values: Tensor, index: Tensor, num_segments: int | None = None) -> Tensor:
    """Sum of the per-token scalars of each segment: values (B, T), index (B, T) with -1 = none -> (B, S).

    MGCA's word weight is the [CLS] attention mass on the word, i.e. the sum over its word pieces. S defaults to
    the largest index + 1 in the batch; empty segments are 0. One (B, S, T) @ (B, T, 1) matmul, as
    :func:`segment_mean`.
    """
    member = _membership(index, values.shape, num_segments)
    return (member.to(values.dtype) @ values.unsqueeze(-1)).squeeze(-1)


def _membership(index: Tensor, tokens_shape: tuple[int, ...], num_segments: int | None) -> Tensor:
    """(B, S, T) bool, True where token t belongs to segment s; -1 (no segment) matches none. S defaults to the
    largest index + 1 in the batch."""
    if tuple(index.shape) != tuple(tokens_shape):
        raise ValueError(
            f"segment index has shape {tuple(index.shape)}, expected {tuple(tokens_shape)} to match the tokens"
        )
    if num_segments is None:
        num_segments = int(index.max().item()) + 1 if index.numel() else 0
    segments = torch.arange(max(num_segments, 0), device=index.device)
    return index.unsqueeze(1) == segments[None, :, None]
