"""Encoders, pooling and heads that fill the encoder output contract (ARCHITECTURE.md)."""

from radalign.models.heads import ProjectionHead
from radalign.models.image import TimmImageEncoder, Volume3DEncoder, build_image_encoder
from radalign.models.outputs import ImageOutput, TextOutput
from radalign.models.pooling import AttentionPool, segment_mean
from radalign.models.text import HFTextEncoder, build_text_encoder, tiny_bert

__all__ = [
    "AttentionPool",
    "HFTextEncoder",
    "ImageOutput",
    "ProjectionHead",
    "TextOutput",
    "TimmImageEncoder",
    "Volume3DEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "segment_mean",
    "tiny_bert",
]
