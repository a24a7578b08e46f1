"""Embed a dataset split with a frozen model: image and report embeddings with the labels, in one pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from radalign.data.dataset import Collate, RadDataset
from radalign.methods.base import TEXT_KEYS


@dataclass
class Embedded:
    images: torch.Tensor  # (N, D) L2-normalised
    texts: torch.Tensor | None  # (N, D) the paired reports, when the dataset has them
    labels: np.ndarray  # (N, F) 1 / 0 / -1 / NaN
    vocabulary: tuple[str, ...]
    ids: list[str]


@torch.no_grad()
def embed_dataset(
    method: torch.nn.Module, dataset: RadDataset, batch_size: int = 64, pad_token_id: int = 0
) -> Embedded:
    """Run ``method.encode_images`` / ``encode_texts`` over every readable item of ``dataset`` (eval mode)."""
    was_training = method.training
    method.eval()
    device = next(method.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=Collate(pad_token_id))
    images, texts, labels, ids = [], [], [], []
    for batch in loader:
        if not batch["batch_size"]:
            continue
        images.append(method.encode_images(batch["image"].to(device)).float().cpu())
        if all(k in batch for k in TEXT_KEYS):
            texts.append(method.encode_texts({k: batch[k].to(device) for k in TEXT_KEYS}).float().cpu())
        labels.append(batch["labels"].numpy())
        ids += batch["id"]
    method.train(was_training)
    return Embedded(
        images=torch.cat(images),
        texts=torch.cat(texts) if len(texts) == len(images) else None,
        labels=np.concatenate(labels),
        vocabulary=tuple(dataset.vocabulary),
        ids=ids,
    )
