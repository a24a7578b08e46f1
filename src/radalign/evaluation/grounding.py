"""Phrase grounding: does a phrase's similarity map over the image's local embeddings light up where it is?

For each test radiograph and each (finding, phrase) it has, the map is the cosine between the phrase embedding
and every local embedding (``Method.encode_image_locals``), bilinearly upsampled to the image. Metrics
(evaluation spec; BioViL / MS-CXR for CNR): pointing game (the map's maximum falls inside the finding's mask, or
its boxes when there is no mask), contrast-to-noise ratio and IoU of the thresholded map, each as a bootstrap
interval over (image, phrase) pairs, overall and per finding. No training is involved, so there are no seeds.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from radalign.config import TaskSpec, check_params
from radalign.errors import ConfigError
from radalign.evaluation.context import EvalContext, TaskResult
from radalign.evaluation.metrics import Metric, bootstrap

DEFAULTS: dict[str, Any] = {
    "findings": [],  # empty: every protocol finding; those without masks or boxes simply yield no pairs
    "threshold": 0.5,  # on the per-map min-max normalised similarity, for IoU
    "max_overlays": 8,
    "prompt_template": "{finding}.",  # phrase for a region whose regions file gives none
}
METRICS = ("pointing_game", "cnr", "miou")


# -- reusable pieces (web app, other tasks) ----------------------------------------------------------------------
def similarity_map(local: Tensor, grid_shape: Sequence[int], phrase_emb: Tensor, size: int | Sequence[int]) -> Tensor:
    """Cosine between phrase(s) and every local embedding, upsampled bilinearly to ``size`` (int or (H, W)).

    ``local`` (B, N, D) row-major over ``grid_shape`` (h, w); ``phrase_emb`` (D,) or (B, D) -> (B, H, W), or
    (B, P, D) -> (B, P, H, W). Inputs are re-normalised, so unnormalised features still give cosines."""
    if len(grid_shape) != 2:
        raise ValueError(f"similarity_map needs a 2D (h, w) grid, got grid_shape {tuple(grid_shape)}")
    b, n, d = local.shape
    h, w = (int(g) for g in grid_shape)
    if h * w != n:
        raise ValueError(f"grid_shape {(h, w)} has {h * w} cells but local has {n}")
    single = phrase_emb.ndim < 3
    phrases = phrase_emb.reshape(1, 1, d).expand(b, 1, d) if phrase_emb.ndim == 1 else phrase_emb
    phrases = phrases[:, None] if phrases.ndim == 2 else phrases  # (B, P, D)
    cells = torch.einsum("bnd,bpd->bpn", F.normalize(local.float(), dim=-1), F.normalize(phrases.float(), dim=-1))
    out = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    maps = F.interpolate(cells.reshape(b, -1, h, w), size=out, mode="bilinear", align_corners=False)
    return maps[:, 0] if single else maps


def pointing_game(maps: Tensor, targets: Tensor) -> Tensor:
    """(P, H, W) maps, (P, H, W) bool targets -> (P,) 1.0 where the map's maximum lies inside the target."""
    hit = targets.flatten(1).gather(1, maps.flatten(1).argmax(dim=1, keepdim=True))
    return hit[:, 0].float()


def cnr(maps: Tensor, targets: Tensor) -> Tensor:
    """BioViL's contrast-to-noise ratio |mean_in - mean_out| / sqrt(var_in + var_out) per map (population variances).

    Invariant to a positive affine rescaling of a map (so min-max normalising changes nothing); NaN where a
    region is empty or both regions are flat."""
    x, t = maps.flatten(1).double(), targets.flatten(1).double()
    stats = []
    for inside in (t, 1 - t):
        count = inside.sum(dim=1)
        mean = (x * inside).sum(dim=1) / count
        var = (inside * (x - mean[:, None]) ** 2).sum(dim=1) / count
        stats.append((mean, var))
    (m_in, v_in), (m_out, v_out) = stats
    denominator = (v_in + v_out).sqrt()
    value = (m_in - m_out).abs() / denominator
    return torch.where(denominator > 0, value, torch.full_like(value, float("nan"))).float()


def normalise_maps(maps: Tensor) -> Tensor:
    """Per-map min-max to [0, 1]; a flat map becomes all zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def iou_at(maps: Tensor, targets: Tensor, threshold: float = 0.5, normalise: bool = True) -> Tensor:
    """(P,) IoU between ``map >= threshold`` (after per-map min-max when ``normalise``) and the target; NaN if both
    are empty."""
    predicted = (normalise_maps(maps) if normalise else maps) >= threshold
    inter = (predicted & targets).flatten(1).sum(dim=1).float()
    union = (predicted | targets).flatten(1).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def box_masks(boxes: Tensor, size: int) -> Tensor:
    """(M, 4) x0 y0 x1 y1 pixel-edge boxes -> (M, size, size) bool, a pixel inside when its centre is."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    cols = (centres >= x0) & (centres <= x1)  # (M, S)
    rows = (centres >= y0) & (centres <= y1)
    return rows[:, :, None] & cols[:, None, :]


# -- the task ----------------------------------------------------------------------------------------------------
@dataclass
class _Pair:
    image: int  # row in the batch
    finding: int  # vocabulary index
    phrase: str
    source: str  # "report" (the regions file's phrase) or "prompt" (the template)


def _params(ctx: EvalContext, spec: TaskSpec) -> dict[str, Any]:
    p = check_params("grounding", spec.params, DEFAULTS)
    if isinstance(p["findings"], str):
        p["findings"] = [p["findings"]]
    unknown = [f for f in p["findings"] if f not in ctx.vocabulary]
    if unknown:
        raise ConfigError(f"task grounding: finding {unknown[0]!r} is not in the protocol's findings {ctx.vocabulary}")
    if not 0.0 <= float(p["threshold"]) <= 1.0:
        raise ConfigError(f"task grounding: threshold {p['threshold']!r} must be in [0, 1] (maps are min-max scaled)")
    if isinstance(p["max_overlays"], bool) or not isinstance(p["max_overlays"], int) or p["max_overlays"] < 0:
        raise ConfigError(f"task grounding: max_overlays {p['max_overlays']!r} must be a non-negative integer")
    if "{finding}" not in str(p["prompt_template"]):
        raise ConfigError(f"task grounding: prompt_template {p['prompt_template']!r} needs a '{{finding}}' field")
    return p


def _targets(batch: dict[str, Any], size: int) -> Tensor:
    """(B, F, S, S) bool: each finding's mask, or the union of its boxes where the mask is empty."""
    targets = batch["masks"].clone()
    for b, (boxes, labels) in enumerate(zip(batch["boxes"], batch["box_labels"], strict=True)):
        for k in labels.unique().tolist():
            if not targets[b, k].any():
                targets[b, k] = box_masks(boxes[labels == k], size).any(dim=0)
    return targets


def _pairs(batch: dict[str, Any], has_target: Tensor, chosen: set[int], vocabulary: Sequence[str], template: str):
    """The batch's (image, finding, phrase) pairs and how many region phrases had no target to ground in."""
    pairs, orphans = [], 0
    for b, phrases in enumerate(batch["phrases"]):
        seen = set()
        for k, text in phrases:
            if k not in chosen or (k, text) in seen:
                continue
            seen.add((k, text))
            if has_target[b, k]:
                pairs.append(_Pair(b, k, text, "report"))
            else:
                orphans += 1
        for k in sorted(chosen):
            if has_target[b, k] and not any(j == k for j, _ in seen):
                name = vocabulary[k].replace("_", " ")
                text = template.format(finding=name)
                pairs.append(_Pair(b, k, text[:1].upper() + text[1:], "prompt"))
    return pairs, orphans


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


@torch.no_grad()
def run_grounding(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    """Similarity maps of every (test image, phrase) pair -> pointing game, CNR and mIoU with bootstrap intervals."""
    start = time.perf_counter()
    p = _params(ctx, spec)
    dataset = ctx.dense_dataset("test")
    vocabulary = ctx.vocabulary
    chosen = {vocabulary.index(f) for f in p["findings"]} if p["findings"] else set(range(len(vocabulary)))
    size, device = ctx.protocol.image_size, ctx.model.device
    cache: dict[str, Tensor] = {}
    rows: dict[str, list[float]] = {m: [] for m in METRICS}
    finding_of: list[int] = []
    source_of: list[str] = []
    orphans, skipped, grid = 0, [], None
    overlays: dict[int, list[dict[str, Any]]] = {}
    for batch in ctx.loader(dataset):
        skipped += batch["skipped"]
        if not batch["batch_size"]:
            continue
        targets = _targets(batch, size)
        pairs, lost = _pairs(batch, targets.flatten(2).any(dim=2), chosen, vocabulary, p["prompt_template"])
        orphans += lost
        if not pairs:
            continue
        local, grid = ctx.method.encode_image_locals(batch["image"].to(device))
        new = sorted({q.phrase for q in pairs} - set(cache))
        if new:
            cache.update(zip(new, ctx.model.encode_texts(new), strict=True))
        index = torch.tensor([q.image for q in pairs])
        maps = similarity_map(local.float().cpu()[index], grid, torch.stack([cache[q.phrase] for q in pairs]), size)
        truth = targets[index, torch.tensor([q.finding for q in pairs])]  # (P, S, S)
        hits = pointing_game(maps, truth)
        for name, v in zip(METRICS, (hits, cnr(maps, truth), iou_at(maps, truth, float(p["threshold"]))), strict=True):
            rows[name] += v.tolist()
        for i, q in enumerate(pairs):
            finding_of.append(q.finding)
            source_of.append(q.source)
            kept = overlays.setdefault(q.finding, [])
            if len(kept) < p["max_overlays"]:  # a few per finding; the figures take them round-robin
                kept.append(
                    {"image": batch["image"][q.image, 0], "map": maps[i], "target": truth[i], "hit": bool(hits[i]),
                     "id": batch["id"][q.image], "finding": vocabulary[q.finding], "phrase": q.phrase,
                     "source": q.source}
                )  # fmt: skip
    if not finding_of:
        raise ConfigError(
            f"task grounding: no test image has a mask or box for {sorted(vocabulary[k] for k in chosen)}; "
            "grounding needs regions files (the manifest's 'regions' column) on the test split"
        )
    values = {m: np.asarray(v, dtype=float) for m, v in rows.items()}
    findings, origin = np.asarray(finding_of), np.asarray(source_of)
    sources = {src: int((origin == src).sum()) for src in ("report", "prompt")}
    metrics: dict[str, Metric] = {}
    for name, v in values.items():
        metrics[name] = bootstrap(_nanmean, v, resamples=ctx.protocol.bootstrap)
    per_finding: dict[str, dict[str, int]] = {}
    for k in sorted(set(finding_of)):
        keep = findings == k
        for name, v in values.items():
            metrics[f"{name}/{vocabulary[k]}"] = bootstrap(_nanmean, v[keep], resamples=ctx.protocol.bootstrap)
        per_finding[vocabulary[k]] = {"pairs": int(keep.sum()), **{s: int((origin[keep] == s).sum()) for s in sources}}
    figures = _save_overlays(ctx, spec.name, overlays, p["max_overlays"])
    notes = [
        "Maps: cosine(phrase, local embedding), bilinear to the image. CNR on the raw cosine map (BioViL; "
        f"population variances, unchanged by min-max); mIoU thresholds the per-map min-max map at {p['threshold']}."
    ]
    if sources["prompt"]:
        notes.append(f"{sources['prompt']} of {len(finding_of)} pairs had no region phrase and used the prompt "
                     f"template {p['prompt_template']!r}.")  # fmt: skip
    return TaskResult(
        metrics=metrics,
        figures=figures,
        details={
            "pairs": len(finding_of),
            "phrase_sources": sources,  # "report": the regions file's phrase, "prompt": prompt_template
            "per_finding": per_finding,
            "findings": [vocabulary[k] for k in sorted(chosen)],
            "grid_shape": list(grid) if grid is not None else None,
            "threshold": float(p["threshold"]),
            "cnr_map": "raw cosine similarity",
            "iou_map": "per-map min-max normalised",
            "phrases_without_target": orphans,
            "skipped": [list(s) for s in skipped],
        },
        notes=notes,
        seconds=time.perf_counter() - start,
    )


def _save_overlays(ctx: EvalContext, task: str, by_finding: dict[int, list[dict[str, Any]]], limit: int) -> list[str]:
    """One PNG per pair (image, map, target contour, maximum, phrase), findings taken in turn."""
    from matplotlib.figure import Figure

    queues = [list(v) for _, v in sorted(by_finding.items())]
    chosen: list[dict[str, Any]] = []
    while len(chosen) < limit and any(queues):
        chosen += [q.pop(0) for q in queues if q][: limit - len(chosen)]
    figures = []
    for n, item in enumerate(chosen):
        fig = Figure(figsize=(4, 4.6))
        ax = fig.add_subplot()
        ax.imshow(item["image"].numpy(), cmap="gray")
        ax.imshow(item["map"].numpy(), cmap="jet", alpha=0.45)
        ax.contour(item["target"].numpy().astype(float), levels=[0.5], colors="white", linewidths=1.2)
        y, x = np.unravel_index(int(item["map"].argmax()), tuple(item["map"].shape))
        ax.plot([x], [y], marker="x", color="white" if item["hit"] else "red", markersize=9, mew=2)
        title = textwrap.fill(f"{item['phrase']} [{item['source']}]", 44, break_on_hyphens=False)
        ax.set_title(f"{title}\n{item['id']} · {item['finding']}", fontsize=8)
        ax.axis("off")
        fig.tight_layout()
        safe = re.sub(r"[^0-9A-Za-z_.-]+", "_", f"{item['id']}_{item['finding']}")
        path, relative = ctx.figure(task, f"overlay_{n:02d}_{safe}.png")
        fig.savefig(path, dpi=100)
        figures.append(relative)
    return figures
