"""PRIOR's local alignment (Cheng et al., ICCV 2023): sigmoid cross-attention between patches and sentences, the
SimSiam-style image-side loss and the intra-report sentence InfoNCE (docs/methods/prior.md).

- :class:`PriorCrossAttention` gives C_txt = sigmoid(Q_P K_S^T / sqrt(d)) V_S (a sentence context per patch) and
  C_img = sigmoid(Q_S K_P^T / sqrt(d)) V_P (a visual context per sentence).
- :func:`prior_image_local_loss` is L_loc_img = -(cos(h(P), sg(C_txt)) + cos(h(C_txt), sg(P))) / 2 (no negatives).
- :func:`prior_text_local_loss` is L_loc_txt, an InfoNCE between each report's sentences and their visual contexts
  whose negatives come only from the same report.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.objectives.local.common import masked_fill_logits, masked_mean


def sigmoid_cross_attention(
    queries: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """queries (B, Q, D), keys (B, K, D), values (B, K, D), key_mask (B, K) bool (True = real) or None.

    Returns (context (B, Q, D), weights (B, Q, K)) with weights = sigmoid(q k^T / sqrt(D)) and context =
    weights @ values. Each weight is an independent gate, so rows are NOT normalised over the keys (PRIOR's choice,
    unlike softmax attention); padded keys get weight exactly 0 so they add nothing to the context.
    """
    weights = torch.sigmoid(queries @ keys.transpose(1, 2) / math.sqrt(queries.shape[-1]))  # (B, Q, K)
    if key_mask is not None:
        key_mask = key_mask.bool()
        # masked_fill rather than a product: garbage (even inf/NaN) in a padded key or value cannot leak in
        # (0 * NaN would be NaN).
        weights = weights.masked_fill(~key_mask[:, None, :], 0.0)
        values = values.masked_fill(~key_mask[..., None], 0.0)
    return weights @ values, weights


class PriorCrossAttention(nn.Module):
    """PRIOR's single-head local cross-attention with sigmoid weights, in both directions.

    [design] One set of query/key/value projections (Linear(dim, dim) each) is applied to both modalities: the
    spec writes Q_P, K_S, V_S and Q_S, K_P, V_P with the same Q/K/V maps, so patches and sentences are projected
    into one space and the two directions read the same score matrix's projections. No output projection.
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(
        self, patches: Tensor, patch_mask: Tensor | None, sentences: Tensor, sentence_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """patches (B, N, D), patch_mask (B, N) bool or None, sentences (B, S, D), sentence_mask (B, S) bool or None.

        Returns (text_context_per_patch (B, N, D) = C_txt, image_context_per_sentence (B, S, D) = C_img,
        patch_to_sentence_weights (B, N, S)). Padded sentences (patches) get zero weight as keys; a padded row's own
        output is finite but meaningless and must be masked by the caller. A patch of a report without any valid
        sentence gets a zero context.
        """
        q_p, k_p, v_p = self.query(patches), self.key(patches), self.value(patches)
        q_s, k_s, v_s = self.query(sentences), self.key(sentences), self.value(sentences)
        text_context, patch_to_sentence = sigmoid_cross_attention(q_p, k_s, v_s, sentence_mask)  # (B, N, D/S)
        image_context, _ = sigmoid_cross_attention(q_s, k_p, v_p, patch_mask)  # (B, S, D)
        return text_context, image_context, patch_to_sentence


class SimSiamPredictor(nn.Module):
    """SimSiam's predictor h: Linear(dim, hidden) -> ReLU -> Linear(hidden, dim) (768 -> 384 -> 768 in PRIOR).

    Acts on the last dimension, so (B, N, D) inputs need no reshaping (no BatchNorm, hence no padding concerns).
    """

    def __init__(self, dim: int = 768, hidden: int | None = None) -> None:
        super().__init__()
        hidden = dim // 2 if hidden is None else hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def prior_image_local_loss(
    predictor: nn.Module, patches: Tensor, text_context: Tensor, patch_mask: Tensor | None = None
) -> Tensor:
    """L_loc_img = -(cos(h(P), sg(C_txt)) + cos(h(C_txt), sg(P))) / 2, averaged over the valid patches of the batch.

    patches (B, N, D), text_context (B, N, D) (C_txt from :class:`PriorCrossAttention`), patch_mask (B, N) bool or
    None (all valid). The caller should AND the patch mask with "the report has a valid sentence" (such a patch's
    context is zero). sg = stop-gradient: each side is a fixed target for the prediction of the other, as in
    SimSiam, which is what keeps this negative-free loss from collapsing. No valid patch gives a zero that is still
    connected to the graph.
    """
    per_patch = (
        -(
            F.cosine_similarity(predictor(patches), text_context.detach(), dim=-1)
            + F.cosine_similarity(predictor(text_context), patches.detach(), dim=-1)
        )
        / 2
    )  # (B, N)
    if patch_mask is None:
        return per_patch.mean()
    return masked_mean(per_patch, patch_mask, dim=(0, 1))


TEXT_AVERAGES = ("report", "sentence")


def prior_text_local_loss(
    image_context: Tensor, sentences: Tensor, sentence_mask: Tensor, logit_scale: Tensor, average: str = "report"
) -> Tensor:
    """L_loc_txt: per report, InfoNCE between its sentences' visual contexts and the sentences, both directions.

    image_context (B, S, D) (C_img), sentences (B, S, D), sentence_mask (B, S) bool, logit_scale a scalar tensor
    holding the LOG of the scale (CLIP's convention: scale = exp(logit_scale) = 1 / tau_l; init log(100)).
    With unit vectors c, s and l_ij = scale * <c_i, s_j> over the report's valid sentences i, j, each sentence's
    term is (CE(l_i., i) + CE(l_.i, i)) / 2. ``average="report"`` (the official code): the mean over each report's
    sentences, then over the reports, so every report weighs the same; ``"sentence"``: one mean over all valid
    sentences of the batch, so long reports weigh more. Negatives come only from the same report; a report with
    one sentence gives a 0 term, one with none is left out of the mean.
    """
    if average not in TEXT_AVERAGES:
        raise ConfigError(f"PRIOR local_text: average must be one of {TEXT_AVERAGES}, got {average!r}")
    mask = sentence_mask.bool()
    c, s = F.normalize(image_context, dim=-1), F.normalize(sentences, dim=-1)
    logits = c @ s.transpose(1, 2) * logit_scale.exp().to(c.dtype)  # (B, S, S): logits[b, i, j] = <c_i, s_j>
    pair_mask = mask[:, :, None] & mask[:, None, :]
    positive = logits.diagonal(dim1=1, dim2=2)  # (B, S)
    filled = masked_fill_logits(logits, pair_mask)
    c2s = filled.logsumexp(-1) - positive  # (B, S), row i: context i against the report's sentences
    s2c = filled.logsumexp(-2) - positive  # (B, S), column j: sentence j against the report's contexts
    per_sentence = (c2s + s2c) / 2
    if average == "sentence":
        return masked_mean(per_sentence, mask, dim=(0, 1))
    return masked_mean(masked_mean(per_sentence, mask, dim=1), mask.any(dim=1), dim=0)
