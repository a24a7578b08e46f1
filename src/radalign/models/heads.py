"""Projection heads into the shared image-text space: linear (CLIP) or a 2-layer MLP (ConVIRT, MGCA, LoVT)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from radalign.errors import ConfigError

Norm = Literal["batch", "layer"] | None


def _norm(kind: Norm, dim: int, affine: bool = True) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(dim, affine=affine)
    if kind == "layer":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    raise ConfigError(f"projection head: norm must be 'batch', 'layer' or null, got {kind!r}")


class ProjectionHead(nn.Module):
    """Linear, or Linear -> norm -> ReLU -> Linear (-> optional output norm), over the last dimension.

    Works on (B, D) globals and (B, N, D) locals alike: BatchNorm statistics are taken over all leading
    dimensions, which is what a 1x1-conv sequence MLP (LoVT) computes.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kind: Literal["linear", "mlp"] = "linear",
        hidden_dim: int | None = None,
        norm: Norm = None,
        output_norm: Norm = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if kind == "linear":
            layers: list[nn.Module] = [nn.Dropout(dropout), nn.Linear(in_dim, out_dim, bias=bias)]
        elif kind == "mlp":
            hidden = hidden_dim or in_dim
            layers = [
                nn.Linear(in_dim, hidden, bias=norm is None),  # a norm's shift makes the bias redundant
                _norm(norm, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, out_dim, bias=bias),
            ]
        else:
            raise ConfigError(f"projection head: kind must be 'linear' or 'mlp', got {kind!r}")
        # MGCA ends with a BatchNorm without affine parameters; None keeps the plain output
        layers.append(_norm(output_norm, out_dim, affine=False))
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        shape = x.shape
        y = self.net(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_dim)
