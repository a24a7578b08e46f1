"""MGCA: multi-granularity cross-modal alignment (docs/methods/mgca.md; HKU-MedAI/MGCA).

Three objectives, returned unweighted (the stage schedule weighs them: instance 1, token 0.7, prototype 0.5):

- ``instance``: InfoNCE between the projected image and report globals (tau 0.07, ``build_infonce``); the configs
  sum its two directions (``direction_weights: [1, 1]``) as MGCA's ``loss_ita`` does;
- ``token``: :func:`mgca_token_loss` between the projected patches and the projected words (tau 0.1), words
  weighted by the text [CLS] attention (clipped to its 10th-90th percentile by the loss). Patches follow MGCA's
  code per encoder family: for a ViT, weights = its [CLS] attention clipped the same way and the patch -> word
  contexts left unnormalised; for a CNN, uniform weights and normalised contexts (``model.options``
  ``patch_weights``, ``clip_patch_weights``, ``patch_context_norm: auto | true | false``);
- ``prototype``: :class:`PrototypeLoss` (500 prototypes, Sinkhorn-Knopp codes, swapped prediction, tau 0.2) on
  the projected globals, switched on after the warm-up by a stage (its own weight is 0 until then).

As in MGCA's code, globals and locals have their own projection heads (``global_embed`` / ``local_embed``), so the
token loss aligns patches and words in a local space next to the global one.

Word weights (``model.options.word_weights``): ``cls_attention`` (default, as MGCA's code) is the last text layer's
[CLS] -> token attention averaged over heads (``TextOutput.cls_attention``), summed over each word's word pieces
through the data layer's ``token_word`` (so a word's weight is the attention mass on it) and detached, as MGCA
computes them under ``torch.no_grad``; ``uniform`` weighs every word equally.

[design] differences from MGCA (docs/methods/mgca.md has them all):
- word weights: the [CLS] attention is recomputed from the last layer's input before attention dropout (MGCA's
  BLIP-style BERT also returns the pre-dropout probabilities); [CLS], [SEP] and padding belong to no word, so
  [SEP] gets no weight and the [CLS] / [SEP] attention mass is left out (MGCA keeps [SEP] as a word); and each
  word gets the attention on its own pieces (MGCA's ``aggregate_tokens`` pairs the token-i embedding with the
  attention of token i + 1, since it slices [CLS] off the attention but not the embeddings: a shift by one);
- ``encode_image_locals`` returns the local-head patches (the space the token loss trains against words);
  phrase grounding compares them with ``encode_texts`` (the global text head), a space MGCA never ties them to.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from radalign.config import check_options
from radalign.errors import ConfigError
from radalign.methods.base import Method, require_text
from radalign.methods.builders import build_image_encoder, build_infonce, build_text_encoder
from radalign.methods.registry import register
from radalign.models.heads import ProjectionHead
from radalign.models.outputs import ImageOutput, TextOutput
from radalign.models.pooling import segment_sum
from radalign.objectives.local.mgca import mgca_token_loss
from radalign.objectives.prototype import PrototypeLoss

HEAD_OPTIONS = ("head_hidden_dim", "head_norm", "head_output_norm")
MODEL_OPTIONS = {
    "word_weights": "cls_attention",
    "patch_weights": "cls_attention",
    "clip_patch_weights": True,
    "patch_context_norm": "auto",
}
WORD_WEIGHTS = ("cls_attention", "uniform")
PATCH_CONTEXT_NORMS = ("auto", True, False)


@register("mgca")
class MGCA(Method):
    objective_names = ("instance", "token", "prototype")
    model_options: ClassVar[dict[str, Any]] = MODEL_OPTIONS  # a subclass (MLIP) adds its own

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        super().__init__(config, tokenizer, for_inference=for_inference)
        model = config.model
        options = check_options(f"{config.method} model.options", model.options, self.model_options, HEAD_OPTIONS)
        self.options = options
        if options["word_weights"] not in WORD_WEIGHTS:
            raise ConfigError(
                f"mgca model.options.word_weights must be one of {', '.join(WORD_WEIGHTS)}, "
                f"got {options['word_weights']!r}"
            )
        self.word_weighting = str(options["word_weights"])
        if options["patch_weights"] not in WORD_WEIGHTS:
            raise ConfigError(
                f"mgca model.options.patch_weights must be one of {', '.join(WORD_WEIGHTS)}, "
                f"got {options['patch_weights']!r}"
            )
        if options["patch_context_norm"] not in PATCH_CONTEXT_NORMS:
            raise ConfigError(
                "mgca model.options.patch_context_norm must be auto (MGCA's code: raw for ViTs, normalised for "
                f"CNNs), true or false, got {options['patch_context_norm']!r}"
            )
        self.patch_weighting = str(options["patch_weights"])
        self.clip_patch_weights = bool(options["clip_patch_weights"])
        head = {
            "kind": model.projection,
            "hidden_dim": model.options.get("head_hidden_dim"),
            "norm": model.options.get("head_norm"),
            "output_norm": model.options.get("head_output_norm"),
        }
        self.image_encoder = build_image_encoder(model.image, config.loader, for_inference=for_inference)
        self.text_encoder = build_text_encoder(model.text, tokenizer, for_inference=for_inference)
        vit = bool(getattr(self.image_encoder, "is_vision_transformer", False))
        norm = options["patch_context_norm"]
        self.normalize_patch_context = not vit if norm == "auto" else bool(norm)
        image_dim, text_dim = self.image_encoder.out_dim, self.text_encoder.out_dim
        self.image_head = ProjectionHead(image_dim, model.embed_dim, **head)
        self.text_head = ProjectionHead(text_dim, model.embed_dim, **head)
        self.image_local_head = ProjectionHead(image_dim, model.embed_dim, **head)
        self.text_local_head = ProjectionHead(text_dim, model.embed_dim, **head)
        objectives = config.objectives
        self.contrast = build_infonce(objectives.get("instance", {"temperature": 0.07}))
        token = check_options("mgca objectives.token", objectives.get("token", {}), {"temperature": 0.1}, ("weight",))
        self.token_temperature = float(token["temperature"])
        self.prototype = self.build_prototype(dict(objectives.get("prototype", {})))
        self.setup_ema()  # MLIP's divergence encoder copies modules built above

    def build_prototype(self, spec: dict[str, Any]) -> PrototypeLoss:
        proto = {k: v for k, v in spec.items() if k != "weight"}
        try:
            return PrototypeLoss(self.config.model.embed_dim, **proto)
        except TypeError as err:
            raise ConfigError(f"objectives.prototype: {err}") from err

    def _text(self, text: dict[str, torch.Tensor], cls_attention: bool = False) -> TextOutput:
        return self.text_encoder(
            text["input_ids"],
            text["attention_mask"],
            token_sentence=text.get("token_sentence"),
            token_word=text.get("token_word"),
            cls_attention=cls_attention,
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_encoder(images).global_emb), dim=-1)

    def encode_image_locals(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        out = self.image_encoder(images)
        return F.normalize(self.image_local_head(out.local), dim=-1), tuple(out.grid_shape)

    def encode_texts(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_head(self._text(text).global_emb), dim=-1)

    def word_weights(self, text: TextOutput) -> torch.Tensor | None:
        """(B, W) detached [CLS] attention mass on each word (the sum over its tokens); None = uniform."""
        if self.word_weighting == "uniform" or text.cls_attention is None or text.token_word is None:
            return None
        return segment_sum(text.cls_attention.detach(), text.token_word, text.words.shape[1])

    def token_loss(
        self,
        image: ImageOutput,
        text: TextOutput,
        words: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MGCA's token level: words weighted by :meth:`word_weights` (clipped by the loss), patches by the ViT's;
        ``words`` / ``patches``: projected locals already computed (MLIP's knowledge-enhanced words), instead of
        ``text_local_head(text.words)`` / ``image_local_head(image.local)``."""
        return mgca_token_loss(
            self.image_local_head(image.local) if patches is None else patches,
            image.local_mask,
            self.text_local_head(text.words) if words is None else words,
            text.word_mask,
            word_weights=self.word_weights(text),
            # ViT [CLS] -> patch attention; None (uniform) for CNNs
            patch_weights=image.attention if self.patch_weighting == "cls_attention" else None,
            tau=self.token_temperature,
            normalize_patch_context=self.normalize_patch_context,
            clip_patch_weights=self.clip_patch_weights,
        )

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text_batch = require_text(batch, self.config.method)
        want_attention = self.word_weighting == "cls_attention"
        image, text = self.image_encoder(batch["image"]), self._text(text_batch, cls_attention=want_attention)
        if text.words.shape[1] == 0:
            raise ConfigError("mgca needs word indices (token_word) in every batch for its token-level loss")
        image_global = F.normalize(self.image_head(image.global_emb), dim=-1)
        text_global = F.normalize(self.text_head(text.global_emb), dim=-1)
        return {
            "instance": self.contrast(image_global, text_global),
            "token": self.token_loss(image, text),
            "prototype": self.prototype(image_global, text_global),
        }
