"""Objectives: losses over the encoder output contract (ARCHITECTURE.md), independent of the backbones."""

from radalign.objectives.contrastive import InfoNCE, contrastive_targets, gather_rows, info_nce, label_positives

__all__ = ["InfoNCE", "contrastive_targets", "gather_rows", "info_nce", "label_positives"]
