"""Detection on the frozen pre-trained image encoder: torchvision's RetinaNet or Faster R-CNN on an FPN over the
encoder's last three pyramid levels (a ResNet's conv3-conv5, as MGCA and LoVT use; a ViT's single map).

Params (defaults in ``DEFAULTS``): ``findings`` (default: every finding with a box in train), ``detector``
("retinanet" or "fasterrcnn"), ``epochs``, ``lr``, ``batch_size`` (AdamW), ``freeze_encoder``, ``patience``
(early stopping on the val loss, the detector's own training losses), ``iou_thresholds`` (mAP), ``froc_fps``
(false positives per image where fROC reads the sensitivity), ``froc_hit`` (fROC's matching rule, see
:func:`match_detections`).

Metrics (mean +- std over seeds): ``map`` = mAP averaged over ``iou_thresholds`` (torchmetrics' COCO-style
``MeanAveragePrecision``) and ``map/{finding}``; ``froc`` = the mean sensitivity over ``froc_fps`` (the
Object-CXR / LUNA16 score), macro-averaged over findings, with ``froc/{finding}`` and ``sens@{fp}fp``.
Anchors are small (the level's stride x 2^(0, 1/3, 2/3), ratios 1:2, 1:1, 2:1) since lesions on 64-256 px
radiographs span a few to a few tens of pixels; images enter unresized and unnormalised (already normalised).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.evaluation.dense import (
    EncoderPyramid,
    batch_norms_eval,
    fit,
    load_split,
    select_findings,
    shuffled,
)
from radalign.evaluation.metrics import over_seeds
from radalign.utils.plotting import legend_title_save, pyplot, save

DEFAULTS: dict[str, Any] = {
    "findings": None,
    "detector": "retinanet",
    "epochs": 50,
    "lr": 1e-4,
    "batch_size": 8,
    "freeze_encoder": True,
    "patience": 10,
    "iou_thresholds": [round(0.4 + 0.05 * i, 2) for i in range(8)],  # 0.4:0.05:0.75
    "froc_fps": [0.125, 0.25, 0.5, 1, 2, 4, 8],
    "froc_hit": "iou",
}
DETECTORS = ("retinanet", "fasterrcnn")
FPN_CHANNELS = 128  # half torchvision's 256: the heads dominate CPU time and small images need no more
SCORE_THRESHOLD = 0.01  # low, so fROC can reach its highest false-positive rates


# -- the model ---------------------------------------------------------------------------------------------------
class PyramidFPN(nn.Module):
    """A torchvision detection backbone: the encoder pyramid's last ``levels`` maps through a feature pyramid
    network, plus P6/P7 (RetinaNet) or a max-pooled level (Faster R-CNN); ``strides`` of every output."""

    def __init__(self, pyramid: EncoderPyramid, extra: str, levels: int = 3) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        self.pyramid = pyramid
        self.levels = list(range(len(pyramid.strides)))[-levels:]
        in_channels = [pyramid.channels[i] for i in self.levels]
        blocks = LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS) if extra == "p6p7" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(in_channels, FPN_CHANNELS, extra_blocks=blocks)
        self.out_channels = FPN_CHANNELS
        top = [pyramid.strides[i] for i in self.levels]
        self.strides = top + ([top[-1] * 2, top[-1] * 4] if extra == "p6p7" else [top[-1] * 2])
        self.names = [str(i) for i in range(len(self.levels))]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.pyramid(images)
        return self.fpn(OrderedDict((name, maps[i]) for name, i in zip(self.names, self.levels, strict=True)))


def build_detector(encoder: nn.Module, detector: str, n_classes: int, size: int, *, freeze: bool = True) -> nn.Module:
    """A torchvision RetinaNet / Faster R-CNN on the encoder; Faster R-CNN's labels are shifted by one (0 is its
    background), which :func:`to_targets` and :func:`predict` handle."""
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if detector not in DETECTORS:
        raise ConfigError(f"detection: unknown detector {detector!r}; use one of {', '.join(DETECTORS)}")
    backbone = PyramidFPN(EncoderPyramid(encoder, freeze=freeze), "p6p7" if detector == "retinanet" else "pool")
    anchors = AnchorGenerator(
        tuple(tuple(s * 2 ** (i / 3) for i in range(3)) for s in backbone.strides),
        ((0.5, 1.0, 2.0),) * len(backbone.strides),
    )
    # one fixed size: the transform neither resizes (scale 1) nor renormalises (mean 0, std 1) the grey images
    common = {"min_size": size, "max_size": size, "image_mean": [0.0], "image_std": [1.0]}
    if detector == "retinanet":
        return RetinaNet(backbone, n_classes, anchor_generator=anchors, score_thresh=SCORE_THRESHOLD,
                         detections_per_img=100, **common)  # fmt: skip
    pool = MultiScaleRoIAlign(backbone.names, output_size=7, sampling_ratio=2)
    model = FasterRCNN(backbone, n_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=pool,
                       box_score_thresh=SCORE_THRESHOLD, box_detections_per_img=100, **common)  # fmt: skip
    model.label_offset = 1
    return model


def to_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor], index: dict[int, int], size: int, offset: int = 0):
    """Per image {"boxes", "labels"} of the selected findings (vocabulary index -> class via ``index``), clipped to
    the image and at least 1 px wide and high (torchvision rejects empty boxes)."""
    targets = []
    for b, lab in zip(boxes, labels, strict=True):
        keep = torch.tensor([int(v) in index for v in lab], dtype=torch.bool)
        b = b[keep].clamp(0, size)
        b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 1)
        classes = torch.tensor([index[int(v)] for v in lab[keep]], dtype=torch.long)
        targets.append({"boxes": b.reshape(-1, 4), "labels": classes + offset})
    return targets


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, device: torch.device, batch_size: int) -> list[dict[str, Tensor]]:
    """Detections per image on CPU: {"boxes" (D, 4), "scores" (D,), "labels" (D,) finding classes}."""
    model.eval()
    offset = getattr(model, "label_offset", 0)
    out = []
    for start in range(0, len(images), batch_size):
        for d in model(list(images[start : start + batch_size].to(device))):
            out.append({"boxes": d["boxes"].cpu(), "scores": d["scores"].cpu(), "labels": d["labels"].cpu() - offset})
    return out


# -- metrics -----------------------------------------------------------------------------------------------------
def mean_average_precision(preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]],
                           iou_thresholds: Sequence[float], n_classes: int) -> tuple[float, list[float]]:  # fmt: skip
    """(mAP over the IoU thresholds and the classes with ground truth, per-class AP with NaN where a class has no
    ground truth), from torchmetrics' COCO-style ``MeanAveragePrecision``."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_thresholds=[float(t) for t in iou_thresholds], class_metrics=True)
    metric.update(list(preds), list(targets))
    out = metric.compute()
    per_class = [float("nan")] * n_classes
    for c, ap in zip(out["classes"].reshape(-1).tolist(), out["map_per_class"].reshape(-1).tolist(), strict=True):
        if 0 <= c < n_classes and ap >= 0:  # torchmetrics writes -1 for "undefined"
            per_class[c] = ap
    value = float(out["map"])
    return (value if value >= 0 else float("nan")), per_class


def match_detections(boxes: Tensor, gt: Tensor, hit: str = "iou", iou_threshold: float = 0.5) -> Tensor:
    """Status of an image's detections, sorted by descending score: 1 true positive, 0 false positive, -1 ignored.

    A detection *hits* a ground-truth box when their IoU >= ``iou_threshold`` (``hit="iou"``) or when its centre
    lies inside the box (``hit="center"``, Object-CXR's rule for point predictions). In score order, a detection
    that hits a box not yet detected is a true positive and claims the hit box it overlaps most; one that hits
    only already-detected boxes is a duplicate and ignored (as in LUNA16 / Object-CXR / CAMELYON16); one that
    hits nothing is a false positive.
    """
    from torchvision.ops import box_iou

    if hit not in ("iou", "center"):
        raise ConfigError(f"detection: unknown froc_hit {hit!r}; use 'iou' or 'center'")
    if not len(gt):
        return torch.zeros(len(boxes), dtype=torch.long)
    overlap = box_iou(boxes, gt)  # (D, G)
    if hit == "iou":
        hits = overlap >= iou_threshold
    else:
        cx, cy = ((boxes[:, 0] + boxes[:, 2]) / 2)[:, None], ((boxes[:, 1] + boxes[:, 3]) / 2)[:, None]
        hits = (cx >= gt[:, 0]) & (cx <= gt[:, 2]) & (cy >= gt[:, 1]) & (cy <= gt[:, 3])
    status = torch.where(hits.any(1), -1, 0)
    detected = torch.zeros(len(gt), dtype=torch.bool)
    for d in hits.any(1).nonzero().flatten().tolist():  # only detections that hit something need the greedy pass
        free = hits[d] & ~detected
        if free.any():
            detected[torch.where(free, overlap[d], -1.0).argmax()] = True
            status[d] = 1
    return status


def froc_curve(preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]], label: int,
               hit: str = "iou", iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One class's fROC: (false positives per image, sensitivity) at every score threshold, from (0, 0) on.
    Detections are matched per image by :func:`match_detections`; NaN sensitivity when the class has no box."""
    scores, status, n_gt = [], [], 0
    for pred, target in zip(preds, targets, strict=True):
        mine = pred["labels"] == label
        order = pred["scores"][mine].argsort(descending=True, stable=True)
        gt = target["boxes"][target["labels"] == label]
        n_gt += len(gt)
        scores.append(pred["scores"][mine][order])
        status.append(match_detections(pred["boxes"][mine][order], gt, hit, iou_threshold))
    s, st = torch.cat(scores).numpy(), torch.cat(status).numpy()
    order = np.argsort(-s, kind="stable")
    s, st = s[order], st[order]
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, dtype=bool)  # one point per distinct score
    fpi = np.r_[0.0, np.cumsum(st == 0)[last] / max(len(preds), 1)]
    sens = np.r_[0.0, np.cumsum(st == 1)[last] / n_gt] if n_gt else np.full(len(fpi), np.nan)
    return fpi, sens


def sensitivity_at(fpi: np.ndarray, sens: np.ndarray, fps: Sequence[float]) -> np.ndarray:
    """The best sensitivity reached without exceeding each false-positive rate (a step curve, no interpolation)."""
    return np.array([sens[fpi <= f].max() for f in fps])


# -- the task ----------------------------------------------------------------------------------------------------
def run_detection(ctx: Any, spec: Any) -> Any:
    """Train a detector per seed on train (early stopping on val), report mAP and fROC on test."""
    from radalign.config import check_params
    from radalign.evaluation.context import TaskResult
    from radalign.utils.logging import get_logger

    start = time.perf_counter()
    p = check_params("detection", spec.params, DEFAULTS)
    if p["detector"] not in DETECTORS:
        raise ConfigError(f"detection: unknown detector {p['detector']!r}; use one of {', '.join(DETECTORS)}")
    if p["froc_hit"] not in ("iou", "center"):
        raise ConfigError(f"detection: unknown froc_hit {p['froc_hit']!r}; use 'iou' or 'center'")
    splits = {role: load_split(ctx, role, masks=False) for role in ("train", "val", "test")}
    in_train = {int(v) for labels in splits["train"].box_labels for v in labels}
    present = [f for k, f in enumerate(ctx.vocabulary) if k in in_train]
    findings = select_findings("detection", p["findings"], ctx.vocabulary, present)
    index = {ctx.vocabulary.index(f): c for c, f in enumerate(findings)}
    size, device, bs = ctx.protocol.image_size, ctx.device, p["batch_size"]
    truth = to_targets(splits["test"].boxes, splits["test"].box_labels, index, size)
    log = get_logger("detection")
    values: dict[str, list[float]] = {}
    details: dict[str, Any] = {"findings": findings, "n": {r: len(s) for r, s in splits.items()}, "runs": []}
    first: dict[str, Any] = {}
    for seed in ctx.protocol.seeds:
        torch.manual_seed(seed)
        model = build_detector(ctx.method.image_encoder, p["detector"], len(findings), size,
                               freeze=bool(p["freeze_encoder"])).to(device)  # fmt: skip
        offset = getattr(model, "label_offset", 0)
        targets = {r: to_targets(s.boxes, s.box_labels, index, size, offset) for r, s in splits.items()}

        def loss(idx: Tensor, model: nn.Module = model, targets: dict = targets, role: str = "train") -> Tensor:
            images = list(splits[role].images[idx].to(device))
            batch = [{k: v.to(device) for k, v in targets[role][i].items()} for i in idx.tolist()]
            return sum(model(images, batch).values())

        @torch.no_grad()
        def val_loss(model: nn.Module = model, loss: Any = loss) -> float:
            model.train()  # torchvision detectors give losses only in train mode: keep batch norms still
            batch_norms_eval(model)
            idx = torch.arange(len(splits["val"])).split(bs)
            return sum(float(loss(i, role="val")) * len(i) for i in idx) / len(splits["val"])

        result = fit(
            model, lambda epoch, seed=seed: shuffled(len(splits["train"]), bs, (seed, epoch)), loss,
            val_loss if len(splits["val"]) else None, epochs=p["epochs"], lr=p["lr"], patience=p["patience"],
        )  # fmt: skip
        preds = predict(model, splits["test"].images, device, bs)
        run, curves = _scores(preds, truth, findings, p)
        for key, value in run.items():
            values.setdefault(key, []).append(value)
        details["runs"].append({"seed": seed, "best_epoch": result.best_epoch, "val_losses": result.val_losses, **run})
        first = first or {"preds": preds, "curves": curves}
        if ctx.progress:
            log.info(f"seed {seed}: mAP {run['map']:.3f}, fROC {run['froc']:.3f} (epoch {result.best_epoch} kept)")
    metrics = {key: over_seeds(v) for key, v in values.items()}
    figures = [
        _boxes_figure(ctx, spec.name, splits["test"].images, truth, first["preds"], findings),
        _froc_figure(ctx, spec.name, first["curves"], p["froc_fps"]),
    ]
    rule = "has IoU >= 0.5 with" if p["froc_hit"] == "iou" else "has its centre inside"
    notes = [f"fROC: a detection is a hit when it {rule} a true box; repeated hits on a found box are ignored"]
    return TaskResult(metrics, figures=figures, details=details, notes=notes, seconds=time.perf_counter() - start)


def _scores(preds: list, truth: list, findings: list[str], p: dict[str, Any]) -> tuple[dict[str, float], dict]:
    """One run's metrics and its per-finding fROC curves."""
    mean_ap, per_class = mean_average_precision(preds, truth, p["iou_thresholds"], len(findings))
    curves = {f: froc_curve(preds, truth, c, p["froc_hit"]) for c, f in enumerate(findings)}
    at = {f: sensitivity_at(*curve, p["froc_fps"]) for f, curve in curves.items()}
    defined = [a for a in at.values() if not np.isnan(a).all()]
    mean_at = np.mean(defined, axis=0) if defined else np.full(len(p["froc_fps"]), np.nan)
    run = {"map": mean_ap, "froc": float(np.mean(mean_at))}
    run |= {f"map/{f}": per_class[c] for c, f in enumerate(findings)}
    run |= {f"froc/{f}": float(np.mean(a)) for f, a in at.items()}
    run |= {f"sens@{fp:g}fp": float(v) for fp, v in zip(p["froc_fps"], mean_at, strict=True)}
    return run, curves


def _boxes_figure(ctx: Any, task: str, images: Tensor, truth: list, preds: list, findings: list[str]) -> str:
    """Up to four test images (most boxes first): true boxes solid, the top three detections dashed with scores."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    path, relative = ctx.figure(task, "boxes.png")
    shown = sorted(range(len(truth)), key=lambda i: -len(truth[i]["boxes"]))[:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.9), dpi=110, squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, i in zip(axes[0], shown, strict=True):
        ax.imshow(images[i, 0].numpy(), cmap="gray")
        for (x0, y0, x1, y1), c in zip(truth[i]["boxes"].tolist(), truth[i]["labels"].tolist(), strict=True):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colors(c % 10), lw=1.2))
        top = preds[i]["scores"].argsort(descending=True)[:3].tolist()
        for d in top:
            (x0, y0, x1, y1), c = preds[i]["boxes"][d].tolist(), int(preds[i]["labels"][d])
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colors(c % 10), lw=1.0, ls="--"))
            ax.text(x0, y0 - 1, f"{float(preds[i]['scores'][d]):.2f}", color=colors(c % 10), fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    legend_title_save(fig, path, findings, colors, "true boxes (solid) vs top-3 detections (dashed)", 0.08)
    return relative


def _froc_figure(ctx: Any, task: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], fps: Sequence[float]) -> str:
    """Sensitivity against false positives per image (log scale) per finding, the fROC read-out points marked."""
    plt = pyplot()
    path, relative = ctx.figure(task, "froc.png")
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    for finding, (fpi, sens) in curves.items():
        if np.isnan(sens).all():
            continue
        grid = np.asarray(fps, dtype=float)
        line = ax.step(np.maximum(fpi, grid[0] / 2), sens, where="post", lw=1.2, label=finding)[0]
        ax.plot(grid, sensitivity_at(fpi, sens, grid), "o", ms=3, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(fps) / 2, max(fps) * 1.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity")
    ax.set_title("fROC (first seed)")
    ax.legend(fontsize=7, loc="lower right")
    save(fig, path)
    return relative
