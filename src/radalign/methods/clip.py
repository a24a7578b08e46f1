"""CLIP and ConVIRT: global image-report contrast only (docs/methods/clip.md).

Both are this one class; they differ only in configuration (configs/methods/clip.yaml, convirt.yaml):
CLIP learns its temperature (logit scale initialised at 1/0.07, clamped at 100) with equal direction weights;
ConVIRT fixes tau = 0.1, weights image->text 0.75 and text->image 0.25, uses a 2-layer MLP projection, and
trains on one random sentence per report (``loader.text_one_sentence``). 2D radiographs and 3D CT volumes are
handled alike: the image encoder is chosen by ``model.image.name`` (a MONAI 3D ResNet for volumes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from radalign.methods.base import Method, require_text
from radalign.methods.builders import build_image_encoder, build_infonce, build_text_encoder
from radalign.methods.registry import register
from radalign.models.heads import ProjectionHead


@register("clip", "convirt")
class CLIP(Method):
    objective_names = ("global",)

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        super().__init__(config, tokenizer, for_inference=for_inference)
        model = config.model
        self.image_encoder = build_image_encoder(model.image, config.loader, for_inference=for_inference)
        self.text_encoder = build_text_encoder(model.text, tokenizer, for_inference=for_inference)
        self.image_head = ProjectionHead(self.image_encoder.out_dim, model.embed_dim, kind=model.projection)
        self.text_head = ProjectionHead(self.text_encoder.out_dim, model.embed_dim, kind=model.projection)
        self.contrast = build_infonce(config.objectives.get("global", {}))
        self.setup_ema()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_encoder(images).global_emb), dim=-1)

    def encode_image_locals(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        # CLIP never aligns local features, so the standard dense-CLIP reading is used: the image projection head
        # applied to every cell. For a CNN with a linear head, the mean of the projected cells is exactly the
        # projected global (global = mean of locals): before per-cell normalisation, the cells split the global.
        out = self.image_encoder(images)
        return F.normalize(self.image_head(out.local), dim=-1), tuple(out.grid_shape)

    def encode_texts(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.text_encoder(
            text["input_ids"],
            text["attention_mask"],
            token_sentence=text.get("token_sentence"),
            token_word=text.get("token_word"),
        )
        return F.normalize(self.text_head(out.global_emb), dim=-1)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text = require_text(batch, self.config.method)
        return {"global": self.contrast(self.encode_images(batch["image"]), self.encode_texts(text))}

    def metrics(self) -> dict[str, float]:
        return {"temperature": float(self.contrast.temperature.detach())}
