"""LoVT's local alignment (Müller et al., ECCV 2022): symmetric region <-> sentence cross-attention and the local
intra-sample contrastive loss with spatial smoothing of the region positives (docs/methods/lovt.md).

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

from radalign.errors import ConfigError
from radalign.objectives.local.common import masked_fill_logits, masked_softmax, normalised_grid_distances

INITS = ("official", "torch")


def _masked_batch_norm(bn: nn.BatchNorm1d, x: Tensor, mask: Tensor) -> Tensor:
    """BatchNorm over the rows of ``x`` (B, L, D) where ``mask`` (B, L) is True; other rows come back as zeros.

    [design] Flattening only the valid rows before BN means padding can never enter the batch statistics (nor the
    running estimates); the official code normalises the padded positions too.
    """
    if bool(mask.all()):  # the common case for regions: no index-select copy, no scatter
        return bn(x.reshape(-1, x.shape[-1])).view(x.shape)
    out = x.new_zeros(x.shape)
    if mask.any():
        out[mask] = bn(x[mask])  # (M, D) with M = number of valid rows
    return out


class LovtCrossAttention(nn.Module):
    """Symmetric single-head cross-attention between regions and sentences with ONE shared key projection.

    A_nk = <W_k z_n^a + b_k, W_k z_k^b + b_k> / sqrt(dim) (temperature 1). The value and output projections are
    shared by both directions; each direction has its own BatchNorm ([design]: the two outputs live on different
    sets of positions - regions vs sentences - so their statistics are kept apart; the official code shares one).
    Key and value projections have biases as the official ``nn.Linear(d, d_k)`` (``bias=False`` drops them: the
    value bias folds into the output bias, the key bias does not). ``init="official"``: every projection starts as
    the official one, Kaiming-normal weights (fan-out, linear gain) and zero biases; ``"torch"``: PyTorch's
    ``nn.Linear`` default.

    Cost: every projection runs on the B x S sentence rows only, never on the B x N region rows, by linearity
    (exact up to rounding): the scores are z^a . (W_k^T k^b) + b_k . k^b with k^b = W_k z^b + b_k; sentence ->
    region is A @ (W_o v^b) + b_o; region -> sentence projects the attended regions A^T z^a (its rows sum to 1,
    so the value bias is carried exactly). With 49 regions and ~10 sentences that is ~3x fewer projection FLOPs.
    """

    def __init__(self, dim: int = 512, bias: bool = True, init: str = "official") -> None:
        super().__init__()
        if init not in INITS:
            raise ConfigError(f"LoVT cross-attention: init must be one of {', '.join(INITS)}, got {init!r}")
        self.dim = dim
        # The key projection is shared: the same map makes regions and sentences comparable, so no separate query.
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim)
        if init == "official":  # ~1.7x PyTorch's default weight scale: ~3x larger attention scores at the start
            for layer in (self.key, self.value, self.out):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="linear")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.bn_sent2region = nn.BatchNorm1d(dim)
        self.bn_region2sent = nn.BatchNorm1d(dim)

    def scores(self, regions: Tensor, sentences: Tensor) -> Tensor:
        """(B, N, S) <key(region n), key(sentence k)> / sqrt(dim), without projecting the regions."""
        keys = self.key(sentences)  # (B, S, D)
        # <W z + b, k> = <z, W^T k> + <b, k>: W^T k on the S sentence rows instead of W z on the N region rows
        scores = regions @ (keys @ self.key.weight).transpose(1, 2)  # (B, N, S)
        if self.key.bias is not None:
            scores = scores + (keys @ self.key.bias)[:, None, :]
        return scores / math.sqrt(self.dim)

    def attention(
        self, regions: Tensor, region_mask: Tensor, sentences: Tensor, sentence_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(regions over sentences (B, N, S), sentences over regions (B, S, N)); padded keys get zero weight."""
        scores = self.scores(regions, sentences)  # (B, N, S)
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
        # Padded rows get zero attention weight; zeroing them too keeps garbage there (even inf) out of 0 * x.
        regions = torch.where(region_mask[..., None], regions, 0.0)
        sentences = torch.where(sentence_mask[..., None], sentences, 0.0)
        r2s_weights, s2r_weights = self.attention(regions, region_mask, sentences, sentence_mask)
        # out(A @ value(s)) = A @ (W_o value(s)) + b_o: the output projection on the S rows, before attending
        sent2region = r2s_weights @ F.linear(self.value(sentences), self.out.weight) + self.out.bias  # (B, N, D)
        # A @ value(z) = value(A @ z) where A's rows sum to 1 (every row that is kept below)
        region2sent = self.out(self.value(s2r_weights @ regions))  # (B, S, D)
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
