"""LoVT's local alignment (Müller et al., ECCV 2022): symmetric region <-> sentence cross-attention and the local
intra-sample contrastive loss with spatial smoothing of the region positives (docs: shared/methods/lovt.md).

Total local loss: 0.375 * (regions l2att + regions att2l + sentences l2att + sentences att2l), where the regions are
contrasted with ``sent2region`` and the sentences with ``region2sent`` of :class:`LovtCrossAttention`.
:func:`local_intra_sample_loss` returns its two terms separately so the caller applies the weights.

Ablations as arguments: ``spatial_positives(..., smooth=False)`` (or ``positives=None``) is "no spatial smoothing",
``weights=None`` is "no weighting".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.objectives.local.common import masked_fill_logits, masked_softmax, normalised_grid_distances


def _masked_batch_norm(bn: nn.BatchNorm1d, x: Tensor, mask: Tensor) -> Tensor:
    """BatchNorm over the rows of ``x`` (B, L, D) where ``mask`` (B, L) is True; other rows come back as zeros.

    [design] Flattening only the valid rows before BN means padding can never enter the batch statistics (nor the
    running estimates); the official code's handling of padded positions may differ.
    """
    out = x.new_zeros(x.shape)
    if mask.any():
        out[mask] = bn(x[mask])  # (M, D) with M = number of valid rows
    return out


class LovtCrossAttention(nn.Module):
    """Symmetric single-head cross-attention between regions and sentences with ONE shared key projection.

    A_nk = <W_k z_n^a, W_k z_k^b> / sqrt(dim) (temperature 1). The value and output projections are shared by
    both directions; each direction has its own BatchNorm ([design]: the two outputs live on different sets of
    positions - regions vs sentences - so their statistics are kept apart).
    """

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.dim = dim
        # The key projection is shared: the same map makes regions and sentences comparable, so no separate query.
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.bn_sent2region = nn.BatchNorm1d(dim)
        self.bn_region2sent = nn.BatchNorm1d(dim)

    def attention(
        self, regions: Tensor, region_mask: Tensor, sentences: Tensor, sentence_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(regions over sentences (B, N, S), sentences over regions (B, S, N)); padded keys get zero weight."""
        scores = self.key(regions) @ self.key(sentences).transpose(1, 2) / math.sqrt(self.dim)  # (B, N, S)
        region_to_sentences = masked_softmax(scores, sentence_mask[:, None, :], dim=-1)  # (B, N, S)
        sentence_to_regions = masked_softmax(scores.transpose(1, 2), region_mask[:, None, :], dim=-1)  # (B, S, N)
        return region_to_sentences, sentence_to_regions

    def forward(
        self, regions: Tensor, region_mask: Tensor, sentences: Tensor, sentence_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """regions (B, N, D), region_mask (B, N), sentences (B, S, D), sentence_mask (B, S) bool (True = real).

        Returns (sent2region (B, N, D): per region, attention over its sample's sentences; region2sent (B, S, D):
        per sentence, attention over the regions). Rows that are padding, or whose sample has nothing to attend
        to, are zero and excluded from the BatchNorm statistics.
        """
        region_mask, sentence_mask = region_mask.bool(), sentence_mask.bool()
        r2s_weights, s2r_weights = self.attention(regions, region_mask, sentences, sentence_mask)
        sent2region = self.out(r2s_weights @ self.value(sentences))  # (B, N, D)
        region2sent = self.out(s2r_weights @ self.value(regions))  # (B, S, D)
        # A region of a sample without sentences attended to nothing: keep it out of BN like padding.
        region_valid = region_mask & sentence_mask.any(dim=1, keepdim=True)  # (B, N)
        sentence_valid = sentence_mask & region_mask.any(dim=1, keepdim=True)  # (B, S)
        sent2region = _masked_batch_norm(self.bn_sent2region, sent2region, region_valid)
        region2sent = _masked_batch_norm(self.bn_region2sent, region2sent, sentence_valid)
        return sent2region, region2sent


def spatial_positives(
    grid_shape: tuple[int, ...], threshold: float = 0.5, smooth: bool = True, device: torch.device | None = None
) -> Tensor:
    """(N, N) positive weights of the region loss: P_nk ∝ 1[d_nk <= threshold] exp(-d_nk), rows summing to 1.

    d is the grid distance divided by the grid diagonal (row-major cell order). ``smooth=False`` gives the
    identity (only the region itself is positive: the "no spatial smoothing" ablation).
    """
    n = math.prod(grid_shape)
    if not smooth:
        return torch.eye(n, device=device)
    d = normalised_grid_distances(grid_shape, device)  # (N, N)
    p = torch.exp(-d) * (d <= threshold)  # the diagonal (d = 0) keeps every row non-empty
    return p / p.sum(dim=1, keepdim=True)


def local_intra_sample_loss(
    z: Tensor,
    z_att: Tensor,
    mask: Tensor,
    positives: Tensor | None = None,
    weights: Tensor | None = None,
    tau: float = 0.3,
) -> tuple[Tensor, Tensor]:
    """LoVT's local intra-sample contrastive loss; returns the two terms SEPARATELY as ``(l2att, att2l)``.

    z (B, L, D) locals, z_att (B, L, D) their cross-attended counterparts, mask (B, L) bool (True = real),
    positives (L, L) row weights P (None = identity), weights (B, L) per-local weights (None = uniform).

    Per sample, on L2-normalised vectors, s_nk = <z_n, z~_k> / tau;
    l2att_n = -sum_k P_nk s_nk + logsumexp_k s_nk and att2l_n = -sum_k P_nk s_kn + logsumexp_k s_kn, where padded
    k are left out of the log-sum-exp and zeroed in P, whose rows are then renormalised over the valid k. Negatives
    are only the other locals of the same sample. Each term is (1/B) sum_b sum_n w_bn l_bn with w detached and
    renormalised over the valid locals of each sample (a sample without valid locals contributes 0 but still
    counts in B). The caller weights the terms (0.375 each in LoVT).
    """
    mask = mask.bool()
    b, length, _ = z.shape
    s = F.normalize(z, dim=-1) @ F.normalize(z_att, dim=-1).transpose(1, 2) / tau  # (B, L, L): s[b, n, k]
    if positives is None:
        positives = torch.eye(length, device=z.device, dtype=s.dtype)
    p = positives.to(s.dtype)[None] * mask[:, None, :].to(s.dtype)  # (B, L, L), padded columns zero
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    col_mask = mask[:, None, :]  # (B, 1, L): the k that may appear in the log-sum-exp
    s_t = s.transpose(1, 2)  # (B, L, L): s_t[b, n, k] = s[b, k, n]
    l2att = -(p * s).sum(-1) + masked_fill_logits(s, col_mask).logsumexp(-1)  # (B, L)
    att2l = -(p * s_t).sum(-1) + masked_fill_logits(s_t, col_mask).logsumexp(-1)  # (B, L)

    # The attention-pool weights only choose which locals matter; they must not be trained through this loss.
    w = torch.ones_like(l2att) if weights is None else weights.detach().to(l2att.dtype)
    w = w * mask.to(w.dtype)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, L), each sample's valid weights sum to 1
    # where() rather than a product so a padded row's value can never leak in (not even as NaN * 0).
    l2att = torch.where(mask, w * l2att, 0.0).sum() / b
    att2l = torch.where(mask, w * att2l, 0.0).sum() / b
    return l2att, att2l
