"""Plain formulations of the official local losses, the yardstick of ``local_loss_speed.py --table official``.

Each function follows the structure of its method's released code (GLoRIA: a Python loop over reports, batched
over images; MGCA and LoVT: batched tensor code without per-sample loops; PRIOR: its loop over samples) and reads
the same parameters as radalign's modules, so the two give the same values. Written from the papers' code for
timing only; nothing in ``src`` imports it. Where the official code has no masks (MGCA's word side) the inputs
of the timing carry no padding there; where it has them (LoVT's additive masks) they are used the official way,
with the BatchNorm statistics over the valid rows so that the values agree with radalign's [design] choice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gloria_local(regions: Tensor, words: Tensor, lengths: list[int], temp1=4.0, temp2=5.0, temp3=10.0) -> Tensor:
    """GLoRIA's ``local_loss``: for each report, its words against every image; the SUM of both directions."""
    b = regions.shape[0]
    columns = []
    for j in range(b):
        word = words[j, : lengths[j]].unsqueeze(0).expand(b, -1, -1)  # (B, W_j, D)
        attn = torch.softmax(regions @ word.transpose(1, 2), dim=-1)  # (B, N, W_j): over words first
        attn = torch.softmax(attn.transpose(1, 2) * temp1, dim=-1)  # (B, W_j, N): then over regions
        context = attn @ regions  # (B, W_j, D)
        cos = (word * context).sum(-1) / (word.norm(dim=-1) * context.norm(dim=-1)).clamp(min=1e-8)
        columns.append(torch.log(torch.exp(cos * temp2).sum(dim=1, keepdim=True)))  # (B, 1)
    logits = torch.cat(columns, dim=1) * temp3
    labels = torch.arange(b, device=regions.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


def mgca_token(patches: Tensor, words: Tensor, word_weights: Tensor, patch_weights: Tensor, tau: float = 0.1) -> Tensor:
    """MGCA's token level, ViT branch, batched: raw patch contexts, both weights clipped to their 10-90th
    percentiles (``torch.quantile`` over the batch rather than MGCA's per-sample loop), mean of both directions."""
    b, n, _ = patches.shape
    w_count = words.shape[1]
    p, w = F.normalize(patches, dim=-1), F.normalize(words, dim=-1)

    def clipped(weights: Tensor) -> Tensor:
        low, high = torch.quantile(weights, 0.1, dim=1, keepdim=True), torch.quantile(weights, 0.9, dim=1, keepdim=True)
        weights = torch.minimum(torch.maximum(weights, low), high)
        return weights / weights.sum(dim=1, keepdim=True)

    ww, pw = clipped(word_weights), clipped(patch_weights)
    word_ctx = F.normalize(torch.softmax(w @ p.transpose(1, 2) / tau, dim=-1) @ p, dim=-1)  # (B, W, D)
    word_sim = w @ word_ctx.transpose(1, 2) / tau  # (B, W, W)
    targets = torch.arange(w_count, device=patches.device).repeat(b)
    word_1 = F.cross_entropy(word_sim.reshape(b * w_count, w_count), targets, reduction="none")
    word_2 = F.cross_entropy(word_sim.transpose(1, 2).reshape(b * w_count, w_count), targets, reduction="none")
    loss_word = ((word_1 * ww.view(-1)).sum() / b + (word_2 * ww.view(-1)).sum() / b) / 2
    patch_ctx = torch.softmax(p @ w.transpose(1, 2) / tau, dim=-1) @ w  # (B, N, D), not normalised (ViT)
    patch_sim = p @ patch_ctx.transpose(1, 2) / tau  # (B, N, N)
    targets = torch.arange(n, device=patches.device).repeat(b)
    patch_1 = F.cross_entropy(patch_sim.reshape(b * n, n), targets, reduction="none")
    patch_2 = F.cross_entropy(patch_sim.transpose(1, 2).reshape(b * n, n), targets, reduction="none")
    return loss_word + ((patch_1 * pw.view(-1)).sum() / b + (patch_2 * pw.view(-1)).sum() / b) / 2


def _valid_batch_norm(bn: nn.BatchNorm1d, x: Tensor, mask: Tensor) -> Tensor:
    """Training-mode BatchNorm with statistics over the valid rows, applied to every row (no index-select)."""
    m = mask[..., None].to(x.dtype)
    count = m.sum()
    mean = (x * m).sum(dim=(0, 1)) / count
    var = ((x - mean) ** 2 * m).sum(dim=(0, 1)) / count
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def _intra_sample(z: Tensor, z_att: Tensor, mask: Tensor, positives: Tensor, weights: Tensor, tau: float = 0.3):
    """LoVT's ``LocalIntraSampleContrastiveLoss`` (no same-modality or cross-sample negatives): (l2att, att2l)."""
    b, n, _ = z.shape
    additive = torch.zeros(b, n, dtype=z.dtype, device=z.device).masked_fill(~mask, float("-inf"))
    weights = weights * mask
    weights = weights / weights.sum(dim=1, keepdim=True)
    pos = positives[None].expand(b, n, n) * mask[:, None, :]
    pos = pos / pos.sum(-1, keepdim=True).clamp_min(1e-12)
    scores_ab = F.normalize(z, dim=-1) @ F.normalize(z_att, dim=-1).transpose(1, 2) / tau
    scores_ba = scores_ab.transpose(1, 2)
    loss_ab = -(pos * scores_ab).sum(-1) + torch.logsumexp(scores_ab + additive[:, None, :], dim=-1)
    loss_ba = -(pos * scores_ba).sum(-1) + torch.logsumexp(scores_ba + additive[:, None, :], dim=-1)
    loss_ab, loss_ba = weights * loss_ab, weights * loss_ba  # padded rows: weight 0, finite loss
    return loss_ab.sum(-1).mean(), loss_ba.sum(-1).mean()


def lovt_local(module: nn.Module, regions, region_mask, sentences, sentence_mask, positives, rw, sw) -> Tensor:
    """LoVT's symmetric ``CrossAttention`` (keys, values and outputs projected on both sides) + the four local
    terms, with the parameters of radalign's ``LovtCrossAttention`` ``module``: the sum of the four terms."""
    keys_a, keys_b = module.key(regions), module.key(sentences)
    values_a, values_b = module.value(regions), module.value(sentences)
    scores = keys_a @ keys_b.transpose(1, 2) / math.sqrt(module.dim)  # (B, N, S)
    add_a = torch.zeros_like(region_mask, dtype=scores.dtype).masked_fill(~region_mask, float("-inf"))
    add_b = torch.zeros_like(sentence_mask, dtype=scores.dtype).masked_fill(~sentence_mask, float("-inf"))
    probs_b2a = torch.softmax(scores + add_b[:, None, :], dim=-1) * region_mask[:, :, None]  # (B, N, S)
    probs_a2b = torch.softmax(scores.transpose(1, 2) + add_a[:, None, :], dim=-1) * sentence_mask[:, :, None]
    sent2region = _valid_batch_norm(module.bn_sent2region, module.out(probs_b2a @ values_b), region_mask)
    region2sent = _valid_batch_norm(module.bn_region2sent, module.out(probs_a2b @ values_a), sentence_mask)
    eye = torch.eye(sentences.shape[1], dtype=regions.dtype, device=regions.device)
    terms = (*_intra_sample(regions, sent2region, region_mask, positives, rw),
             *_intra_sample(sentences, region2sent, sentence_mask, eye, sw))  # fmt: skip
    return sum(terms)


def prior_local(attention: nn.Module, predictor: nn.Module, patches, sentences, counts, logit_scale) -> Tensor:
    """PRIOR's ``local_alignment_loss``: a loop over the samples, each with its own sentences: SimSiam image loss
    + the within-report sentence InfoNCE, each averaged over the samples; their sum."""
    image_total, text_total = 0.0, 0.0
    for b in range(patches.shape[0]):
        p, s = patches[b], sentences[b, : counts[b]]  # (N, D), (S_b, D)
        q_p, k_p, v_p = attention.query(p), attention.key(p), attention.value(p)
        q_s, k_s, v_s = attention.query(s), attention.key(s), attention.value(s)
        text_ctx = torch.sigmoid(q_p @ k_s.T / math.sqrt(p.shape[-1])) @ v_s  # (N, D) a sentence context per patch
        image_ctx = torch.sigmoid(q_s @ k_p.T / math.sqrt(p.shape[-1])) @ v_p  # (S_b, D)
        image_total = (
            image_total
            - (
                F.cosine_similarity(predictor(p), text_ctx.detach(), dim=-1).mean()
                + F.cosine_similarity(predictor(text_ctx), p.detach(), dim=-1).mean()
            )
            / 2
        )
        a, c = F.normalize(s, dim=-1), F.normalize(image_ctx, dim=-1)
        labels = torch.arange(len(s), device=s.device)
        logits = logit_scale.exp() * c @ a.T
        text_total = text_total + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return (image_total + text_total) / patches.shape[0]
