"""What every evaluation task receives: the frozen model, the protocol, the data split by split, and a place for
figures. Tasks are functions ``run(ctx, spec) -> TaskResult`` (see evaluation/tasks.py); they share this one way
to get datasets, embeddings, backbone features and dense targets, so no task re-implements data handling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from radalign.config import Protocol
from radalign.data.dataset import Collate, RadDataset, Skipped
from radalign.data.schema import Record
from radalign.errors import ConfigError, DataError
from radalign.evaluation.metrics import Metric


@dataclass
class TaskResult:
    """A task's outcome: named metrics, figure files (relative to the results folder), JSON-able details."""

    metrics: dict[str, Metric]
    figures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # caveats the report prints under the task's table
    seconds: float = 0.0


@dataclass
class Features:
    """Per-item vectors of one split with their labels (rows aligned with ``ids``)."""

    x: torch.Tensor  # (N, D)
    labels: np.ndarray  # (N, F) 1 / 0 / -1 / NaN
    ids: list[str]


FEATURE_KINDS = ("global", "backbone")


class EvalContext:
    """The frozen model + protocol + split records; caches embeddings so tasks that share them pay once."""

    def __init__(
        self,
        model: Any,
        protocol: Protocol,
        records: Sequence[Record],
        out: Path,
        *,
        vocabulary: Sequence[str] = (),
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.model = model  # radalign.inference.Encoder
        self.protocol = protocol
        self.out = Path(out)
        self.device = torch.device(device)
        self.progress = progress
        modality = "ct" if protocol.modality == "ct" else "xray"
        self.records: dict[str, list[Record]] = {
            role: [r for r in records if r.split == split and r.modality.value == modality]
            for role, split in protocol.splits.items()
        }
        if not self.records["test"]:
            raise DataError(
                f"protocol {protocol.name}: the manifest has no {modality} records in split "
                f"{protocol.splits['test']!r}; set the protocol's splits to the manifest's split names"
            )
        self.vocabulary = tuple(protocol.findings or vocabulary)
        self._cache: dict[tuple[Any, ...], Any] = {}

    # -- model -------------------------------------------------------------------------------------------------
    @property
    def method(self) -> Any:
        return self.model.method

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def is_3d(self) -> bool:
        return self.protocol.modality == "ct"

    # -- data --------------------------------------------------------------------------------------------------
    def image_transform(self) -> Any:
        from radalign.data import transforms

        p = self.protocol
        if self.is_3d:
            return transforms.build_volume_transform(
                p.volume_size, spacing_mm=p.volume_spacing_mm, train=False
            )  # fmt: skip
        return transforms.build_image_transform("none", p.image_size, train=False)

    def dataset(self, role: str, *, text: bool = False) -> RadDataset:
        """The split's items, evaluation transform (pad to square + resize, no augmentation), optional reports."""
        from radalign.data.cache import PreparedCache

        if self.protocol.cache_dir and "cache" not in self._cache:
            cache = PreparedCache(self.protocol.cache_dir)  # its index is read once, not per dataset
            if not self.is_3d:
                cache.check_covers(self.protocol.image_size, f"protocol {self.protocol.name}")
            self._cache["cache"] = cache
        cache = self._cache.get("cache")
        return RadDataset(
            self.records[role],
            vocabulary=self.vocabulary,
            image_transform=self.image_transform(),
            tokenizer=self.tokenizer if text else None,
            max_length=self.model.max_length,
            cache=cache,
            image_choice="first",
        )

    def dense_dataset(self, role: str) -> DenseDataset:
        """The split's radiographs with per-finding masks and boxes in the transformed image's pixel grid."""
        if self.is_3d:
            raise ConfigError("dense tasks (segmentation, detection, grounding) run on 2D radiographs only")
        return DenseDataset(self.dataset(role), self.vocabulary, self.protocol.image_size)

    def loader(self, dataset: Dataset, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        pad = getattr(self.tokenizer, "pad_token_id", 0) or 0
        collate = dense_collate if isinstance(dataset, DenseDataset) else Collate(pad_token_id=pad)
        return DataLoader(
            dataset, batch_size=batch_size or self.protocol.batch_size, shuffle=shuffle, collate_fn=collate
        )

    # -- cached representations ---------------------------------------------------------------------------------
    def embedded(self, role: str, *, text: bool = True) -> Any:
        """Projected, L2-normalised image (and report) embeddings of a split: zero-shot and retrieval use them."""
        from radalign.evaluation.embed import embed_dataset

        key = ("embedded", role, text)
        if key not in self._cache:
            pad = getattr(self.tokenizer, "pad_token_id", 0) or 0
            self._cache[key] = embed_dataset(
                self.method, self.dataset(role, text=text), self.protocol.batch_size, pad_token_id=pad
            )
        return self._cache[key]

    @torch.no_grad()
    def features(self, role: str, kind: str = "global") -> Features:
        """A split's frozen global image features (before projection), what linear probes read. ``kind``:
        ``global`` = the method's own representation (:meth:`Method.global_image_features`: LoVT's and PRIOR's
        attention pools), ``backbone`` = the image encoder's pooled output for every method."""
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"features: kind must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
        key = ("features", role, kind)
        if key not in self._cache:
            method = self.method
            was_training = method.training
            method.eval()
            xs, labels, ids = [], [], []
            for batch in self.loader(self.dataset(role)):
                if not batch["batch_size"]:
                    continue
                images = batch["image"].to(self.device)
                if kind == "global":
                    x = method.global_image_features(images)
                else:
                    x = method.image_encoder(images).global_emb
                xs.append(x.float().cpu())
                labels.append(batch["labels"].numpy())
                ids += batch["id"]
            method.train(was_training)
            if not xs:
                raise DataError(f"split {self.protocol.splits[role]!r}: no readable images")
            self._cache[key] = Features(torch.cat(xs), np.concatenate(labels), ids)
        return self._cache[key]

    def figure(self, task: str, filename: str) -> tuple[Path, str]:
        """(absolute path to write, path relative to the results folder) for a task's figure."""
        relative = f"figures/{task}/{filename}"
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, relative


class DenseDataset(Dataset):
    """Wraps a 2D RadDataset: adds ``masks`` (F, S, S) bool, ``boxes`` (M, 4) x0 y0 x1 y1, ``box_labels`` (M,)
    and ``phrases`` [(finding index, text)], all mapped through the same pad-to-square + resize as the image.

    A record without a regions file has empty masks and no boxes (a true negative for every finding); regions of
    findings outside the vocabulary are ignored.
    """

    def __init__(self, base: RadDataset, vocabulary: Sequence[str], size: int) -> None:
        self.base = base
        self.vocabulary = tuple(vocabulary)
        self.size = size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        item = self.base[index]
        if isinstance(item, Skipped):
            return item
        record = self.base.records[index]
        try:
            item.update(self._targets(record))
        except (DataError, OSError, ValueError) as err:
            return Skipped(record.id, f"regions: {err}")
        return item

    def _targets(self, record: Record) -> dict[str, Any]:
        from radalign.data.manifest import load_regions

        s = self.size
        masks = torch.zeros(len(self.vocabulary), s, s, dtype=torch.bool)
        boxes, box_labels, phrases = [], [], []
        regions = load_regions(record.regions_path) if record.regions_path is not None else []
        shape = None
        for region in regions:
            if region.finding not in self.vocabulary:
                continue
            k = self.vocabulary.index(region.finding)
            mask = _read_mask(region.mask_path) if region.mask_path else None
            if mask is not None:
                shape = mask.shape
                masks[k] |= _square_resize(torch.from_numpy(mask)[None, None].float(), s)[0, 0] > 0.5
            if region.box is not None and len(region.box) == 4:
                shape = shape or self._image_shape(record)
                boxes.append(_map_box(region.box, shape, s))
                box_labels.append(k)
            elif mask is not None and mask.any():
                rows, cols = np.nonzero(mask)
                boxes.append(_map_box((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1), mask.shape, s))
                box_labels.append(k)
            if region.phrase:
                phrases.append((k, region.phrase))
        return {
            "masks": masks,
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "box_labels": torch.tensor(box_labels, dtype=torch.long),
            "phrases": phrases,
        }

    def _image_shape(self, record: Record) -> tuple[int, int]:
        from radalign.data.io import read_image

        return tuple(read_image(record.image_path).array.shape[-2:])  # type: ignore[return-value]


def _read_mask(path: str) -> np.ndarray:
    from PIL import Image as PILImage

    with PILImage.open(path) as image:
        return np.asarray(image) > 0


def _square_offsets(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(pad_left, pad_top, side) of the eval transform's pad-to-square (odd remainders go right/bottom)."""
    h, w = shape
    side = max(h, w)
    return (side - w) // 2, (side - h) // 2, side


def _square_resize(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 1, H, W) -> (1, 1, size, size): the eval transform's geometry, bilinear then thresholded by callers."""
    import torch.nn.functional as F

    h, w = mask.shape[-2:]
    left, top, side = _square_offsets((h, w))
    padded = F.pad(mask, (left, side - w - left, top, side - h - top))
    return F.interpolate(padded, size=(size, size), mode="bilinear", align_corners=False)


def _map_box(box: Sequence[float], shape: tuple[int, int], size: int) -> list[float]:
    left, top, side = _square_offsets(shape)
    scale = size / side
    x0, y0, x1, y1 = (float(v) for v in box)
    return [(x0 + left) * scale, (y0 + top) * scale, (x1 + left) * scale, (y1 + top) * scale]


def dense_collate(items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Stack images and masks; boxes, box labels and phrases stay per-image lists (their counts differ)."""
    kept = [i for i in items if not isinstance(i, Skipped)]
    batch: dict[str, Any] = {
        "batch_size": len(kept),
        "skipped": [(s.id, s.reason) for s in items if isinstance(s, Skipped)],
        "id": [i["id"] for i in kept],
    }
    if kept:
        batch["image"] = torch.stack([i["image"] for i in kept])
        batch["labels"] = torch.stack([i["labels"] for i in kept])
        batch["masks"] = torch.stack([i["masks"] for i in kept])
        batch["boxes"] = [i["boxes"] for i in kept]
        batch["box_labels"] = [i["box_labels"] for i in kept]
        batch["phrases"] = [i["phrases"] for i in kept]
    return batch
