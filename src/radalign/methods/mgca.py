"""MGCA: multi-granularity cross-modal alignment (shared/methods/baselines.md; HKU-MedAI/MGCA).

Three objectives, returned unweighted (the stage schedule weighs them: instance 1, token 0.7, prototype 0.5):

- ``instance``: InfoNCE between the projected image and report globals (tau 0.07, ``build_infonce``);
- ``token``: :func:`mgca_token_loss` between the projected patches and the projected words (tau 0.1), patches
  weighted by the ViT [CLS] attention (uniform for CNNs);
- ``prototype``: :class:`PrototypeLoss` (500 prototypes, Sinkhorn-Knopp codes, swapped prediction, tau 0.2) on
  the projected globals, switched on after the warm-up by a stage (its own weight is 0 until then).

As in MGCA's code, globals and locals have their own projection heads (``global_embed`` / ``local_embed``), so the
token loss aligns patches and words in a local space next to the global one.

[design] differences from MGCA:
- word weights are uniform: MGCA weights words by the text [CLS] -> word attention clipped to its 10th-90th
  percentile, but the text encoder does not expose that attention yet (a follow-up can pass it as
  ``word_weights``; :func:`mgca_token_loss` already clips it);
- ``encode_image_locals`` returns the local-head patches (the space the token loss trains against words);
  phrase grounding compares them with ``encode_texts`` (the global text head), a space MGCA never ties them to.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from radalign.errors import ConfigError
from radalign.methods.base import Method, require_text
from radalign.methods.builders import build_image_encoder, build_infonce, build_text_encoder
from radalign.methods.registry import register
from radalign.models.heads import ProjectionHead
from radalign.models.outputs import ImageOutput, TextOutput
from radalign.objectives.local.mgca import mgca_token_loss
from radalign.objectives.prototype import PrototypeLoss
from radalign.training.config import check_options

HEAD_OPTIONS = ("head_hidden_dim", "head_norm", "head_output_norm")


@register("mgca")
class MGCA(Method):
    objective_names = ("instance", "token", "prototype")

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        super().__init__(config, tokenizer, for_inference=for_inference)
        model = config.model
        check_options("mgca model.options", model.options, {}, HEAD_OPTIONS)
        head = {
            "kind": model.projection,
            "hidden_dim": model.options.get("head_hidden_dim"),
            "norm": model.options.get("head_norm"),
            "output_norm": model.options.get("head_output_norm"),
        }
        self.image_encoder = build_image_encoder(model.image, config.loader, for_inference=for_inference)
        self.text_encoder = build_text_encoder(model.text, tokenizer, for_inference=for_inference)
        image_dim, text_dim = self.image_encoder.out_dim, self.text_encoder.out_dim
        self.image_head = ProjectionHead(image_dim, model.embed_dim, **head)
        self.text_head = ProjectionHead(text_dim, model.embed_dim, **head)
        self.image_local_head = ProjectionHead(image_dim, model.embed_dim, **head)
        self.text_local_head = ProjectionHead(text_dim, model.embed_dim, **head)
        objectives = config.objectives
        self.contrast = build_infonce(objectives.get("instance", {"temperature": 0.07}))
        token = check_options("mgca objectives.token", objectives.get("token", {}), {"temperature": 0.1}, ("weight",))
        self.token_temperature = float(token["temperature"])
        proto = {k: v for k, v in objectives.get("prototype", {}).items() if k != "weight"}
        try:
            self.prototype = PrototypeLoss(model.embed_dim, **proto)
        except TypeError as err:
            raise ConfigError(f"objectives.prototype: {err}") from err
        self.setup_ema()

    def _text(self, text: dict[str, torch.Tensor]) -> TextOutput:
        return self.text_encoder(
            text["input_ids"],
            text["attention_mask"],
            token_sentence=text.get("token_sentence"),
            token_word=text.get("token_word"),
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_encoder(images).global_emb), dim=-1)

    def encode_image_locals(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        out = self.image_encoder(images)
        return F.normalize(self.image_local_head(out.local), dim=-1), tuple(out.grid_shape)

    def encode_texts(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_head(self._text(text).global_emb), dim=-1)

    def token_loss(self, image: ImageOutput, text: TextOutput) -> torch.Tensor:
        """MGCA's token level; word weights uniform until the text encoder exposes its [CLS] attention."""
        return mgca_token_loss(
            self.image_local_head(image.local),
            image.local_mask,
            self.text_local_head(text.words),
            text.word_mask,
            word_weights=None,
            patch_weights=image.attention,  # ViT [CLS] -> patch attention; None (uniform) for CNNs
            tau=self.token_temperature,
        )

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text_batch = require_text(batch, self.config.method)
        image, text = self.image_encoder(batch["image"]), self._text(text_batch)
        if text.words.shape[1] == 0:
            raise ConfigError("mgca needs word indices (token_word) in every batch for its token-level loss")
        image_global = F.normalize(self.image_head(image.global_emb), dim=-1)
        text_global = F.normalize(self.text_head(text.global_emb), dim=-1)
        return {
            "instance": self.contrast(image_global, text_global),
            "token": self.token_loss(image, text),
            "prototype": self.prototype(image_global, text_global),
        }
