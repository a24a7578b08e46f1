"""Image <-> report retrieval.

- Recall@K (image -> text and text -> image): each held-out image's own report is the single correct answer
  among all held-out reports (and vice versa); bootstrap intervals over queries.
- Precision@K against class-representative texts (the CheXpert 5x200 protocol): the candidates are training
  reports with exactly one of the classes; an image with exactly one class scores the share of its top K
  candidates that have its class.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from radalign.evaluation.metrics import bootstrap

DEFAULTS: dict[str, Any] = {"ks": [1, 5, 10], "precision_ks": [1, 5, 10], "per_class": 20, "classes": [], "examples": 4}


def ranks(similarity: torch.Tensor) -> torch.Tensor:
    """(N, N) query x candidate similarities, true pair on the diagonal -> (N,) rank of the true pair (0 = top)."""
    true = similarity.diagonal()[:, None]
    return (similarity > true).sum(dim=1)


def recall_at_k(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """(N, D) images and their (N, D) reports, index-aligned -> {"i2t_R@1": ..., "t2i_R@1": ...} in [0, 1]."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            f"need paired embeddings of equal shape, got {image_embeddings.shape} and {text_embeddings.shape}"
        )
    similarity = image_embeddings @ text_embeddings.T
    result = {}
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        rank = ranks(sim)
        for k in ks:
            result[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return result


def precision_at_k(
    similarity: torch.Tensor, query_class: np.ndarray, candidate_class: np.ndarray, k: int
) -> np.ndarray:
    """(Q, C) similarities -> (Q,) share of each query's top-k candidates that have the query's class."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices.numpy()
    return (candidate_class[top] == query_class[:, None]).mean(axis=1)


def _single_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with exactly one positive column, and that column."""
    keep = (labels == 1).sum(axis=1) == 1
    return keep, np.argmax(labels == 1, axis=1)


def run_retrieval(ctx: Any, spec: Any) -> Any:
    """Recall@K both ways on the test pairs, Precision@K against class-representative training reports."""
    from radalign.config import check_params
    from radalign.errors import DataError
    from radalign.evaluation.context import TaskResult

    start = time.perf_counter()
    params = check_params("retrieval", spec.params, DEFAULTS)
    test = ctx.embedded("test", text=True)
    if test.texts is None:
        raise DataError("retrieval needs reports: the test split has images without report text")
    similarity = test.images @ test.texts.T
    metrics = {}
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        rank = ranks(sim).numpy()
        for k in params["ks"]:
            hits = (rank < k).astype(float)
            metrics[f"{direction}_R@{k}"] = bootstrap(np.mean, hits, resamples=ctx.protocol.bootstrap)
    notes = [f"{len(rank)} test pairs: chance Recall@K = K / {len(rank)}"]

    classes = [c for c in (params["classes"] or ctx.vocabulary) if c in test.vocabulary]
    columns = [test.vocabulary.index(c) for c in classes]
    train = ctx.embedded("train", text=True)
    keep_q, query_class = _single_class(test.labels[:, columns])
    keep_c, candidate_class = _single_class(train.labels[:, columns]) if train.texts is not None else (None, None)
    if keep_c is not None and keep_q.any() and keep_c.any():
        chosen = _representatives(keep_c, candidate_class, len(classes), params["per_class"])
        sim = test.images[torch.from_numpy(keep_q)] @ train.texts[torch.from_numpy(chosen)].T
        for k in params["precision_ks"]:
            values = precision_at_k(sim, query_class[keep_q], candidate_class[chosen], k)
            metrics[f"P@{k}"] = bootstrap(np.mean, values, resamples=ctx.protocol.bootstrap)
        notes.append(
            f"Precision@K: {int(keep_q.sum())} single-class test images against {len(chosen)} single-class training "
            f"reports ({params['per_class']} per class at most)"
        )
    else:
        notes.append("Precision@K skipped: no single-class images or reports for the chosen classes")
    figures = [_examples_figure(ctx, spec.name, similarity, test.ids, params["examples"])]
    return TaskResult(metrics, figures=figures, notes=notes, seconds=time.perf_counter() - start)


def _representatives(keep: np.ndarray, classes: np.ndarray, n_classes: int, per_class: int) -> np.ndarray:
    """Indices of up to ``per_class`` single-class rows per class, in manifest order (deterministic)."""
    chosen = []
    for c in range(n_classes):
        chosen += list(np.flatnonzero(keep & (classes == c))[:per_class])
    return np.asarray(sorted(chosen), dtype=int)


def _examples_figure(ctx: Any, task: str, similarity: torch.Tensor, ids: list[str], n: int) -> str:
    """A few test images with their top-3 retrieved reports; the true report is marked."""
    from radalign.utils.plotting import pyplot, save

    plt = pyplot()

    from radalign.data.transforms import IMAGE_MEAN, IMAGE_STD

    dataset = ctx.dataset("test", text=False)
    by_id = {r.id: i for i, r in enumerate(dataset.records)}
    reports = {r.id: r.report or "" for r in dataset.records}
    path, relative = ctx.figure(task, "examples.png")
    n = min(n, len(ids))
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.6 * n), dpi=100, gridspec_kw={"width_ratios": [1, 2.6]}, squeeze=False)
    for row in range(n):
        item = dataset[by_id[ids[row]]]
        image = item["image"] if isinstance(item, dict) else torch.zeros(1, 8, 8)
        if image.ndim == 4:  # a volume: show its middle slice
            image = image[:, image.shape[1] // 2]
        axes[row, 0].imshow((image[0] * IMAGE_STD + IMAGE_MEAN).clamp(0, 1).numpy(), cmap="gray")
        axes[row, 0].set_axis_off()
        top = similarity[row].topk(min(3, similarity.shape[1])).indices.tolist()
        lines = []
        for rank, j in enumerate(top, 1):
            mark = "✓" if j == row else " "
            text = textwrap.shorten(reports.get(ids[j], ""), 150)
            lines.append(f"{rank}. [{mark}] " + "\n     ".join(textwrap.wrap(text, 70)))
        axes[row, 1].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7)
        axes[row, 1].set_axis_off()
    fig.suptitle("image -> report retrieval: top 3 (✓ = the image's own report)", fontsize=9)
    save(fig, path)
    return relative
