"""GLoRIA: global + local (word <-> region) image-report contrast (docs/methods/gloria.md).

The image encoder runs once through its feature pyramid: the global feature is the average of the last map (what
``ImageOutput.global_emb`` is for a CNN), the local features are the map at ``model.options.local_stride`` (16:
ResNet conv4, as GLoRIA), projected by a 1x1 conv. Words are the text encoder's word embeddings (word pieces
averaged through the data layer's token -> word indices), preceded by the [CLS] token's feature as the official
word sequence is (``model.options.cls_word``), projected linearly. The losses are the already-tested
``objectives/local/gloria.py`` functions (``GloriaLocalLoss.scores`` is ``gloria_local_scores``); this module
only wires encoders, heads and config to them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.config import check_options
from radalign.errors import ConfigError
from radalign.methods.base import TEXT_KEYS, Method, require_text
from radalign.methods.builders import build_image_encoder, build_text_encoder
from radalign.methods.registry import register
from radalign.models.heads import ProjectionHead
from radalign.objectives.local.gloria import GloriaLocalLoss, gloria_global_loss

MODEL_OPTIONS = {"local_stride": 16, "cls_word": True}
LOCAL_OPTIONS = {"temp1": 4.0, "temp2": 5.0, "temp3": 10.0, "agg": "sum", "chunk_size": "auto", "recompute": True}
GLOBAL_OPTIONS = {"temp3": 10.0}
PROMPT_CHUNK = 64  # prompts scored at once by local_similarity: the all-pairs context is (B, P, W, D)


@register("gloria")
class GLoRIA(Method):
    objective_names = ("global", "local")

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        super().__init__(config, tokenizer, for_inference=for_inference)
        model = config.model
        options = check_options("gloria model.options", model.options, MODEL_OPTIONS)
        objectives = config.objectives
        local = check_options("gloria objectives.local", objectives.get("local", {}), LOCAL_OPTIONS, ("weight",))
        global_ = check_options("gloria objectives.global", objectives.get("global", {}), GLOBAL_OPTIONS, ("weight",))
        self.global_temp3 = float(global_["temp3"])
        self.image_encoder = build_image_encoder(model.image, config.loader, for_inference=for_inference)
        strides = list(getattr(self.image_encoder, "pyramid_strides", None) or [])
        stride = int(options["local_stride"])
        if stride not in strides:
            raise ConfigError(
                f"gloria: model.options.local_stride={stride} but image encoder {model.image.name!r} has feature "
                f"maps at strides {strides}; pick one of them (GLoRIA: 16, ResNet conv4) or a 2D timm CNN"
            )
        self.local_level = strides.index(stride)
        self.cls_word = bool(options["cls_word"])
        local_channels = self.image_encoder.pyramid_channels[self.local_level]
        self.text_encoder = build_text_encoder(model.text, tokenizer, for_inference=for_inference)
        self.image_head = ProjectionHead(self.image_encoder.out_dim, model.embed_dim, kind=model.projection)
        self.local_head = nn.Conv2d(local_channels, model.embed_dim, kernel_size=1)  # GLoRIA's local_embedder
        self.text_head = ProjectionHead(self.text_encoder.out_dim, model.embed_dim, kind=model.projection)
        self.word_head = nn.Linear(self.text_encoder.out_dim, model.embed_dim)
        self.local_loss = GloriaLocalLoss(
            float(local["temp1"]),
            float(local["temp2"]),
            float(local["temp3"]),
            str(local["agg"]),
            local["chunk_size"],
            bool(local["recompute"]),
        )
        self.setup_ema()

    # ---- encoders -------------------------------------------------------------------------------------------
    def _image(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """-> projected global (B, E) and local (B, N, E) features, unnormalised, and the local grid (h, w)."""
        maps = self.image_encoder.pyramid(images)
        global_feat = maps[-1].flatten(2).mean(dim=2)  # = the encoder's global_emb for a CNN: no second pass
        local_map = self.local_head(maps[self.local_level])  # (B, E, h, w)
        grid = (local_map.shape[2], local_map.shape[3])
        return self.image_head(global_feat), local_map.flatten(2).transpose(1, 2), grid

    def _text(self, text: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """-> projected global (B, E), projected words (B, W, E) and their mask (B, W), unnormalised."""
        if text.get("token_word") is None:
            raise ConfigError("gloria needs word indices (token_word) with the tokenised text; tokenise with radalign")
        out = self.text_encoder(
            text["input_ids"],
            text["attention_mask"],
            token_sentence=text.get("token_sentence"),
            token_word=text["token_word"],
        )
        words, word_mask = out.words, out.word_mask
        if self.cls_word:  # the official word sequence starts with [CLS] (its caption length counts it)
            words = torch.cat([out.tokens[:, :1], words], dim=1)  # (B, 1 + W, D)
            word_mask = torch.cat([out.token_mask[:, :1], word_mask], dim=1)
        return self.text_head(out.global_emb), self.word_head(words), word_mask

    def encode_images(self, images: Tensor) -> Tensor:
        return F.normalize(self._image(images)[0], dim=-1)

    def encode_image_locals(self, images: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        _, local, grid = self._image(images)
        return F.normalize(local, dim=-1), grid

    def encode_texts(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self._text(text)[0], dim=-1)

    def local_similarity(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """(B_img, P) GLoRIA local scores S (before temp3) of each image with each tokenised text."""
        _, regions, _ = self._image(images)
        text = {k: v for k, v in text.items() if k in TEXT_KEYS}
        n = text["input_ids"].shape[0]
        columns = []
        for start in range(0, n, PROMPT_CHUNK):
            chunk = {k: v[start : start + PROMPT_CHUNK] for k, v in text.items()}
            _, words, word_mask = self._text(chunk)
            columns.append(self.local_loss.scores(regions, None, words, word_mask))  # (B_img, chunk)
        return torch.cat(columns, dim=1)

    # ---- training -------------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        text = require_text(batch, self.config.method)
        image_global, regions, _ = self._image(batch["image"])
        text_global, words, word_mask = self._text(text)
        # The local loss takes the raw projections, as the official attention_fn does (dot products, no norm).
        return {
            "global": gloria_global_loss(image_global, text_global, self.global_temp3),
            "local": self.local_loss(regions, None, words, word_mask),
        }

    @torch.no_grad()
    def attention_maps(self, images: Tensor, text: dict[str, Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """(B, W, N) attention of each report's words over its own image, and the grid, for visualisation; with
        ``model.options.cls_word`` (the default) row 0 is the [CLS] position and row 1 + w is word w."""
        _, regions, grid = self._image(images)
        _, words, word_mask = self._text(text)
        return self.local_loss.attention_maps(regions, None, words, word_mask), grid
