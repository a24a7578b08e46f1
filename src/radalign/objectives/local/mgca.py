"""MGCA's token-level loss (HKU-MedAI/MGCA, ``mgca/models/mgca/mgca_module.py``), vectorised over the batch.

Word -> patch: every word of report b attends over the patches of image b (softmax of <w, p> / tau over that
image's valid patches); the attended vector c_w = sum_p a_wp p. Intra-sample InfoNCE between the words and their
attended vectors, both directions: word w against all attended vectors of the sample (positive c_w), and c_w
against all words of the sample (positive w). Patch -> word is the same with the roles swapped. Each token's
cross-entropy is weighted (the weights of a sample sum to 1): words by the text [CLS] attention clipped to its
10th-90th percentile, patches by the ViT [CLS] attention clipped the same way (uniform when there is none).

Normalisations: words and patches are L2-normalised before every dot product, and so are the word -> patch
attended vectors. The patch -> word attended vectors are normalised only with ``normalize_patch_context=True``:
MGCA's code normalises them for CNN encoders and not for ViTs (its default encoder), and clips the patch weights
only in its ViT branch, where it has them. The method picks the official branch per encoder family
(``methods/mgca.py``). The same tau (0.1) divides the attention and the InfoNCE logits.

[design] readings where MGCA's code has no masks:
- padded words / patches are excluded everywhere: as attention keys, as InfoNCE negatives, as anchors, and from
  the percentiles (MGCA takes the word percentile over the non-zero weights and lets [PAD] words be negatives);
- a sample with no valid word or no valid patch contributes nothing, and the loss is the mean over the others
  (MGCA divides by the batch size, every sample having both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radalign.errors import ConfigError
from radalign.objectives.local.common import masked_fill_logits, masked_mean, masked_softmax


def _masked_quantile(sorted_values: Tensor, counts: Tensor, q: float) -> Tensor:
    """(B,) the q-quantile of each row's first ``counts`` sorted values, linear interpolation (numpy's default)."""
    pos = q * (counts - 1).clamp_min(0).to(sorted_values.dtype)  # (B,)
    lo, hi = pos.floor().long(), pos.ceil().long()
    v_lo = sorted_values.gather(1, lo[:, None]).squeeze(1)
    v_hi = sorted_values.gather(1, hi[:, None]).squeeze(1)
    frac = pos - lo.to(pos.dtype)
    return v_lo + (v_hi - v_lo) * frac


def clip_percentile_weights(weights: Tensor, mask: Tensor, low: float = 0.1, high: float = 0.9) -> Tensor:
    """Clip each row of ``weights`` (B, W) to its [low, high] quantiles over the valid (``mask``) entries.

    Quantiles are numpy's / torch's linear interpolation over the valid entries only; padded entries come back as
    0. Not renormalised (the token loss does that), and not detached (callers detach).
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"clip_percentile_weights: need 0 <= low <= high <= 1, got {low}, {high}")
    counts = mask.sum(dim=1)  # (B,)
    # padding sorts to the end, so each row's first ``counts`` sorted values are its valid ones
    fill = torch.finfo(weights.dtype).max
    sorted_values = weights.masked_fill(~mask, fill).sort(dim=1).values  # (B, W)
    q_low = _masked_quantile(sorted_values, counts, low)[:, None]  # (B, 1)
    q_high = _masked_quantile(sorted_values, counts, high)[:, None]
    clipped = torch.minimum(torch.maximum(weights, q_low), q_high)
    return clipped.masked_fill(~mask, 0.0)


def _token_weights(weights: Tensor | None, mask: Tensor, clip: bool) -> Tensor:
    """(B, L) detached weights summing to 1 over each row's valid tokens (uniform when None or all zero)."""
    m = mask.to(torch.get_default_dtype() if weights is None else weights.dtype)
    if weights is None:
        w = m
    else:
        w = weights.detach().clamp_min(0.0) * m
        if clip:
            w = clip_percentile_weights(w, mask)
        w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, m)  # an all-zero row falls back to uniform
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _intra_sample_nce(logits: Tensor, mask: Tensor | None, weights: Tensor) -> Tensor:
    """(B,) weighted intra-sample InfoNCE between tokens and their attended vectors, mean of both directions.

    logits (B, L, L): token i . attended vector j, over tau; mask (B, L), None when every token is valid (no masked
    copy of the logits then); weights (B, L), 0 on padding, rows summing to 1.
    """
    if mask is not None:  # a padded row / column then only meets other padding, whose terms the weights zero
        logits = masked_fill_logits(logits, mask[:, None, :] & mask[:, :, None])
    # token -> attended: softmax over the attended vectors j of the sample, positive j = i; attended -> token:
    # over the tokens i. log_softmax is one fused pass each way (measured faster than logsumexp on the CPU).
    q2a = logits.log_softmax(dim=2).diagonal(dim1=1, dim2=2)  # (B, L)
    a2q = logits.log_softmax(dim=1).diagonal(dim1=1, dim2=2)  # (B, L)
    return -(weights * (q2a + a2q)).sum(dim=1) / 2


def mgca_token_loss(
    patches: Tensor,
    patch_mask: Tensor,
    words: Tensor,
    word_mask: Tensor,
    word_weights: Tensor | None = None,
    patch_weights: Tensor | None = None,
    tau: float = 0.1,
    normalize_patch_context: bool = True,
    clip_patch_weights: bool = True,
) -> Tensor:
    """MGCA's token-level loss = word term + patch term (each the mean of its two InfoNCE directions, as MGCA).

    patches (B, N, D), patch_mask (B, N) bool; words (B, W, D), word_mask (B, W) bool, in one shared space.
    ``word_weights`` (B, W): the text [CLS] -> word attention, clipped per sample to its 10th-90th percentile over
    valid words; ``patch_weights`` (B, N): the ViT [CLS] -> patch attention (``ImageOutput.attention``), clipped
    the same way unless ``clip_patch_weights=False``. Both are detached and renormalised over valid tokens; None =
    uniform. ``normalize_patch_context``: L2-normalise the patches' attended word vectors (MGCA: CNN branch yes,
    ViT branch no). Returns a scalar: the mean over samples with at least one valid word and patch (0 when there
    is none). Computed in at least float32.
    """
    if patches.ndim != 3 or words.ndim != 3 or patches.shape[::2] != words.shape[::2]:
        raise ConfigError(f"mgca_token_loss: patches {tuple(patches.shape)} / words {tuple(words.shape)} mismatch")
    if tau <= 0:
        raise ConfigError(f"mgca_token_loss: tau must be > 0, got {tau}")
    dtype = torch.promote_types(patches.dtype, torch.float32)
    patch_mask, word_mask = patch_mask.bool(), word_mask.bool()
    # Masks that hide nothing (every patch of a fixed-size image) are dropped: no masked copies of big tensors.
    patch_keep = None if bool(patch_mask.all()) else patch_mask
    word_keep = None if bool(word_mask.all()) else word_mask
    with torch.autocast(device_type=patches.device.type, enabled=False):
        p = F.normalize(patches.to(dtype), dim=-1)  # (B, N, D)
        w = F.normalize(words.to(dtype), dim=-1)  # (B, W, D)
        p_tau, w_tau = p * (1.0 / tau), w * (1.0 / tau)  # on the (B, L, D) sides, not the (B, L, L') products
        sim = w_tau @ p.transpose(1, 2)  # (B, W, N) = <w, p> / tau
        # words attend over their own image's valid patches, and patches over their own report's valid words
        word_attn = masked_softmax(sim, None if patch_keep is None else patch_keep[:, None, :])  # (B, W, N)
        patch_attn = masked_softmax(sim.transpose(1, 2), None if word_keep is None else word_keep[:, None, :])
        word_ctx = F.normalize(word_attn @ p, dim=-1)  # (B, W, D)
        word_logits = w_tau @ word_ctx.transpose(1, 2)  # (B, W, W)
        if normalize_patch_context:
            patch_ctx = F.normalize(patch_attn @ w, dim=-1)  # (B, N, D)
            patch_logits = p_tau @ patch_ctx.transpose(1, 2)  # (B, N, N)
        else:  # <p_i, sum_k a_jk w_k> / tau = sum_k sim[k, i] a_jk: the logits without forming the raw contexts
            patch_logits = sim.transpose(1, 2) @ patch_attn.transpose(1, 2)  # (B, N, N), ~25% fewer FLOPs
        ww = _token_weights(None if word_weights is None else word_weights.to(dtype), word_mask, clip=True)
        pw = _token_weights(
            None if patch_weights is None else patch_weights.to(dtype), patch_mask, clip=clip_patch_weights
        )
        per_sample = _intra_sample_nce(word_logits, word_keep, ww.to(dtype))  # (B,)
        per_sample = per_sample + _intra_sample_nce(patch_logits, patch_keep, pw.to(dtype))
        valid = word_mask.any(dim=1) & patch_mask.any(dim=1)  # (B,)
        return masked_mean(per_sample, valid, dim=0)
