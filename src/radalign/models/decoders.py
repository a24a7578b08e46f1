"""Decoders for reconstruction objectives: an upsampling image decoder and a non-autoregressive query decoder.

PRIOR's cross-modality conditional reconstruction uses both (docs/methods/prior.md): the image decoder turns
(dropped-out) patch features plus their sentence context back into the image, the query decoder turns patch
features into a fixed number of sentence prototypes in one pass. Both are generic: any method that reconstructs
an image from a feature grid, or decodes a set from a feature sequence, reuses them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from radalign.errors import ConfigError


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ImageDecoder(nn.Module):
    """(B, C_in, h, w) feature map -> (B, out_channels, h * 2^k, w * 2^k) image.

    k blocks of nearest-neighbour 2x upsampling + two Conv3x3-BN-ReLU, the channels halving at each block from
    ``width`` (PRIOR at 224 px from a 7x7 grid: k = 5, 1536 -> 768 -> 384 -> 192 -> 96 -> 48), then a Conv3x3 to
    the output channels. No activation at the end: the target is the normalised image, which is not bounded.
    """

    def __init__(
        self, in_channels: int, width: int, upsamplings: int, out_channels: int = 1, min_width: int = 8
    ) -> None:
        super().__init__()
        if upsamplings < 1:
            raise ConfigError(f"image decoder: upsamplings must be >= 1, got {upsamplings}")
        layers: list[nn.Module] = []
        channels = in_channels
        for k in range(upsamplings):
            out = max(width // 2**k, min_width)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                *_conv_bn_relu(channels, out),
                *_conv_bn_relu(out, out),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.upsamplings = upsamplings

    @staticmethod
    def upsamplings_for(grid: int, image_size: int) -> int:
        """The number of 2x blocks from a ``grid``-cell side to ``image_size`` pixels (a power-of-two ratio)."""
        ratio = image_size / grid
        k = round(math.log2(ratio)) if ratio > 0 else 0
        if k < 1 or grid * 2**k != image_size:
            raise ConfigError(
                f"image decoder: cannot upsample a {grid}-cell grid to {image_size} px by doubling; use an image "
                f"size that is the grid times a power of two (e.g. {grid * 2 ** max(k, 1)})"
            )
        return k

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class QueryDecoder(nn.Module):
    """``queries`` learned vectors decoded against a memory sequence in ONE pass: (B, M, D) -> (B, Q, D).

    A post-norm (BERT-style) transformer decoder with GELU: bidirectional self-attention among the queries (no
    causal mask: the official PRIOR code's ``is_decoder=True`` silently made it causal, bug 2 in prior.md) and
    cross-attention to the memory, which may carry a padding mask.
    """

    def __init__(self, dim: int, queries: int = 16, layers: int = 8, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"query decoder: dim {dim} is not divisible by heads {heads}")
        self.queries = nn.Parameter(torch.randn(queries, dim) * dim**-0.5)
        layer = nn.TransformerDecoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu", batch_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(self, memory: Tensor, memory_mask: Tensor | None = None, queries: Tensor | None = None) -> Tensor:
        """memory (B, M, D), memory_mask (B, M) True = real; ``queries`` (B, Q, D) replaces the learned ones
        (tests use it to check that every query sees every other)."""
        b = memory.shape[0]
        tgt = self.queries.to(memory.dtype).expand(b, -1, -1) if queries is None else queries
        padding = None if memory_mask is None else ~memory_mask
        return self.decoder(tgt, memory, tgt_mask=None, memory_key_padding_mask=padding, tgt_is_causal=False)
