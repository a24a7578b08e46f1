"""MLIP: divergence encoder and knowledge-guided multi-level contrast (Li et al., CVPR 2024; docs/methods/mlip.md).

No code is public, so every part below is our reading of the paper (docs/methods/mlip.md has the table). MLIP is
MGCA's three levels (encoders, separate global and local heads, the token loss, Sinkhorn prototypes) with
knowledge and a momentum text encoder added. Objectives, returned unweighted:

- ``instance``: InfoNCE(image, report) on the projected globals, as MGCA;
- ``divergent``: InfoNCE(image, divergent report): the divergence encoder, an EMA copy of the text encoder and
  its head (``ema.modules: [text_encoder, text_head]``, decay 0.995), encodes a divergent view of each report (its
  sentences shuffled, 15% of its word pieces masked) without gradient;
- ``consistency``: ALBEF's momentum distillation: the online image-report similarities are trained towards
  alpha x softmax(divergent similarities / tau) + (1 - alpha) x one-hot, alpha 0.4 ramped up from 0 over
  ``ramp_steps``; the image side of the divergent similarities is the online image (detached) or its EMA copy
  when ``ema.modules`` also names ``image_encoder`` and ``image_head``;
- ``token``: report words attend to the knowledge embeddings K (one cross-attention layer, residual); the
  knowledge-enhanced words are aligned with the image patches by MGCA's token loss ([CLS]-attention weights);
- ``prototype``: one prototype per knowledge entry, started at the entry's projected knowledge embedding when the
  objective first counts (its stage), Sinkhorn-Knopp codes and swapped prediction (MGCA's loss); with
  ``assign: labels`` a sample with labelled findings takes them as its code instead;
- ``itm``: image-text matching: for each sample its pair, a hard-negative text and a hard-negative image (drawn
  from softmax over the similarity row with the pair excluded), and a report with one sentence swapped in from
  another report; report words read the image's patches (one cross-attention layer) and a binary head says
  match or not.

K: every knowledge entry's three sentences (definition, signs, locations) encoded by the text encoder in eval
mode without gradient, refreshed every ``knowledge_refresh_every`` optimiser steps and kept in the checkpoint;
projected by the local head for the token level and by the global head for the prototypes. An objective whose
weight is 0 for the whole run builds no modules, and one that is off at a step is not computed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from radalign.config import check_options
from radalign.errors import ConfigError
from radalign.methods import mgca
from radalign.methods.base import require_text
from radalign.methods.builders import build_infonce
from radalign.methods.registry import register
from radalign.models.fusion import KnowledgeAttention, MatchingHead, matching_pairs
from radalign.models.outputs import ImageOutput, TextOutput
from radalign.objectives.contrastive import distributed_world
from radalign.objectives.distillation import hard_negatives, momentum_distillation_loss, ramped_alpha
from radalign.objectives.prototype import PrototypeLoss

MODEL_OPTIONS = {
    **mgca.MODEL_OPTIONS,
    "knowledge": None,  # a knowledge YAML (docs/knowledge.md); None = the shipped one
    "knowledge_extend": False,  # add the file's findings to the shipped ones rather than replace them
    "knowledge_refresh_every": 50,
    "knowledge_attention": True,  # False: the token level aligns the plain words (MGCA's)
    "attention_heads": 4,
    "view_mask_ratio": 0.15,
    "view_shuffle_sentences": True,
}
CONSISTENCY = {"alpha": 0.4, "ramp_steps": 0, "temperature": 0.07}
PROTOTYPE = {"tau": 0.2, "epsilon": 0.05, "iterations": 3, "assign": "sinkhorn"}
ITM = {"swap_negatives": True}
ASSIGNMENTS = ("sinkhorn", "labels")
DIVERGENCE_MODULES = ("text_encoder", "text_head")


@register("mlip")
class MLIP(mgca.MGCA):
    objective_names = ("instance", "divergent", "consistency", "token", "prototype", "itm")
    model_options: ClassVar[dict[str, Any]] = MODEL_OPTIONS

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        self._knowledge_base: Any = None
        super().__init__(config, tokenizer, for_inference=for_inference)
        options, objectives, dim = self.options, config.objectives, config.model.embed_dim
        heads = int(options["attention_heads"])
        self.refresh_every = int(options["knowledge_refresh_every"])
        if self.refresh_every < 1:
            raise ConfigError(f"mlip model.options.knowledge_refresh_every must be >= 1, got {self.refresh_every}")
        self.view_mask_ratio = float(options["view_mask_ratio"])
        self.view_shuffle = bool(options["view_shuffle_sentences"])
        ever = config.objective_ever_on
        self.knowledge_attention = (
            KnowledgeAttention(dim, heads) if options["knowledge_attention"] and ever("token") else None
        )
        self.uses_knowledge = self.knowledge_attention is not None or self.prototype is not None
        texts, owners = self.knowledge_texts() if self.uses_knowledge else ([], [])
        self.knowledge_owner = owners  # knowledge text -> index of its finding (its prototype)
        self._knowledge_tokens: dict[str, Tensor] | None = None
        self.register_buffer("knowledge_features", torch.zeros(len(texts), self.text_encoder.out_dim))
        self.register_buffer("knowledge_step", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("prototypes_ready", torch.tensor(False))
        self.uses_divergence = ever("divergent") or ever("consistency")
        if self.uses_divergence:
            missing = [m for m in DIVERGENCE_MODULES if m not in config.ema.modules]
            if missing:
                raise ConfigError(
                    f"mlip: the divergent and consistency objectives need the divergence encoder, an EMA copy of "
                    f"{' and '.join(DIVERGENCE_MODULES)}; add {missing} to ema.modules (mlip.yaml: ema: {{modules: "
                    "[text_encoder, text_head], decay: 0.995}), or set both objectives' weights to 0"
                )
        self.divergent_contrast = build_infonce(objectives.get("divergent", {"temperature": 0.07}))
        consistency = check_options("mlip objectives.consistency", objectives.get("consistency", {}), CONSISTENCY,
                                    ("weight",))  # fmt: skip
        self.alpha, self.ramp_steps = float(consistency["alpha"]), int(consistency["ramp_steps"])
        self.consistency_temperature = float(consistency["temperature"])
        itm = check_options("mlip objectives.itm", objectives.get("itm", {}), ITM, ("weight",))
        self.swap_negatives = bool(itm["swap_negatives"])
        self.matching = MatchingHead(dim, heads) if ever("itm") else None
        masking = self.uses_divergence and self.view_mask_ratio > 0 and not for_inference
        if masking and getattr(tokenizer, "mask_token_id", None) is None:
            raise ConfigError("mlip: view_mask_ratio > 0 needs a tokenizer with a [MASK] token; set it to 0")

    # -- knowledge --------------------------------------------------------------------------------------------
    @property
    def knowledge(self) -> Any:
        if self._knowledge_base is None:
            from radalign.data.knowledge import KnowledgeBase

            options = self.options
            self._knowledge_base = KnowledgeBase.from_yaml(
                options["knowledge"], extend=bool(options["knowledge_extend"])
            )
        return self._knowledge_base

    def knowledge_texts(self) -> tuple[list[str], list[int]]:
        """Every entry's sentences, and the index of the entry (finding) each belongs to."""
        texts, owners = [], []
        for index, finding in enumerate(self.knowledge.findings):
            for text in self.knowledge[finding].texts():
                texts.append(text)
                owners.append(index)
        return texts, owners

    def build_prototype(self, spec: dict[str, Any]) -> PrototypeLoss | None:
        """One prototype per knowledge entry (their number is the knowledge file's, not a setting)."""
        if not self.config.objective_ever_on("prototype"):
            return None
        if "n_prototypes" in spec:
            raise ConfigError(
                "mlip objectives.prototype: n_prototypes is the number of knowledge entries (one prototype per "
                f"finding, {len(self.knowledge.findings)} in {self.knowledge.source}); remove the key"
            )
        options = check_options("mlip objectives.prototype", spec, PROTOTYPE, ("weight",))
        if options["assign"] not in ASSIGNMENTS:
            raise ConfigError(
                f"mlip objectives.prototype.assign must be one of {', '.join(ASSIGNMENTS)}, got {options['assign']!r}"
            )
        self.assign = str(options["assign"])
        return PrototypeLoss(
            self.config.model.embed_dim,
            n_prototypes=len(self.knowledge.findings),
            tau=float(options["tau"]),
            epsilon=float(options["epsilon"]),
            iterations=int(options["iterations"]),
        )

    def knowledge_embeddings(self) -> Tensor:
        """(M, text_dim) K, recomputed when ``knowledge_refresh_every`` steps old (or never computed)."""
        age = None if self.step is None else self.step - int(self.knowledge_step)
        if int(self.knowledge_step) < 0 or (age is not None and age >= self.refresh_every):
            self.refresh_knowledge()
        return self.knowledge_features

    @torch.no_grad()
    def refresh_knowledge(self) -> None:
        if self._knowledge_tokens is None:  # tokenised once; the encoder that reads them changes
            self._knowledge_tokens = self.tokenize(self.knowledge_texts()[0], purpose="encode its knowledge")
        was_training = self.text_encoder.training
        self.text_encoder.eval()  # K is a description of the findings, not a noisy view of them
        try:
            tokens = {k: v.to(self.knowledge_features.device) for k, v in self._knowledge_tokens.items()}
            features = self.text_encoder(tokens["input_ids"], tokens["attention_mask"]).global_emb
        finally:
            self.text_encoder.train(was_training)
        self.knowledge_features.copy_(features.to(self.knowledge_features.dtype))
        self.knowledge_step.fill_(0 if self.step is None else self.step)

    @torch.no_grad()
    def start_prototypes(self, knowledge: Tensor) -> None:
        """Each finding's prototype = the mean of its normalised, projected knowledge sentences."""
        was_training = self.text_head.training
        self.text_head.eval()
        try:
            projected = F.normalize(self.text_head(knowledge).float(), dim=-1)
        finally:
            self.text_head.train(was_training)
        owners = torch.tensor(self.knowledge_owner, device=projected.device)
        n = self.prototype.prototypes.shape[0]
        sums = torch.zeros(n, projected.shape[1], device=projected.device).index_add_(0, owners, projected)
        self.prototype.set_prototypes_(sums)
        self.prototypes_ready.fill_(True)

    # -- views and pairs --------------------------------------------------------------------------------------
    def generator(self, salt: int) -> torch.Generator:
        """A CPU generator seeded by (run seed, step, rank, salt): deterministic by seed and after a resume."""
        from radalign.data.dataset import mixed_seed

        step = 0 if self.step is None else self.step
        seed = mixed_seed(self.config.trainer.seed, step, distributed_world()[0], salt) % 2**63
        return torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def divergent_texts(self, text: dict[str, Tensor]) -> Tensor:
        """(B, D) normalised divergence-encoder embeddings of a divergent view of each report."""
        from radalign.data.text_views import mask_tokens, shuffle_sentences

        generator = self.generator(salt=1)
        ids = text["input_ids"]
        if self.view_shuffle:
            ids = shuffle_sentences(ids, text["token_sentence"], generator)
        if self.view_mask_ratio > 0:
            ids = mask_tokens(ids, text["token_word"], int(self.tokenizer.mask_token_id), self.view_mask_ratio,
                              generator)  # fmt: skip
        out = self.ema["text_encoder"](ids, text["attention_mask"])
        return F.normalize(self.ema["text_head"](out.global_emb), dim=-1)

    @torch.no_grad()
    def momentum_images(self, images: Tensor, image_global: Tensor) -> Tensor:
        names = self.ema.names if self.ema is not None else []
        if "image_encoder" in names and "image_head" in names:
            return F.normalize(self.ema["image_head"](self.ema["image_encoder"](images).global_emb), dim=-1)
        return image_global.detach()

    def matching_loss(
        self, batch: dict[str, Any], image: ImageOutput, text: TextOutput, patches: Tensor, words: Tensor, sim: Tensor
    ) -> Tensor:
        """Cross-entropy of the matching head over positives, hard negatives and sentence-swapped negatives;
        ``patches`` / ``words``: the batch's projected locals (the token level's, computed once)."""
        b = patches.shape[0]
        generator = self.generator(salt=2)
        texts_for_images, images_for_texts = hard_negatives(sim, generator)
        images, texts, labels = matching_pairs(b, texts_for_images, images_for_texts)
        logits = [self.matching(words[texts], text.word_mask[texts], patches[images], image.local_mask[images])]
        targets = [labels]
        if self.swap_negatives and batch.get("sentences"):
            from radalign.data.text_views import swap_sentences

            swapped, done = swap_sentences(list(batch["sentences"]), generator)
            rows = torch.tensor([i for i, d in enumerate(done) if d], dtype=torch.long, device=patches.device)
            if rows.numel():
                encoded = self.tokenize([swapped[i] for i in rows.tolist()], sentences=True)
                other = self._text(encoded)
                logits.append(self.matching(self.text_local_head(other.words), other.word_mask, patches[rows],
                                            image.local_mask[rows]))  # fmt: skip
                targets.append(torch.zeros(rows.numel(), dtype=torch.long, device=patches.device))
        return F.cross_entropy(torch.cat(logits).float(), torch.cat(targets))

    def label_codes(self, batch: dict[str, Any], like: Tensor) -> Tensor | None:
        """(B, C) fixed prototype assignments from the batch's labels (``assign: labels``): uniform over a
        sample's positive findings, NaN rows for samples with none (they keep Sinkhorn's codes)."""
        if self.assign != "labels" or "labels" not in batch:
            return None
        vocabulary = list(batch.get("vocabulary", ()))
        raw = batch["labels"].float()
        positive = torch.zeros(raw.shape[0], self.prototype.prototypes.shape[0], device=like.device)
        for c, finding in enumerate(self.knowledge.findings):
            if finding in vocabulary:
                positive[:, c] = (raw[:, vocabulary.index(finding)] == 1).float().to(like.device)
        counts = positive.sum(dim=1, keepdim=True)
        return torch.where(counts > 0, positive / counts.clamp_min(1), torch.full_like(positive, float("nan")))

    # -- the loss ---------------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        text_batch = require_text(batch, self.config.method)
        on = self.objective_on
        image = self.image_encoder(batch["image"])
        text = self._text(text_batch, cls_attention=self.word_weighting == "cls_attention")
        if text.words.shape[1] == 0:
            raise ConfigError("mlip needs word indices (token_word) in every batch for its token and matching losses")
        image_global = F.normalize(self.image_head(image.global_emb), dim=-1)
        text_global = F.normalize(self.text_head(text.global_emb), dim=-1)
        losses = {"instance": self.contrast(image_global, text_global)}
        if self.uses_divergence and (on("divergent") or on("consistency")):
            divergent = self.divergent_texts(text_batch)
            if on("divergent"):
                losses["divergent"] = self.divergent_contrast(image_global, divergent)
            if on("consistency"):
                alpha = self.alpha if self.step is None else ramped_alpha(self.alpha, self.step, self.ramp_steps)
                image_m = self.momentum_images(batch["image"], image_global)
                losses["consistency"] = momentum_distillation_loss(
                    image_global, text_global, image_m, divergent, alpha, self.consistency_temperature
                )
        needs_knowledge = (self.knowledge_attention is not None and on("token")) or (
            self.prototype is not None and on("prototype") and not bool(self.prototypes_ready)
        )
        knowledge = self.knowledge_embeddings() if needs_knowledge else None
        patches = self.image_local_head(image.local) if on("token") or self.matching is not None else None
        words = self.text_local_head(text.words) if patches is not None else None
        if on("token"):
            enhanced = words
            if self.knowledge_attention is not None:
                enhanced = self.knowledge_attention(words, self.text_local_head(knowledge))
            losses["token"] = self.token_loss(image, text, enhanced, patches)
        if self.prototype is not None and on("prototype"):
            if not bool(self.prototypes_ready):
                self.start_prototypes(knowledge)
            losses["prototype"] = self.prototype(image_global, text_global, self.label_codes(batch, image_global))
        if self.matching is not None and on("itm"):
            sim = image_global.detach() @ text_global.detach().T
            losses["itm"] = self.matching_loss(batch, image, text, patches, words, sim)
        return losses
