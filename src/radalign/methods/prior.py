"""PRIOR (Cheng et al., ICCV 2023; docs/methods/prior.md): global contrast, sigmoid cross-attention local alignment,
a sentence prototype bank and cross-modality conditional reconstruction, in three stages (docs/methods/prior.md).

Objectives (unweighted here; the stage schedule in configs/methods/prior.yaml weights and switches them):
``global`` (InfoNCE, learnable tau from 0.01), ``local_image`` (SimSiam between patches and their sentence
context), ``local_text`` (sentence InfoNCE within each report), ``spb`` (L1 of the prototype quantisation),
``image_reconstruction`` (L1, image from dropped-out patches + sentence context), ``prototype_reconstruction``
(L1 of Hungarian-matched generated prototypes, valid slots only), ``prototype_kl`` (codebook assignments of the
generated vs the real sentences) and ``generated_alignment`` (the generated report's global embedding vs the
real one). From the stage that turns ``spb`` on, sentences are replaced by their prototypes everywhere; the
decoders run only while their objectives count (stage 3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.config import check_options
from radalign.errors import ConfigError
from radalign.methods.base import TEXT_KEYS, Method, require_text
from radalign.methods.builders import build_image_encoder, build_infonce, build_text_encoder
from radalign.methods.registry import register
from radalign.models.decoders import ImageDecoder, QueryDecoder
from radalign.models.outputs import locals_to_map
from radalign.models.pooling import AttentionPool
from radalign.objectives.local.prior import (
    TEXT_AVERAGES,
    PriorCrossAttention,
    SimSiamPredictor,
    prior_image_local_loss,
    prior_text_local_loss,
)
from radalign.objectives.prior import (
    SentencePrototypeBank,
    prototype_kl_loss,
    prototype_perplexity,
    prototype_reconstruction_loss,
)

MODEL_OPTIONS = {
    "pool_heads": 8,
    "prototypes": 512,
    "prototype_tau": 0.9,
    "eval_assignment": "softmax",
    "decoder_width": 768,
    "patch_dropout": 0.5,
    "queries": 16,
    "decoder_layers": 8,
    "decoder_heads": 8,
}
LOCAL_TEXT_OPTIONS = {"temperature": 0.01, "learnable_temperature": True, "average": "report"}
DECODER_OBJECTIVES = ("prototype_reconstruction", "prototype_kl", "generated_alignment")


@register("prior")
class PRIOR(Method):
    objective_names = (
        "global",
        "local_image",
        "local_text",
        "spb",
        "image_reconstruction",
        "prototype_reconstruction",
        "prototype_kl",
        "generated_alignment",
    )

    global_feature_name = "PRIOR's attention pool over the image grid (CLIP's AttentionPool2d; it has no other head)"

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        super().__init__(config, tokenizer, for_inference=for_inference)
        model = config.model
        options = check_options("prior model.options", model.options, MODEL_OPTIONS)
        local_text = check_options(
            "prior objectives.local_text", config.objectives.get("local_text", {}), LOCAL_TEXT_OPTIONS, ("weight",)
        )
        for name in self.objective_names:
            if name not in ("global", "local_text"):
                check_options(f"prior objectives.{name}", config.objectives.get(name, {}), {}, ("weight",))
        if config.loader.modality != "xray":
            raise ConfigError("prior: 2D radiographs only (loader.modality: xray); its decoders reconstruct images")
        self.image_encoder = build_image_encoder(model.image, config.loader, for_inference=for_inference)
        self.text_encoder = build_text_encoder(model.text, tokenizer, for_inference=for_inference)
        image_dim, text_dim, embed = self.image_encoder.out_dim, self.text_encoder.out_dim, model.embed_dim
        grid = self._grid(config.loader.image_size)
        heads = int(options["pool_heads"])
        # CLIP's AttentionPool2d over the C-dim grid (positional embedding, mean token), projecting to E.
        self.image_pool = AttentionPool(image_dim, heads=heads, query="mean", out_dim=embed, grid=grid)
        self.patch_head = nn.Linear(image_dim, embed)
        self.token_head = nn.Linear(text_dim, embed)  # sentences = mean of projected tokens = head(mean of tokens)
        self.text_pool = AttentionPool(embed, heads=heads, query="mean")
        self.cross_attention = PriorCrossAttention(embed)
        self.predictor = SimSiamPredictor(embed)
        self.bank = SentencePrototypeBank(
            int(options["prototypes"]), embed, float(options["prototype_tau"]), str(options["eval_assignment"])
        )
        self.contrast = build_infonce(config.objectives.get("global", {"temperature": 0.01}))
        self.text_average = str(local_text["average"])
        if self.text_average not in TEXT_AVERAGES:
            raise ConfigError(
                f"prior objectives.local_text.average must be one of {', '.join(TEXT_AVERAGES)} (report: the "
                f"official mean over each report, then over reports), got {self.text_average!r}"
            )
        tau = float(local_text["temperature"])
        scale = torch.tensor(1.0 / tau).log()
        if local_text["learnable_temperature"]:
            self.local_logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("local_logit_scale", scale)
        self.patch_dropout = nn.Dropout2d(float(options["patch_dropout"]))
        self.image_decoder = ImageDecoder(
            2 * embed, int(options["decoder_width"]), ImageDecoder.upsamplings_for(grid[0], config.loader.image_size)
        )
        self.prototype_decoder = QueryDecoder(
            embed, int(options["queries"]), int(options["decoder_layers"]), int(options["decoder_heads"])
        )
        # Set once training reaches the stage that turns the prototype bank on; saved with the weights, so an
        # exported model encodes text the way it was last trained to (prototypes or raw sentences).
        self.register_buffer("prototypes_active", torch.zeros((), dtype=torch.bool))
        self._perplexity: Tensor | None = None  # last training batch's prototype_perplexity, for metrics()
        self.setup_ema()

    def _grid(self, image_size: int) -> tuple[int, int]:
        with torch.no_grad():
            was = self.image_encoder.training
            self.image_encoder.eval()
            out = self.image_encoder(torch.zeros(1, self.image_encoder.in_chans, image_size, image_size))
            self.image_encoder.train(was)
        if len(out.grid_shape) != 2:
            raise ConfigError(f"prior: needs a 2D feature grid, image encoder gives {out.grid_shape}")
        return int(out.grid_shape[0]), int(out.grid_shape[1])

    # -- encoders --------------------------------------------------------------------------------------------------

    def _images(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
        """-> global (B, E), patches (B, N, E) in row-major grid order, patch mask (B, N), grid (h, w)."""
        out = self.image_encoder(images)
        pooled, _ = self.image_pool(out.local, out.local_mask, out.grid_shape)
        return pooled, self.patch_head(out.local), out.local_mask, tuple(out.grid_shape)

    def _sentences(self, text: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """-> raw sentence embeddings (B, S, E) and mask (B, S): means of the projected tokens of each sentence."""
        token_sentence = text.get("token_sentence")
        if token_sentence is None:  # no sentence indices (a prompt, say): the whole text is one sentence
            token_sentence = torch.where(text["attention_mask"].bool(), 0, -1)
        out = self.text_encoder(text["input_ids"], text["attention_mask"], token_sentence=token_sentence)
        return self.token_head(out.sentences), out.sentence_mask

    def _use_prototypes(self) -> bool:
        if self.stage_weights is None:  # inference, evaluation, direct calls: as far as training got
            return bool(self.prototypes_active)
        on = self.stage_weights.get("spb", 1.0) != 0
        if on and self.training and not self.prototypes_active:
            self.prototypes_active.fill_(True)
        return on

    def _texts(self, text: dict[str, Tensor]) -> dict[str, Tensor | None]:
        raw, mask = self._sentences(text)
        quantised, spb_loss, logits = self.bank(raw, mask) if self._use_prototypes() else (raw, None, None)
        if logits is not None and self.training:
            self._perplexity = prototype_perplexity(logits.detach(), mask)
        pooled, _ = self.text_pool(quantised, mask)
        return {"global": pooled, "sentences": quantised, "mask": mask, "raw": raw, "spb": spb_loss}

    def encode_images(self, images: Tensor) -> Tensor:
        return F.normalize(self._images(images)[0], dim=-1)

    def global_image_features(self, images: Tensor) -> Tensor:
        out = self.image_encoder(images)
        return self.image_pool(out.local, out.local_mask, out.grid_shape)[0]  # (B, E), unnormalised

    def encode_image_locals(self, images: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        _, patches, _, grid = self._images(images)
        return F.normalize(patches, dim=-1), grid

    def encode_texts(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self._texts(text)["global"], dim=-1)

    def local_similarity(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """(B_img, P): PRIOR's local zero-shot score, the mean over patches of the sigmoid attention between each
        patch and the prompt (one sentence: all its tokens, quantised like any sentence)."""
        _, patches, patch_mask, _ = self._images(images)
        text = {k: v for k, v in text.items() if k in TEXT_KEYS and k != "token_sentence"}
        prompts = self._texts(text)
        # every prompt is one "sentence" of a report shared by all images: sigmoid weights are per pair, unnormalised
        sentences = prompts["sentences"][:, 0]
        b = patches.shape[0]
        shared = sentences.unsqueeze(0).expand(b, -1, -1)
        mask = torch.ones(shared.shape[:2], dtype=torch.bool, device=shared.device)
        _, _, weights = self.cross_attention(patches, patch_mask, shared, mask)  # (B, N, P)
        m = patch_mask.to(weights.dtype).unsqueeze(-1)
        return (weights * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    # -- training --------------------------------------------------------------------------------------------------

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"]
        text = require_text(batch, self.config.method)
        image_global, patches, patch_mask, grid = self._images(images)
        t = self._texts(text)
        sentences, sentence_mask = t["sentences"], t["mask"]
        text_context, image_context, _ = self.cross_attention(patches, patch_mask, sentences, sentence_mask)
        # a sample whose report has no sentence has no sentence context: its patches sit the local loss out
        patch_valid = patch_mask & sentence_mask.any(dim=1, keepdim=True)
        zero = patches.sum() * 0.0
        losses = {
            "global": self.contrast(F.normalize(image_global, dim=-1), F.normalize(t["global"], dim=-1)),
            "local_image": prior_image_local_loss(self.predictor, patches, text_context, patch_valid),
            "local_text": prior_text_local_loss(
                image_context, sentences, sentence_mask, self.local_logit_scale, self.text_average
            ),
            "spb": t["spb"] if t["spb"] is not None else zero,
        }
        if self.objective_on("image_reconstruction"):
            losses["image_reconstruction"] = self._image_reconstruction(images, patches, text_context, grid)
        else:
            losses["image_reconstruction"] = zero
        if any(self.objective_on(name) for name in DECODER_OBJECTIVES):
            losses.update(self._prototype_losses(patches, patch_mask, t))
        else:
            losses.update(dict.fromkeys(DECODER_OBJECTIVES, zero))
        return losses

    def reconstruct(self, images: Tensor, text: dict[str, Tensor] | None = None) -> Tensor:
        """The image decoder's output for ``images``, conditioned on ``text``'s sentence context, or on none
        (zeros: "from the image only"); no patch dropout outside training. For figures and tests."""
        _, patches, patch_mask, grid = self._images(images)
        if text is None:
            context = torch.zeros_like(patches)
        else:
            t = self._texts({k: v for k, v in text.items() if k in TEXT_KEYS})
            context, _, _ = self.cross_attention(patches, patch_mask, t["sentences"], t["mask"])
        return self._decode_image(patches, context, grid)

    def _decode_image(self, patches: Tensor, context: Tensor, grid: tuple[int, ...]) -> Tensor:
        as_map, context_map = locals_to_map(patches, grid), locals_to_map(context, grid)
        return self.image_decoder(torch.cat([self.patch_dropout(as_map), context_map], dim=1))

    def _image_reconstruction(self, images: Tensor, patches: Tensor, context: Tensor, grid: tuple[int, ...]) -> Tensor:
        output = self._decode_image(patches, context, grid)
        target = images if images.shape[-2:] == output.shape[-2:] else F.interpolate(images, size=output.shape[-2:])
        return (output.float() - target.float()).abs().mean()

    def _prototype_losses(self, patches: Tensor, patch_mask: Tensor, t: dict[str, Tensor | None]) -> dict[str, Tensor]:
        generated = self.prototype_decoder(patches, patch_mask)  # (B, Q, E), all slots at once
        q = generated.shape[1]
        # targets: the report's (first Q) prototypes; they are what to generate, not something to move
        targets = t["sentences"][:, :q].detach()
        target_mask = t["mask"][:, :q]
        spg, matched, match_mask = prototype_reconstruction_loss(generated, targets, target_mask)
        codebook = self.bank.codebook
        real_logits = t["raw"][:, :q] @ codebook.T.to(generated.dtype)
        kl = prototype_kl_loss(real_logits.detach(), matched @ codebook.T.to(generated.dtype), match_mask)
        quantised, _, _ = self.bank(matched, match_mask)
        generated_global, _ = self.text_pool(quantised, match_mask)
        gpa = self.contrast(F.normalize(generated_global, dim=-1), F.normalize(t["global"], dim=-1))
        return {"prototype_reconstruction": spg, "prototype_kl": kl, "generated_alignment": gpa}

    def metrics(self) -> dict[str, float]:
        out = {"local_temperature": float(1.0 / self.local_logit_scale.detach().exp())}
        if hasattr(self.contrast, "temperature"):
            out["temperature"] = float(self.contrast.temperature.detach())
        if self._perplexity is not None:
            # effective number of prototypes the last batch's sentences use: near 1 means the bank has collapsed
            out["prototype_perplexity"] = float(self._perplexity)
        return out
