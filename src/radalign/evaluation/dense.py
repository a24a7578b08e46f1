"""What the dense tasks (segmentation, detection) share: a split held in memory, the frozen encoder's feature
pyramid as a module, a pyramid cache, finding selection and an early-stopping training loop.

The encoder stays frozen unless a task asks to fine-tune: then it is deep-copied, so ``ctx.method`` is never
changed (weights, buffers or mode).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from radalign.errors import ConfigError, DataError

CACHE_BUDGET_BYTES = 2 * 2**30  # cached pyramids of all splits together; above it the encoder runs every batch


@dataclass
class DenseSplit:
    """One split in memory: images (N, 1, S, S), masks (N, F, S, S) bool over the context's vocabulary (or None),
    and per-image boxes (M, 4) x0 y0 x1 y1 in pixels with their finding indices (M,)."""

    images: Tensor
    masks: Tensor | None
    boxes: list[Tensor]
    box_labels: list[Tensor]
    ids: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def load_split(ctx: Any, role: str, *, masks: bool = True, batch_size: int = 64) -> DenseSplit:
    """The split's dense items, collated once (dense tasks train for many epochs on small data)."""
    images, all_masks, boxes, labels, ids, skipped = [], [], [], [], [], []
    for batch in ctx.loader(ctx.dense_dataset(role), batch_size=batch_size):
        skipped += batch["skipped"]
        if not batch["batch_size"]:
            continue
        images.append(batch["image"])
        if masks:
            all_masks.append(batch["masks"])
        boxes += batch["boxes"]
        labels += batch["box_labels"]
        ids += batch["id"]
    if role != "val" and not ids:
        raise DataError(f"split {ctx.protocol.splits[role]!r}: no readable images for a dense task")
    s, n_findings = ctx.protocol.image_size, len(ctx.vocabulary)
    stacked_masks = None
    if masks:
        stacked_masks = torch.cat(all_masks) if all_masks else torch.zeros(0, n_findings, s, s, dtype=torch.bool)
    stacked = torch.cat(images) if images else torch.zeros(0, 1, s, s)
    return DenseSplit(stacked, stacked_masks, boxes, labels, ids, skipped)


def select_findings(
    task: str, requested: Sequence[str] | None, vocabulary: Sequence[str], present: Sequence[str]
) -> list[str]:
    """``requested`` checked against the vocabulary, or by default every finding ``present`` in train."""
    if requested:
        unknown = [f for f in requested if f not in vocabulary]
        if unknown:
            valid = ", ".join(vocabulary)
            raise ConfigError(f"{task}: finding {unknown[0]!r} is not in the protocol's findings; valid: {valid}")
        if not set(requested) & set(present):
            raise DataError(
                f"{task}: none of {list(requested)} has a mask or box in the train split, so a head would train on "
                "nothing; give the manifest a 'regions' column (docs/data.md) or choose findings that have regions"
            )
        return list(requested)
    if not present:
        raise DataError(
            f"{task}: no finding has a mask or box in the train split, so there is nothing to learn; give the "
            "manifest a 'regions' column (docs/data.md)"
        )
    return [f for f in vocabulary if f in present]


class EncoderPyramid(nn.Module):
    """The image encoder's feature pyramid (``TimmImageEncoder.pyramid``) as a module.

    Frozen, the encoder is held outside the module tree (so optimisers, state dicts, ``.to`` and ``.train`` never
    reach it) and runs in eval mode without gradients; otherwise a deep copy is trained with the head.
    """

    def __init__(self, encoder: nn.Module, *, freeze: bool = True) -> None:
        super().__init__()
        if not hasattr(encoder, "pyramid"):
            raise ConfigError(f"dense tasks need a 2D timm image encoder, got {type(encoder).__name__}")
        self.freeze = freeze
        self.channels: list[int] = list(encoder.pyramid_channels)
        self.strides: list[int] = list(encoder.pyramid_strides)
        if freeze:
            self._frozen = (encoder,)  # a tuple hides it from nn.Module's registration
        else:
            self.encoder = copy.deepcopy(encoder)

    def forward(self, images: Tensor) -> list[Tensor]:
        if not self.freeze:
            return self.encoder.pyramid(images)
        encoder = self._frozen[0]
        was_training = encoder.training
        encoder.eval()  # batch norm must not learn the downstream data's statistics
        try:
            with torch.no_grad():
                return encoder.pyramid(images)
        finally:
            encoder.train(was_training)


def pyramid_bytes(pyramid: EncoderPyramid, size: int, levels: Sequence[int]) -> int:
    """Bytes of one image's float32 pyramid at the given level indices."""
    return sum(4 * pyramid.channels[i] * math.ceil(size / pyramid.strides[i]) ** 2 for i in levels)


@torch.no_grad()
def encode_all(pyramid: EncoderPyramid, images: Tensor, levels: Sequence[int], device: torch.device, batch_size: int):
    """The frozen pyramid of every image, on CPU: a list over ``levels`` of (N, C, h, w)."""
    chunks: list[list[Tensor]] = [[] for _ in levels]
    for start in range(0, len(images), batch_size):
        maps = pyramid(images[start : start + batch_size].to(device))
        for out, i in zip(chunks, levels, strict=True):
            out.append(maps[i].float().cpu())
    return [torch.cat(c) for c in chunks]


@dataclass
class FitResult:
    """How a head's training went: the kept epoch (1-based) and the losses per epoch."""

    best_epoch: int
    best_val_loss: float
    train_losses: list[float]
    val_losses: list[float]


def fit(
    module: nn.Module,
    batches: Callable[[int], Iterable[Any]],
    loss: Callable[[Any], Tensor],
    val_loss: Callable[[], float] | None,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    patience: int = 10,
) -> FitResult:
    """AdamW over ``module``'s trainable parameters; early stopping on ``val_loss`` (the best epoch's weights are
    restored). ``batches(epoch)`` yields training batches; without a val split the last epoch is kept."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state, waited = math.inf, epochs, None, 0
    train_losses: list[float] = []
    val_losses: list[float] = []
    for epoch in range(epochs):
        module.train()
        total, n = 0.0, 0
        for batch in batches(epoch):
            value = loss(batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total, n = total + float(value.detach()), n + 1
        train_losses.append(total / max(n, 1))
        if val_loss is None:
            continue
        current = float(val_loss())
        val_losses.append(current)
        if current < best:
            best, best_epoch, waited = current, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    return FitResult(best_epoch, best, train_losses, val_losses)


def batch_norms_eval(module: nn.Module) -> None:
    """Batch norms to eval mode, so a loss computed in train mode (torchvision detectors) leaves their stats alone."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def shuffled(n: int, batch_size: int, key: tuple[int, int]) -> list[Tensor]:
    """Index batches of a permutation of ``range(n)`` fixed by ``key`` = (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(key[0] * 100_003 + key[1]))
    return list(order.split(batch_size))
