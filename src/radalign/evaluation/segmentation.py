"""Segmentation on the frozen pre-trained image encoder: one binary mask (a logit map) per finding.

Params (defaults in ``DEFAULTS``): ``heads`` — "linear" (LoVT's linear segmentation: 1x1 conv on the last feature
map + bilinear upsampling) and/or "unet" (MONAI's U-Net decoder, the segmentation_models_pytorch design MGCA uses,
on the encoder's feature pyramid); ``findings`` (default: every finding with a mask in train); ``epochs``, ``lr``,
``weight_decay``, ``batch_size`` (AdamW); ``loss`` — "mgca" (10 x focal - log(soft Dice)) or "dice" (1 - soft Dice,
LoVT); ``freeze_encoder``; ``patience`` (early stopping on the val loss; the best epoch is tested); ``decoder_width``
(U-Net channels of the coarsest block, halved per block; 256 = smp).

Dice and empty masks. Per test image and finding, with the prediction = sigmoid > 0.5:
- the finding is present: Dice = 2|P ∩ G| / (|P| + |G|);
- it is absent: Dice is undefined (0/0) and left out; the prediction is instead scored as "empty correct" = 1 when
  nothing is predicted, else 0.
``{head}/dice/{finding}`` is the mean Dice over test images with the finding present, ``{head}/dice`` its mean over
findings, ``{head}/empty_correct`` the rate over all (image, finding) pairs with an empty ground truth. Each is the
mean +- std over the protocol's seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.evaluation.dense import (
    CACHE_BUDGET_BYTES,
    DenseSplit,
    EncoderPyramid,
    encode_all,
    fit,
    load_split,
    pyramid_bytes,
    select_findings,
    shuffled,
)
from radalign.evaluation.metrics import over_seeds
from radalign.utils.plotting import legend_title_save, pyplot

DEFAULTS: dict[str, Any] = {
    "heads": ["linear", "unet"],
    "findings": None,
    "epochs": 50,
    "lr": 5e-4,
    "weight_decay": 0.05,
    "batch_size": 16,
    "loss": "mgca",
    "freeze_encoder": True,
    "patience": 10,
    "decoder_width": 256,  # U-Net channels at the coarsest block, halved per block (smp: 256 .. 16)
}
HEADS = ("linear", "unet")
LOSSES = ("mgca", "dice")


# -- metrics and losses ------------------------------------------------------------------------------------------
def dice_scores(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(N, F, H, W) bool masks -> (dice, empty_correct), both (N, F) float: Dice where the target is non-empty (NaN
    elsewhere), 1/0 for "nothing predicted" where the target is empty (NaN elsewhere)."""
    inter = (pred & target).flatten(2).sum(-1).float()
    predicted = pred.flatten(2).sum(-1).float()
    truth = target.flatten(2).sum(-1).float()
    present = truth > 0
    nan = torch.full_like(truth, math.nan)
    dice = torch.where(present, 2 * inter / (predicted + truth).clamp_min(1), nan)
    empty_correct = torch.where(present, nan, (predicted == 0).float())
    return dice, empty_correct


def soft_dice(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """(B, F, H, W) -> (F,) soft Dice of sigmoid(logits) per finding over the whole batch (MGCA's, smooth 1)."""
    p = logits.sigmoid().transpose(0, 1).flatten(1)
    t = target.float().transpose(0, 1).flatten(1)
    return (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Binary focal loss (no alpha), the mean over all pixels: (1 - p_t)^gamma x BCE, in log space for stability."""
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    log_one_minus_pt = F.logsigmoid(-logits * (2 * t - 1))
    return ((gamma * log_one_minus_pt).exp() * bce).mean()


def segmentation_loss(logits: Tensor, target: Tensor, kind: str = "mgca") -> Tensor:
    """ "mgca": 10 x focal - log(soft Dice), the log averaged over findings; "dice": 1 - mean soft Dice."""
    dice = soft_dice(logits, target)
    if kind == "mgca":
        return 10 * focal_loss(logits, target) - dice.log().mean()
    if kind == "dice":
        return 1 - dice.mean()
    raise ConfigError(f"segmentation: unknown loss {kind!r}; use one of {', '.join(LOSSES)}")


# -- heads -------------------------------------------------------------------------------------------------------
class LinearHead(nn.Module):
    """LoVT's linear segmentation: a 1x1 conv on the last feature map, bilinearly upsampled to the image."""

    def __init__(self, channels: int, n_out: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, n_out, 1)
        self.size = size

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return F.interpolate(self.conv(maps[-1]), size=(self.size, self.size), mode="bilinear", align_corners=False)


class UNetHead(nn.Module):
    """MONAI's U-Net decoder over the pyramid (x2 upsampling per block down to stride 1), then a 3x3 conv to one
    logit per finding. Strides the encoder lacks (all but one for a ViT) get zero-channel skips: those blocks only
    upsample, which makes the ViT case a progressive-upsampling (SETR-PUP-like) decoder."""

    def __init__(
        self, channels: Sequence[int], strides: Sequence[int], n_out: int, size: int, width: int = 256
    ) -> None:
        super().__init__()
        from monai.networks.nets.flexible_unet import UNetDecoder

        top = strides[-1]
        if any(s & (s - 1) for s in strides) or size % top:
            raise ConfigError(
                f"segmentation: the unet head needs power-of-two encoder strides dividing the image size; got strides "
                f"{list(strides)} at {size} px: use the linear head or an image size divisible by {top}"
            )
        self.blocks = int(math.log2(top))
        self.size = size
        self.level_of = {s: i for i, s in enumerate(strides)}
        self.all_strides = [2**i for i in range(self.blocks + 1)]  # 1 .. top; stride 1 is only a placeholder
        encoder_channels = [channels[self.level_of[s]] if s in self.level_of else 0 for s in self.all_strides]
        decoder_channels = [max(8, width >> i) for i in range(self.blocks)]  # width 256: smp's (256, ..., 16)
        self.decoder = UNetDecoder(
            spatial_dims=2, encoder_channels=encoder_channels, decoder_channels=decoder_channels,
            act=("relu", {"inplace": True}), norm=("batch", {"eps": 1e-3, "momentum": 0.1}), dropout=0.0,
            bias=False, upsample="nontrainable", pre_conv="default", interp_mode="nearest", align_corners=None,
            is_pad=True,
        )  # fmt: skip
        self.out = nn.Conv2d(decoder_channels[-1], n_out, 3, padding=1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        b = maps[0].shape[0]
        features = [
            maps[self.level_of[s]] if s in self.level_of else maps[0].new_zeros(b, 0, self.size // s, self.size // s)
            for s in self.all_strides
        ]
        x = self.out(self.decoder(features, skip_connect=self.blocks - 1))
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


def head_levels(head: str, n_levels: int) -> list[int]:
    """The pyramid levels a head reads: the last one (linear) or all (unet)."""
    return [n_levels - 1] if head == "linear" else list(range(n_levels))


class Segmenter(nn.Module):
    """Encoder pyramid + head; ``levels`` are the pyramid levels the head reads."""

    def __init__(self, pyramid: EncoderPyramid, head: str, n_out: int, size: int, width: int = 256) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"segmentation: unknown head {head!r}; use one of {', '.join(HEADS)}")
        self.pyramid = pyramid
        self.levels = head_levels(head, len(pyramid.strides))
        channels = [pyramid.channels[i] for i in self.levels]
        strides = [pyramid.strides[i] for i in self.levels]
        linear = head == "linear"
        self.head = LinearHead(channels[-1], n_out, size) if linear else UNetHead(channels, strides, n_out, size, width)

    def forward(self, images: Tensor) -> Tensor:
        maps = self.pyramid(images)
        return self.head([maps[i] for i in self.levels])


# -- the task ----------------------------------------------------------------------------------------------------
def run_segmentation(ctx: Any, spec: Any) -> Any:
    """Train each head per seed on train (early stopping on val), report Dice on test; see the module docstring."""
    from radalign.config import check_params
    from radalign.evaluation.context import TaskResult
    from radalign.utils.logging import get_logger

    start = time.perf_counter()
    params = check_params("segmentation", spec.params, DEFAULTS)
    if isinstance(params["heads"], str):
        params["heads"] = [params["heads"]]
    for head in params["heads"]:
        if head not in HEADS:
            raise ConfigError(f"segmentation: unknown head {head!r}; use one of {', '.join(HEADS)}")
    if params["loss"] not in LOSSES:
        raise ConfigError(f"segmentation: unknown loss {params['loss']!r}; use one of {', '.join(LOSSES)}")
    splits = {role: load_split(ctx, role) for role in ("train", "val", "test")}
    in_train = splits["train"].masks.flatten(2).any(2).any(0).tolist()
    present = [f for f, yes in zip(ctx.vocabulary, in_train, strict=True) if yes]
    findings = select_findings("segmentation", params["findings"], ctx.vocabulary, present)
    index = [ctx.vocabulary.index(f) for f in findings]
    for split in splits.values():
        split.masks = split.masks[:, index]
    frozen = bool(params["freeze_encoder"])
    inputs = _Inputs(ctx, splits, params, frozen)
    log = get_logger("segmentation")
    values: dict[str, list[float]] = {}
    details: dict[str, Any] = {"findings": findings, "n": {r: len(s) for r, s in splits.items()}, "runs": []}
    shown = _figure_images(splits["test"].masks)
    predictions: dict[str, Tensor] = {}
    for head in params["heads"]:
        for seed in ctx.protocol.seeds:
            torch.manual_seed(seed)
            pyramid = EncoderPyramid(ctx.method.image_encoder, freeze=frozen)
            model = Segmenter(pyramid, head, len(findings), ctx.protocol.image_size, params["decoder_width"])
            model = model.to(ctx.device)
            result = fit(
                model, lambda epoch, seed=seed: shuffled(len(splits["train"]), params["batch_size"], (seed, epoch)),
                lambda idx, model=model: inputs.loss(model, "train", idx),
                (lambda model=model: inputs.evaluate(model, "val")[0]) if len(splits["val"]) else None,
                epochs=params["epochs"], lr=params["lr"], weight_decay=params["weight_decay"],
                patience=params["patience"],
            )  # fmt: skip
            probs = inputs.evaluate(model, "test")[1]
            dice, empty = dice_scores(probs > 0.5, splits["test"].masks)
            per_finding = nanmean(dice, dim=0)
            run = {"dice": nanmean(per_finding, 0).item(), "empty_correct": nanmean(empty.flatten(), 0).item()}
            run |= {f"dice/{f}": per_finding[k].item() for k, f in enumerate(findings)}
            for key, value in run.items():
                values.setdefault(f"{head}/{key}", []).append(value)
            details["runs"].append({"head": head, "seed": seed, "best_epoch": result.best_epoch,
                                    "val_losses": result.val_losses, **run})  # fmt: skip
            predictions.setdefault(head, probs[shown])
            if ctx.progress:
                log.info(f"{head} seed {seed}: dice {run['dice']:.3f} (epoch {result.best_epoch} kept)")
    metrics = {key: over_seeds(v) for key, v in values.items()}
    notes = [] if inputs.cache is not None or not frozen else ["pyramid too large to cache: encoder ran every batch"]
    absent = [f for f, yes in zip(findings, splits["test"].masks.flatten(2).any(2).any(0).tolist(), strict=True)
              if not yes]  # fmt: skip
    if absent:
        notes.append(f"no test image has {', '.join(absent)}: its Dice is n/a and left out of the mean")
    figure = _figure(ctx, spec.name, splits["test"], shown, predictions, findings)
    return TaskResult(metrics, figures=[figure], details=details, notes=notes, seconds=time.perf_counter() - start)


class _Inputs:
    """Heads read either the frozen pyramid cached once per split (it would be recomputed every epoch, head and
    seed otherwise) or, fine-tuning or over the cache budget, the encoder's output on the batch."""

    def __init__(self, ctx: Any, splits: dict[str, DenseSplit], params: dict[str, Any], frozen: bool) -> None:
        self.splits, self.params, self.device = splits, params, ctx.device
        shared = EncoderPyramid(ctx.method.image_encoder, freeze=True)
        size = ctx.protocol.image_size
        levels = sorted({i for h in params["heads"] for i in head_levels(h, len(shared.strides))})
        total = sum(len(s) for s in splits.values()) * pyramid_bytes(shared, size, levels)
        self.cache: dict[str, dict[int, Tensor]] | None = None
        if frozen and total <= CACHE_BUDGET_BYTES:
            self.cache = {
                role: dict(zip(levels, encode_all(shared, s.images, levels, ctx.device, params["batch_size"]),
                               strict=True))
                for role, s in splits.items() if len(s)
            }  # fmt: skip

    def logits(self, model: Segmenter, role: str, idx: Tensor) -> Tensor:
        if self.cache is not None:
            return model.head([self.cache[role][i][idx].to(self.device) for i in model.levels])
        return model(self.splits[role].images[idx].to(self.device))

    def loss(self, model: Segmenter, role: str, idx: Tensor) -> Tensor:
        target = self.splits[role].masks[idx].to(self.device)
        return segmentation_loss(self.logits(model, role, idx), target, self.params["loss"])

    @torch.no_grad()
    def evaluate(self, model: Segmenter, role: str) -> tuple[float, Tensor]:
        """(mean loss, sigmoid probabilities on CPU) over a split, in eval mode."""
        model.eval()
        n = len(self.splits[role])
        total, probs = 0.0, []
        for idx in torch.arange(n).split(self.params["batch_size"]):
            logits = self.logits(model, role, idx)
            target = self.splits[role].masks[idx].to(self.device)
            total += float(segmentation_loss(logits, target, self.params["loss"])) * len(idx)
            probs.append(logits.sigmoid().cpu())
        return total / max(n, 1), torch.cat(probs) if probs else torch.zeros(0)


def nanmean(x: Tensor, dim: int) -> Tensor:
    """Mean over finite values (NaN where there are none, without a warning)."""
    finite = ~x.isnan()
    count = finite.sum(dim).float()
    return torch.where(finite, x, 0).sum(dim) / count.where(count > 0, math.nan)


def _figure_images(masks: Tensor, n: int = 4) -> Tensor:
    """Indices of up to ``n`` test images, those with the most findings present first."""
    count = masks.flatten(2).any(2).sum(1)
    return torch.argsort(count, descending=True, stable=True)[:n]


def _figure(ctx: Any, task: str, test: Any, shown: Tensor, predictions: dict[str, Tensor], findings: list[str]) -> str:
    """Rows = heads, columns = test images: ground truth (solid) and predicted (dashed) contours per finding."""
    plt = pyplot()
    path, relative = ctx.figure(task, "segmentation.png")
    heads = list(predictions)
    fig, axes = plt.subplots(len(heads), len(shown), figsize=(2.4 * len(shown), 2.5 * len(heads)), dpi=110,
                             squeeze=False)  # fmt: skip
    colors = plt.get_cmap("tab10")
    for r, head in enumerate(heads):
        for c, i in enumerate(shown.tolist()):
            ax = axes[r, c]
            ax.imshow(test.images[i, 0].numpy(), cmap="gray")
            for k in range(len(findings)):
                for mask, style in ((test.masks[i, k], "solid"), (predictions[head][c, k] > 0.5, "dashed")):
                    if mask.any() and not mask.all():
                        ax.contour(mask.numpy().astype(np.float32), levels=[0.5], colors=[colors(k % 10)],
                                   linestyles=style, linewidths=1.0)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(head)
    legend_title_save(fig, path, findings, colors, "ground truth (solid) vs prediction (dashed)", 0.06)
    return relative
