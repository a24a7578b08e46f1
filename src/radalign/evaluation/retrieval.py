"""Image <-> report retrieval: Recall@K with the paired report of each image as the single correct answer."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def recall_at_k(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """(N, D) images and their (N, D) reports, index-aligned -> {"i2t_R@1": ..., "t2i_R@1": ...} in [0, 1]."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            f"need paired embeddings of equal shape, got {image_embeddings.shape} and {text_embeddings.shape}"
        )
    similarity = image_embeddings @ text_embeddings.T
    target = torch.arange(len(similarity))
    result = {}
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        # rank of the true pair = number of candidates scored strictly higher
        true = sim[target, target][:, None]
        rank = (sim > true).sum(dim=1)
        for k in ks:
            result[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return result
