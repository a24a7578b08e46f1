"""LoVT (Müller et al., ECCV 2022; docs/methods/lovt.md): global image-report InfoNCE plus local intra-sample
contrast between image regions and report sentences through a symmetric cross-attention (docs/methods/lovt.md).

Objectives (unweighted here; configs/methods/lovt.yaml weights them as the paper's total):
``global`` (InfoNCE, tau 0.1, direction weights 0.75 / 0.25 inside the loss), ``local_image`` (regions l2att +
att2l against sentence->region attention) and ``local_text`` (sentences l2att + att2l against region->sentence
attention), each local one weighted 0.375. The local pieces live in ``objectives/local/lovt.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.config import check_options
from radalign.errors import ConfigError
from radalign.methods.base import Method, require_text
from radalign.methods.builders import build_image_encoder, build_infonce, build_text_encoder
from radalign.methods.registry import register
from radalign.models.heads import ProjectionHead
from radalign.models.pooling import AttentionPool
from radalign.objectives.local.lovt import LovtCrossAttention, local_intra_sample_loss, spatial_positives

MODEL_OPTIONS = {
    "pool_heads": 8,
    "projection_hidden": 2048,
    "sentence_pooling": "max",
    "cross_attention_bias": True,
    "cross_attention_init": "official",
}
LOCAL_KEYS = {
    "local_image": {"weight", "tau", "spatial_smoothing", "threshold", "weighting"},
    "local_text": {"weight", "tau", "weighting"},
}


def segment_max(tokens: Tensor, token_sentence: Tensor) -> tuple[Tensor, Tensor]:
    """Max over each sentence's tokens: tokens (B, T, D), token_sentence (B, T) (-1 = none, e.g. [CLS]/[SEP])
    -> (B, S, D), mask (B, S). A loop over sentences (S is small) keeps memory at B x T x D, not B x S x T x D."""
    n = int(token_sentence.max().item()) + 1 if token_sentence.numel() else 0
    out, masks = [], []
    for s in range(max(n, 0)):
        member = token_sentence == s  # (B, T)
        pooled = tokens.masked_fill(~member.unsqueeze(-1), torch.finfo(tokens.dtype).min).amax(dim=1)
        has = member.any(dim=1)
        out.append(torch.where(has.unsqueeze(-1), pooled, torch.zeros_like(pooled)))  # empty sentence: zeros
        masks.append(has)
    if not out:
        b, _, d = tokens.shape
        return tokens.new_zeros(b, 0, d), torch.zeros(b, 0, dtype=torch.bool, device=tokens.device)
    return torch.stack(out, dim=1), torch.stack(masks, dim=1)


def project_valid(head: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """``head`` on the rows of x (B, L, D) where mask is True, zeros elsewhere: padded sentences must not enter the
    projection's BatchNorm statistics ([design], like the cross-attention's BN)."""
    out = x.new_zeros(*x.shape[:2], head.out_dim)
    if mask.any():
        out[mask] = head(x[mask]).to(out.dtype)
    return out


@register("lovt")
class LoVT(Method):
    objective_names = ("global", "local_image", "local_text")
    global_feature_name = "LoVT's attention pool over the image regions (before the global projection head)"

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        super().__init__(config, tokenizer, for_inference=for_inference)
        model = config.model
        options = check_options("lovt model.options", model.options, MODEL_OPTIONS)
        if options["sentence_pooling"] not in ("max", "mean"):
            raise ConfigError(
                f"lovt: model.options.sentence_pooling must be max or mean, got {options['sentence_pooling']!r}"
            )
        for name, keys in LOCAL_KEYS.items():
            check_options(f"lovt objectives.{name}", config.objectives.get(name, {}), {}, tuple(keys))
        self.sentence_pooling = options["sentence_pooling"]
        self.image_encoder = build_image_encoder(model.image, config.loader, for_inference=for_inference)
        self.text_encoder = build_text_encoder(model.text, tokenizer, for_inference=for_inference)
        image_dim, text_dim = self.image_encoder.out_dim, self.text_encoder.out_dim
        heads, hidden, embed = int(options["pool_heads"]), int(options["projection_hidden"]), model.embed_dim
        # Mean-query attention pools: the paper's GlobalAvgAttentionAggregator; their weights weight the local losses.
        self.image_pool = AttentionPool(image_dim, heads=heads, query="mean")
        self.text_pool = AttentionPool(text_dim, heads=heads, query="mean")

        def head(dim: int) -> ProjectionHead:  # Linear (= 1x1 conv) -> BN -> ReLU -> Linear, for globals and locals
            return ProjectionHead(dim, embed, kind="mlp", hidden_dim=hidden, norm="batch")

        self.image_head, self.text_head = head(image_dim), head(text_dim)
        self.image_local_head, self.text_local_head = head(image_dim), head(text_dim)
        self.cross_attention = LovtCrossAttention(
            embed, bias=bool(options["cross_attention_bias"]), init=str(options["cross_attention_init"])
        )
        self.contrast = build_infonce(config.objectives.get("global", {}))
        self.setup_ema()

    # -- encoders --------------------------------------------------------------------------------------------------

    def _images(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
        """(global (B, E), locals (B, N, E), local mask (B, N), pool weights (B, N), grid), all projected."""
        out = self.image_encoder(images)
        pooled, weights = self.image_pool(out.local, out.local_mask)
        locals_ = project_valid(self.image_local_head, out.local, out.local_mask)
        return self.image_head(pooled), locals_, out.local_mask, weights, tuple(out.grid_shape)

    def _texts(self, text: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(global (B, E), sentences (B, S, E), sentence mask (B, S), pool weights (B, S)), all projected."""
        token_sentence = text.get("token_sentence")
        if token_sentence is None:  # no sentence indices: the whole report is one sentence
            token_sentence = torch.where(text["attention_mask"].bool(), 0, -1)
        out = self.text_encoder(text["input_ids"], text["attention_mask"], token_sentence=token_sentence)
        if self.sentence_pooling == "max":
            sentences, mask = segment_max(out.tokens, out.token_sentence)
        else:
            sentences, mask = out.sentences, out.sentence_mask
        pooled, weights = self.text_pool(sentences, mask)
        # A report with no sentence pools to zeros; the projection still runs on it (one row of B, harmless).
        locals_ = project_valid(self.text_local_head, sentences, mask)
        return self.text_head(pooled), locals_, mask, weights

    def encode_images(self, images: Tensor) -> Tensor:
        return F.normalize(self._images(images)[0], dim=-1)

    def global_image_features(self, images: Tensor) -> Tensor:
        out = self.image_encoder(images)
        return self.image_pool(out.local, out.local_mask)[0]  # (B, C): what image_head projects

    def encode_image_locals(self, images: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        _, locals_, _, _, grid = self._images(images)
        return F.normalize(locals_, dim=-1), grid

    def encode_texts(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self._texts(text)[0], dim=-1)

    # -- losses ----------------------------------------------------------------------------------------------------

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        text = require_text(batch, self.config.method)
        image_global, regions, region_mask, region_w, grid = self._images(batch["image"])
        text_global, sentences, sentence_mask, sentence_w = self._texts(text)
        sent2region, region2sent = self.cross_attention(regions, region_mask, sentences, sentence_mask)

        spec_i = self.config.objectives.get("local_image", {})
        spec_t = self.config.objectives.get("local_text", {})
        positives = spatial_positives(
            grid,
            threshold=float(spec_i.get("threshold", 0.5)),
            smooth=bool(spec_i.get("spatial_smoothing", True)),
            device=regions.device,
        )
        # A sample without sentences attended to nothing: its regions are left out of the region loss.
        region_valid = region_mask & sentence_mask.any(dim=1, keepdim=True)
        region_l2att, region_att2l = local_intra_sample_loss(
            regions,
            sent2region,
            region_valid,
            positives=positives,
            weights=region_w if spec_i.get("weighting", True) else None,
            tau=float(spec_i.get("tau", 0.3)),
        )
        sentence_l2att, sentence_att2l = local_intra_sample_loss(
            sentences,
            region2sent,
            sentence_mask,
            positives=None,  # a sentence's only positive is its own attended counterpart
            weights=sentence_w if spec_t.get("weighting", True) else None,
            tau=float(spec_t.get("tau", 0.3)),
        )
        return {
            "global": self.contrast(F.normalize(image_global, dim=-1), F.normalize(text_global, dim=-1)),
            "local_image": region_l2att + region_att2l,
            "local_text": sentence_l2att + sentence_att2l,
        }
