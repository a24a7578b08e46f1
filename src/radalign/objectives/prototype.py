"""MGCA's disease-level (prototype) loss: Sinkhorn-Knopp codes and swapped prediction (SwAV).

Image and text embeddings are L2-normalised and scored against K L2-normalised learnable prototypes,
s = <x, c_k>. Codes q come from Sinkhorn-Knopp on the detached scores (epsilon 0.05, 3 iterations) and are the
targets for the other modality: loss = (-mean sum_k q_img log softmax(s_txt / tau) - mean sum_k q_txt
log softmax(s_img / tau)) / 2, tau = 0.2.

Prototype normalisation (MGCA): before each forward the prototype weights are re-normalised in place, without
gradient (:meth:`PrototypeLoss.normalize_`), and the scores then use the weights as they are, so the gradient is
MGCA's (not that of a differentiable normalisation). A training step that runs several forwards before one
backward must set ``renormalize_on_forward=False`` and call ``normalize_()`` itself before the forwards (an
in-place change of a parameter already used in a pending graph is an autograd error).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.objectives.contrastive import distributed_world


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """Reduce ``x`` in place across processes (no-op with one process) and return it."""
    if distributed_world()[1] > 1:
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's / MGCA's Sinkhorn-Knopp: (B, K) scores -> (B, K) codes, each row summing to 1.

    Q = exp(scores / epsilon).T (K, B_total); normalise to total mass 1, then ``iterations`` times: rows
    (prototypes) to 1/K each, columns (samples) to 1/B_total each; finally columns to 1. With several processes the
    sums over samples are all-reduced, so the prototypes share the global batch equally (SwAV's
    ``distributed_sinkhorn``). The global maximum score is subtracted before the exp: a constant factor that
    every normalisation cancels, which keeps exp finite for unnormalised scores. Computed in at least float32.
    """
    if scores.ndim != 2:
        raise ConfigError(f"sinkhorn_knopp: scores must be (B, K), got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 0:
        raise ConfigError(f"sinkhorn_knopp: need epsilon > 0 and iterations >= 0, got {epsilon}, {iterations}")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    s = scores.detach().to(dtype)
    top = _all_reduce(s.max().clone(), dist.ReduceOp.MAX)
    q = torch.exp((s - top) / epsilon).T  # (K, B)
    k = q.shape[0]
    b_total = float(_all_reduce(torch.tensor(float(q.shape[1]), device=q.device, dtype=dtype)))
    q = q / _all_reduce(q.sum())
    for _ in range(iterations):
        q = q / _all_reduce(q.sum(dim=1, keepdim=True)) / k  # each prototype gets 1/K of the mass
        q = q / q.sum(dim=0, keepdim=True) / b_total  # each sample gets 1/B_total (columns are local)
    return (q / q.sum(dim=0, keepdim=True)).T  # (B, K): an assignment per sample


class PrototypeLoss(nn.Module):
    """MGCA's swapped-prediction prototype loss with ``n_prototypes`` learnable L2-normalised prototypes."""

    def __init__(
        self,
        dim: int,
        n_prototypes: int = 500,
        tau: float = 0.2,
        epsilon: float = 0.05,
        iterations: int = 3,
        renormalize_on_forward: bool = True,
    ) -> None:
        super().__init__()
        if dim <= 0 or n_prototypes <= 0 or tau <= 0:
            raise ConfigError(f"PrototypeLoss: need dim, n_prototypes, tau > 0, got {dim}, {n_prototypes}, {tau}")
        self.prototypes = nn.Parameter(F.normalize(torch.randn(n_prototypes, dim), dim=1))  # (K, D)
        self.tau, self.epsilon, self.iterations = float(tau), float(epsilon), int(iterations)
        self.renormalize_on_forward = renormalize_on_forward

    @torch.no_grad()
    def normalize_(self) -> None:
        """Re-normalise the prototypes to unit length in place (MGCA does this before every step)."""
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))

    @torch.no_grad()
    def set_prototypes_(self, vectors: Tensor) -> None:
        """Start the prototypes at ``vectors`` (K, D), normalised (MLIP: the findings' knowledge embeddings)."""
        if vectors.shape != self.prototypes.shape:
            raise ConfigError(
                f"PrototypeLoss: {tuple(vectors.shape)} vectors given for {tuple(self.prototypes.shape)} prototypes"
            )
        self.prototypes.copy_(F.normalize(vectors.to(self.prototypes), dim=1))

    def scores(self, embeddings: Tensor) -> Tensor:
        """(B, D) -> (B, K) cosine-style scores <normalised embedding, prototype>."""
        return F.normalize(embeddings, dim=-1) @ self.prototypes.to(embeddings.dtype).T

    def forward(self, image: Tensor, text: Tensor, codes: Tensor | None = None) -> Tensor:
        """image, text (B, D) global embeddings -> scalar swapped-prediction loss (codes carry no gradient).

        ``codes`` (B, K), rows summing to 1 or NaN: a fixed assignment for the rows that have one (MLIP's
        label-guided category level: a sample's findings), used as the target of both modalities instead of the
        Sinkhorn codes; NaN rows keep Sinkhorn's.
        """
        if image.ndim != 2 or image.shape != text.shape or image.shape[1] != self.prototypes.shape[1]:
            raise ConfigError(
                f"PrototypeLoss: image {tuple(image.shape)} / text {tuple(text.shape)} must be (B, "
                f"{self.prototypes.shape[1]})"
            )
        if self.renormalize_on_forward:
            self.normalize_()
        dtype = torch.promote_types(image.dtype, torch.float32)
        with torch.autocast(device_type=image.device.type, enabled=False):
            img_scores = self.scores(image.to(dtype))  # (B, K)
            txt_scores = self.scores(text.to(dtype))
            q_img = sinkhorn_knopp(img_scores, self.epsilon, self.iterations)  # no_grad inside
            q_txt = sinkhorn_knopp(txt_scores, self.epsilon, self.iterations)
            if codes is not None:
                if codes.shape != q_img.shape:
                    raise ConfigError(f"PrototypeLoss: codes {tuple(codes.shape)} must be {tuple(q_img.shape)}")
                fixed = ~codes.isnan().any(dim=1, keepdim=True)
                codes = codes.detach().to(q_img.dtype).nan_to_num(0.0)
                q_img, q_txt = torch.where(fixed, codes, q_img), torch.where(fixed, codes, q_txt)
            i2t = -(q_img * (txt_scores / self.tau).log_softmax(dim=1)).sum(dim=1).mean()
            t2i = -(q_txt * (img_scores / self.tau).log_softmax(dim=1)).sum(dim=1).mean()
            return (i2t + t2i) / 2

    def extra_repr(self) -> str:
        k, d = self.prototypes.shape
        return f"n_prototypes={k}, dim={d}, tau={self.tau}, epsilon={self.epsilon}, iterations={self.iterations}"
