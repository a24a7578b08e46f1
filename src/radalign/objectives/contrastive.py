"""Global InfoNCE, the one implementation every method uses (CLIP, ConVIRT, GLoRIA/MGCA global terms, UMCL).

loss = w_i2t * CE(image -> texts) + w_t2i * CE(text -> images), with s_ij = <v_i, t_j> / tau on L2-normalised
embeddings. Options: fixed or learnable temperature (log-parameterised, kept inside a range), same-modality
negatives, label-aware positive sets (UniCL: the mean log-probability of each positive) or soft targets
(MedCLIP), and an all-gather with gradient across processes in which each process computes only its own rows
against the gathered columns (open_clip's ``local_loss=True, gather_with_grad=True``).

Distributed gradients: the gather's backward sums, over processes, the gradients of every process's loss with
respect to this process's rows. With DDP's gradient averaging the parameter gradients then equal those of one
process computing the mean loss over the concatenated global batch (tested against exactly that).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.errors import ConfigError


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """all_gather needs equal shapes: pad every process's rows to the largest count, gather, cut the padding."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's rows (sizes may differ); backward: sum the gradients, keep this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every process's loss depends on these rows
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: Tensor, with_grad: bool = True) -> tuple[Tensor, int]:
    """All processes' rows of ``x`` concatenated in rank order, and the offset of this process's rows.

    With one process this is ``(x, 0)``. Batch sizes may differ between processes (skipped samples).
    ``with_grad=False`` is for labels and other tensors that need no gradient.
    """
    rank, world = distributed_world()
    if world == 1:
        return x, 0
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes_t = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s.item()) for s in sizes_t]
    offset = sum(sizes[:rank])
    if with_grad:
        return _GatherRows.apply(x, sizes, rank), offset
    with torch.no_grad():
        return _all_gather_padded(x.detach(), sizes), offset


def contrastive_targets(
    n_rows: int,
    n_cols: int,
    offset: int,
    positives: Tensor | None = None,
    soft_targets: Tensor | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Target distribution (n_rows, n_cols) over the columns, each row summing to 1.

    Plain InfoNCE: one-hot at ``offset + i``. ``positives`` (bool): uniform over the row's positives (the pair
    itself always included), which turns the cross-entropy into UniCL's mean log-probability of the positives.
    ``soft_targets`` (>= 0): the row renormalised (an all-zero row falls back to the pair itself).
    """
    eye = torch.zeros(n_rows, n_cols, device=device, dtype=dtype)
    eye[torch.arange(n_rows, device=device), offset + torch.arange(n_rows, device=device)] = 1.0
    if positives is None and soft_targets is None:
        return eye
    if positives is not None and soft_targets is not None:
        raise ConfigError("InfoNCE: pass positives or soft_targets, not both")
    given = positives if positives is not None else soft_targets
    if given.shape != (n_rows, n_cols):
        raise ConfigError(
            f"InfoNCE: targets have shape {tuple(given.shape)}, expected {(n_rows, n_cols)} "
            "(this process's rows x the gathered batch; gather labels with gather_rows(..., with_grad=False))"
        )
    if positives is not None:
        t = (positives.bool() | eye.bool()).to(dtype)
    else:
        t = soft_targets.to(dtype).clamp_min(0.0)
        t = torch.where(t.sum(dim=1, keepdim=True) > 0, t, eye)
    return t / t.sum(dim=1, keepdim=True)


def _direction_loss(
    anchors: Tensor, columns: Tensor, same: Tensor | None, targets: Tensor, exclude: Tensor | None, tau: Tensor
) -> Tensor:
    """Mean over anchors of the cross-entropy between ``targets`` and softmax(anchor . columns / tau), with the
    anchor's own modality as extra negatives when ``same`` is given (``exclude`` masks itself and positives)."""
    logits = anchors @ columns.T / tau  # (B, N)
    if same is not None:
        same_logits = (anchors @ same.T / tau).masked_fill(exclude, torch.finfo(logits.dtype).min)
        logits = torch.cat([logits, same_logits], dim=1)  # (B, 2N)
        targets = torch.cat([targets, torch.zeros_like(targets)], dim=1)
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def info_nce(
    image: Tensor,
    text: Tensor,
    temperature: Tensor | float,
    direction_weights: tuple[float, float] = (0.5, 0.5),
    same_modality_negatives: bool = False,
    positives: Tensor | None = None,
    soft_targets: Tensor | None = None,
    gather: bool = True,
    normalize: bool = True,
) -> Tensor:
    """The InfoNCE loss of this process's rows (see :class:`InfoNCE`); image, text (B, D) in one shared space.

    Computed in at least float32 (autocast off): logits divided by a small temperature overflow bf16 ranges.
    """
    if image.ndim != 2 or image.shape != text.shape:
        raise ConfigError(f"InfoNCE: image {tuple(image.shape)} and text {tuple(text.shape)} must both be (B, D)")
    dtype = torch.promote_types(image.dtype, torch.float32)
    with torch.autocast(device_type=image.device.type, enabled=False):
        image, text = image.to(dtype), text.to(dtype)
        tau = torch.as_tensor(temperature, device=image.device).to(dtype)
        if normalize:
            image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        if gather:
            both, offset = gather_rows(torch.cat([image, text], dim=1))
            image_all, text_all = both.split(image.shape[1], dim=1)
        else:
            image_all, text_all, offset = image, text, 0
        n, n_all = image.shape[0], image_all.shape[0]
        targets = contrastive_targets(n, n_all, offset, positives, soft_targets, image.device, dtype)
        exclude = None
        if same_modality_negatives:  # never push an item from itself, nor from a known positive
            exclude = contrastive_targets(n, n_all, offset, device=image.device, dtype=dtype).bool()
            if positives is not None:
                exclude = exclude | positives.bool()
        same_i, same_t = (image_all, text_all) if same_modality_negatives else (None, None)
        i2t = _direction_loss(image, text_all, same_i, targets, exclude, tau)
        t2i = _direction_loss(text, image_all, same_t, targets, exclude, tau)
        return direction_weights[0] * i2t + direction_weights[1] * t2i


class InfoNCE(nn.Module):
    """Symmetric global InfoNCE with a fixed or learnable temperature.

    ``learnable_temperature``: tau = exp(log_tau) with log_tau a parameter clamped in place to
    ``temperature_range`` before each use (CLIP clamps its logit scale at 100, i.e. tau >= 0.01).
    ``direction_weights`` = (image -> text, text -> image): CLIP (0.5, 0.5), ConVIRT (0.75, 0.25), UniCL (1, 1).
    ``positives`` / ``soft_targets`` (this process's rows x the gathered batch) must describe a symmetric relation
    (label equality, label similarity): the same matrix serves both directions.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        temperature_range: tuple[float, float] = (0.01, 1.0),
        direction_weights: tuple[float, float] = (0.5, 0.5),
        same_modality_negatives: bool = False,
        gather: bool = True,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        lo, hi = (float(v) for v in temperature_range)
        if not 0 < lo <= hi:
            raise ConfigError(f"InfoNCE: temperature_range must satisfy 0 < min <= max, got {temperature_range}")
        if temperature <= 0 or (learnable_temperature and not lo <= temperature <= hi):
            raise ConfigError(f"InfoNCE: temperature {temperature} must be > 0 and inside {temperature_range}")
        if len(direction_weights) != 2 or min(direction_weights) < 0:
            raise ConfigError(f"InfoNCE: direction_weights must be two non-negative numbers, got {direction_weights}")
        self.learnable = learnable_temperature
        self.log_range = (math.log(lo), math.log(hi))
        log_tau = torch.tensor(math.log(temperature))
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau, persistent=False)
        self.direction_weights = (float(direction_weights[0]), float(direction_weights[1]))
        self.same_modality_negatives = same_modality_negatives
        self.gather = gather
        self.normalize = normalize

    @property
    def temperature(self) -> Tensor:
        """The current tau (a tensor with gradient when learnable)."""
        if self.learnable:
            with torch.no_grad():  # in place, before use: the parameter itself never leaves the range
                self.log_temperature.clamp_(*self.log_range)
        return self.log_temperature.exp()

    def forward(
        self, image: Tensor, text: Tensor, positives: Tensor | None = None, soft_targets: Tensor | None = None
    ) -> Tensor:
        """image, text (B, D) -> scalar loss (the mean over this process's rows)."""
        return info_nce(
            image,
            text,
            self.temperature,
            direction_weights=self.direction_weights,
            same_modality_negatives=self.same_modality_negatives,
            positives=positives,
            soft_targets=soft_targets,
            gather=self.gather,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        tau = float(self.log_temperature.detach().exp())
        return f"temperature={tau:.4g}, learnable={self.learnable}, weights={self.direction_weights}"


def label_positives(labels: Tensor, labels_all: Tensor | None = None, unknown: str = "match") -> Tensor:
    """Positive sets from label vectors (UniCL): i and j are positives when their label vectors are equal.

    labels (B, F) with NaN = unknown; ``labels_all`` (N, F) the gathered batch (default: ``labels``).
    ``unknown="match"``: an unknown entry equals only another unknown one (NaN == NaN). ``unknown="ignore"``: an
    observation unknown in either vector is left out of the comparison, and the two must share at least one known
    observation. A sample with no labels at all has only itself as positive (added by :func:`contrastive_targets`).
    """
    if unknown not in ("match", "ignore"):
        raise ConfigError(f"label_positives: unknown must be 'match' or 'ignore', got {unknown!r}")
    labels = labels.float()
    labels_all = labels if labels_all is None else labels_all.float()
    a, b = labels.unsqueeze(1), labels_all.unsqueeze(0)  # (B, 1, F), (1, N, F)
    if unknown == "match":
        equal = ((a == b) | (a.isnan() & b.isnan())).all(dim=-1)  # (B, N)
    else:
        both = ~a.isnan() & ~b.isnan()
        equal = ((a == b) | ~both).all(dim=-1) & both.any(dim=-1)
    has_labels = ~labels.isnan().all(dim=-1)
    return equal & has_labels.unsqueeze(1) & ~labels_all.isnan().all(dim=-1).unsqueeze(0)


def label_similarity_targets(labels: Tensor, labels_all: Tensor | None = None) -> Tensor:
    """Soft targets from label similarity (MedCLIP's semantic matching): row-wise softmax of the label vectors'
    dot products, (B, N). labels (B, F) in {1, 0} with NaN = unknown (counted as 0). A sample without labels is
    its own only target (its row one-hot by :func:`contrastive_targets`) and no one else's (its column 0)."""
    labels = labels.float()
    labels_all = labels if labels_all is None else labels_all.float()
    scores = labels.nan_to_num(0.0) @ labels_all.nan_to_num(0.0).T  # (B, N)
    labelled = ~labels_all.isnan().all(dim=-1)
    if not bool(labelled.any()):
        return torch.zeros_like(scores)
    targets = scores.masked_fill(~labelled.unsqueeze(0), float("-inf")).softmax(dim=1)
    return targets * (~labels.isnan().all(dim=-1)).unsqueeze(1)
