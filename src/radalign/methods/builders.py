"""Config -> modules, shared by every method (so all methods read ``model.*`` and ``objectives.*`` alike)."""

from __future__ import annotations

from typing import Any

from torch import nn

from radalign.config import DataConfig, ImageEncoderConfig, TextEncoderConfig
from radalign.errors import ConfigError


def build_image_encoder(config: ImageEncoderConfig, loader: DataConfig, *, for_inference: bool = False) -> nn.Module:
    """The configured image encoder; a ViT gets the loader's image size, inference skips pretrained weights."""
    from radalign.models.image import build_image_encoder as build

    spec: dict[str, Any] = {"name": config.name, "pretrained": None if for_inference else config.pretrained}
    kwargs = dict(config.kwargs)
    if config.name.startswith(("vit", "deit", "eva")) and "img_size" not in kwargs and loader.modality == "xray":
        kwargs["image_size"] = loader.image_size
    spec["kwargs"] = kwargs
    return build(spec)


def build_text_encoder(config: TextEncoderConfig, tokenizer: Any, *, for_inference: bool = False) -> nn.Module:
    from radalign.models.text import build_text_encoder as build

    vocab_size = len(tokenizer) if tokenizer is not None else None
    # an export's weights replace the pretrained ones: loading it must not go to the network for them
    return build(config, vocab_size=vocab_size, local_only=for_inference)


def build_infonce(spec: dict[str, Any]) -> nn.Module:
    """The global InfoNCE from an ``objectives.<name>`` entry (``weight`` is the schedule's, not the loss's)."""
    from radalign.objectives.contrastive import InfoNCE

    options = {k: v for k, v in spec.items() if k != "weight"}
    if "max_logit_scale" in options:  # CLIP's wording: a logit scale clamped at 100 is tau >= 0.01
        options["temperature_range"] = (1.0 / float(options.pop("max_logit_scale")), 1.0)
    for key in ("direction_weights", "temperature_range"):
        if key in options:
            options[key] = tuple(options[key])
    try:
        return InfoNCE(**options)
    except TypeError as err:
        raise ConfigError(f"objectives.global: {err}") from err
