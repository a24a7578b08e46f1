"""What every method is: encoders + heads + objectives, returning named, unweighted losses.

A method never owns a training loop: ``training.module.PretrainModule`` weights its losses with the config's
stage schedule, optimises, logs and checkpoints. Evaluation reads a method only through ``encode_images`` and
``encode_texts`` (L2-normalised global embeddings in the shared space), ``encode_image_locals`` (local ones, for
phrase grounding) and the encoder outputs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from radalign.config import PretrainConfig
from radalign.errors import ConfigError
from radalign.models.ema import EMACopies

TEXT_KEYS = ("input_ids", "attention_mask", "token_sentence", "token_word")


class Method(nn.Module):
    """Base class. Subclasses build their modules in ``__init__`` and implement ``losses``."""

    name: ClassVar[str] = ""
    objective_names: ClassVar[tuple[str, ...]] = ()
    # What :meth:`global_image_features` returns, in words (results.json records it with the linear probe).
    global_feature_name: ClassVar[str] = "the image encoder's global feature (average pool, or [CLS] for a ViT)"
    # Whether ``losses`` takes samples without a report (image-label records, ``batch["has_report"]`` False) and
    # makes their text itself (UMCL: prompts from the labels); the others need a report for every sample.
    label_only_samples: ClassVar[bool] = False

    def __init__(self, config: PretrainConfig, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        super().__init__()
        self.for_inference = for_inference
        self.config = config
        self.tokenizer = tokenizer  # for methods that write texts of their own (prompts, knowledge, swapped reports)
        unknown = sorted(set(config.objectives) - set(self.objective_names))
        if unknown:
            raise ConfigError(
                f"method '{config.method}' has no objective {unknown[0]!r}; "
                f"its objectives: {list(self.objective_names)}"
            )
        self.ema: EMACopies | None = None
        # Objective weights in force, set by the training module before each ``losses`` call (None outside
        # training: compute everything). A method may skip an objective whose weight is 0.
        self.stage_weights: dict[str, float] | None = None
        # The optimiser step being computed, set with ``stage_weights`` (None outside training): the clock of
        # schedules inside a method (MLIP's distillation ramp and knowledge refresh) and of per-step seeds.
        self.step: int | None = None

    def modalities(self) -> set[str]:
        """The image kinds its encoder takes: ``ct`` for a 3D encoder (a name ending in _3d), else ``xray``; a
        method with one trunk for both (UniMedI) returns both."""
        image = self.config.model.image
        three_d = image.name.endswith("_3d") or image.kwargs.get("spatial_dims") == 3
        return {"ct"} if three_d else {"xray"}

    def setup_ema(self) -> None:
        """Call at the end of a subclass ``__init__``: copies the sub-modules named in ``config.ema.modules``."""
        if self.config.ema.modules:
            self.ema = EMACopies(self, self.config.ema.modules, self.config.ema.decay)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Unweighted loss per objective name (scalars); the training module applies the stage weights."""
        raise NotImplementedError

    def objective_on(self, name: str) -> bool:
        """Whether objective ``name`` counts at this step (weight != 0); always True outside training."""
        return self.stage_weights is None or self.stage_weights.get(name, 1.0) != 0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, C, D, H, W) -> (B, embed_dim) L2-normalised."""
        raise NotImplementedError

    def encode_texts(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised text (the batch's ``TEXT_KEYS``) -> (B, embed_dim) L2-normalised."""
        raise NotImplementedError

    def global_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, F) the method's own global image representation, before its projection head: the vector its global
        objective is built on. Linear probes read it (``tasks.linear_probe.features: global``). The default is the
        encoder's pooled output; a method that pools its own way (LoVT's and PRIOR's attention pools) overrides."""
        return self.image_encoder(images).global_emb

    def encode_image_locals(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, C, H, W) -> ((B, N, embed_dim) L2-normalised local embeddings in the shared space, grid_shape);
        phrase grounding compares them with ``encode_texts`` outputs."""
        raise NotImplementedError(
            f"method '{self.config.method}' ({type(self).__name__}) does not define encode_image_locals, so it has "
            "no local embeddings in the shared image-text space; dense text tasks (phrase grounding) need them"
        )

    def local_similarity(self, images: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, ...) images x (P,) tokenised texts -> (B, P) local image-text scores, or None for global-only
        methods. Zero-shot adds ``local_weight`` x this to the global similarity (GLoRIA, PRIOR)."""
        return None

    def tokenize(
        self, texts: list[str], *, sentences: bool = False, purpose: str = "write texts"
    ) -> dict[str, torch.Tensor]:
        """Free texts -> the batch's text tensors (``TEXT_KEYS``) on the model's device, tokenised as training
        tokenises reports (``sentences``: split into sentences first)."""
        from radalign.data.dataset import tokenize_texts

        if self.tokenizer is None:
            raise ConfigError(f"{self.config.method}: needs the tokenizer to {purpose} (set loader.tokenizer)")
        batch = tokenize_texts(self.tokenizer, texts, self.config.loader.max_length, sentences=sentences)
        device = next(self.parameters()).device
        return {k: batch[k].to(device) for k in TEXT_KEYS}

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging besides the losses (e.g. a learnable temperature)."""
        return {}


def require_text(batch: dict[str, Any], method: str) -> dict[str, torch.Tensor]:
    missing = [k for k in TEXT_KEYS if k not in batch]
    if missing:
        raise ConfigError(
            f"{method} needs tokenised reports in every batch but the batch lacks {missing}; set loader.tokenizer "
            "and use a manifest whose records have reports (loader.require_report: true)"
        )
    if "has_report" in batch and not bool(batch["has_report"].all()):
        without = sorted({s for s, has in zip(batch["source"], batch["has_report"].tolist(), strict=True) if not has})
        raise ConfigError(
            f"{method} needs a report for every sample, but source(s) {', '.join(without)} give samples without one "
            "(image-label records); use a method that makes text from labels (umcl), or set require_report: true "
            "on that source to leave them out"
        )
    return {k: batch[k] for k in TEXT_KEYS}
