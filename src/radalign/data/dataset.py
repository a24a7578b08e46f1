"""A torch Dataset over manifest records: decode (or read the prepared cache), augment, tokenise; and collate.

A record whose image or report cannot be read does not crash a run hours in: with ``on_error="skip"`` the
item comes back as :class:`Skipped`, the collate function drops it and lists it in ``batch["skipped"]``, and
:class:`radalign.data.datamodule.SkippedSamplesCallback` counts and reports them at the end of each epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from radalign.data.cache import PreparedCache
from radalign.data.schema import Image, Record, Report, labels_to_vector
from radalign.data.tokenization import NO_INDEX, encode_report
from radalign.errors import DataError

ImageTransform = Callable[[torch.Tensor, tuple[float, ...]], torch.Tensor]
SentenceAugment = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Skipped:
    """An item that could not be produced, with the reason (no patient data: ids and radalign messages only)."""

    id: str
    reason: str


class RadDataset(Dataset):
    """Records -> dicts of tensors ready for :func:`collate`.

    Each item holds ``id``, ``image`` (C, H, W) or (C, D, H, W), ``labels`` (F,) with NaN where missing,
    ``modality``, ``view``, ``source`` (the training source's name) and ``has_report``; with a tokenizer and a
    report also ``input_ids`` and the ``token_sentence`` / ``token_word`` indices (NO_INDEX = -1 for special
    tokens), and ``sentences``. An image-label record (labels, no report) has ``has_report`` False and no text.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        vocabulary: Sequence[str] = (),
        image_transform: ImageTransform | None = None,
        tokenizer: Any = None,
        max_length: int = 128,
        sentence_augment: SentenceAugment | None = None,
        report_sections: Sequence[str] = ("FINDINGS", "IMPRESSION"),
        require_report: bool = False,
        cache: PreparedCache | None = None,
        image_choice: Literal["first", "random"] = "first",
        on_error: Literal["skip", "fail"] = "skip",
        source: str = "",
    ) -> None:
        self.records = list(records)
        self.source = source
        self.vocabulary = tuple(vocabulary)
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sentence_augment = sentence_augment
        self.report_sections = tuple(report_sections)
        self.require_report = require_report
        self.cache = cache
        self.image_choice = image_choice
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, record: Record) -> Image:
        """The record's image, from the prepared cache when present, else decoded from the source file."""
        index = 0
        if self.image_choice == "random" and len(record.image_paths) > 1:
            # one image of a multi-image study per access (LoVT, PRIOR); in training torch's RNG is seeded per item
            index = int(torch.randint(len(record.image_paths), ()).item())
        if self.cache is not None:
            cached = self.cache.get(record, index)
            if cached is not None:
                return cached
        from radalign.data.io import read_image

        return read_image(record.image_paths[index], expect=record.modality)

    def load_report(self, record: Record) -> Report | None:
        from radalign.data.reports import parse_report

        report = None if record.report is None else parse_report(record.report, sections=self.report_sections)
        if self.require_report and (report is None or report.is_empty):
            raise DataError(f"record {record.id} has an empty report, and this dataset requires one")
        return report

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | Skipped:
        """``dataset[index]``, or ``dataset[index, seed]`` (what the training sampler yields): every random draw of
        the item (augmentation, image choice, sentence augmentation) then comes from ``seed`` and leaves torch's
        global generator as it was."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        try:
            if seed is None:
                return self._item(record)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._item(record)
        except (DataError, OSError, MemoryError) as err:  # MemoryError: an image too large for this machine
            if self.on_error == "fail":
                raise DataError(f"record {record.id} (manifest index {index}): {err}") from err
            return Skipped(record.id, str(err))

    def _item(self, record: Record) -> dict[str, Any]:
        image = self.load_image(record)
        if not np.isfinite(image.array).all():
            raise DataError(f"image of record {record.id} contains NaN or infinite pixels")
        tensor = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None]
        if self.image_transform is not None:
            tensor = self.image_transform(tensor, image.spacing)
        item: dict[str, Any] = {
            "id": record.id,
            "image": tensor,
            "labels": torch.from_numpy(labels_to_vector(record.labels, self.vocabulary)),
            "modality": record.modality.value,
            "view": record.view.value if record.view is not None else "",
            "source": self.source,
            "has_report": False,
            "vocabulary": self.vocabulary,
        }
        report = self.load_report(record)
        if report is not None and not report.is_empty:
            item["has_report"] = True
            sentences = list(report.sentences)
            if self.sentence_augment is not None:
                sentences = self.sentence_augment(sentences)
            item["sentences"] = sentences
            if self.tokenizer is not None:
                encoded = encode_report(self.tokenizer, sentences, self.max_length)
                item["input_ids"] = torch.from_numpy(encoded.input_ids)
                item["token_sentence"] = torch.from_numpy(encoded.token_sentence)
                item["token_word"] = torch.from_numpy(encoded.token_word)
        return item


class Collate:
    """Stack images and labels, pad token sequences, and set skipped items aside (picklable for workers).

    A batch may mix image-report and image-label items: ``has_report`` (B,) says which is which, and the text
    tensors have a row for every item, all padding (attention 0) for those without a report, for the method to
    fill (UMCL writes a prompt from the labels there). ``label_mask`` (B, F) is True where a label is known.
    ``batch_modality`` names the batch's kind (xray or ct), ``vocabulary`` the findings of the label columns.
    Items of two modalities (a multi-source run's step) become ``{"parts": [batch, batch], "batch_size",
    "skipped"}``, one batch per modality.
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
        skipped = [(s.id, s.reason) for s in items if isinstance(s, Skipped)]
        good = [s for s in items if not isinstance(s, Skipped)]
        modalities = list(dict.fromkeys(s["modality"] for s in good))
        if len(modalities) > 1:
            # 2D images and 3D volumes cannot be stacked: one batch per modality, trained on in the same step
            parts = [self._collate([s for s in good if s["modality"] == m], []) for m in modalities]
            return {"parts": parts, "skipped": skipped, "batch_size": len(good)}
        return self._collate(good, skipped)

    def _collate(self, good: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"skipped": skipped, "batch_size": len(good)}
        if not good:
            return batch
        batch["batch_modality"] = good[0]["modality"]
        batch["id"] = [s["id"] for s in good]
        batch["modality"] = [s["modality"] for s in good]
        batch["view"] = [s["view"] for s in good]
        batch["source"] = [s.get("source", "") for s in good]
        batch["has_report"] = torch.tensor([bool(s.get("has_report", "input_ids" in s)) for s in good])
        shapes = {tuple(s["image"].shape) for s in good}
        if len(shapes) > 1:
            raise DataError(
                f"images in one batch have different shapes {sorted(shapes)}; configure an image transform "
                "that resizes/crops to one size (e.g. loader.image_size)"
            )
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["labels"] = torch.stack([s["labels"] for s in good])
        batch["label_mask"] = ~torch.isnan(batch["labels"])
        batch["vocabulary"] = tuple(good[0].get("vocabulary", ()))  # the names of the label columns
        if any("input_ids" in s for s in good):
            self._pad_text(good, batch)
        if any("sentences" in s for s in good):
            batch["sentences"] = [s.get("sentences", []) for s in good]
        return batch

    def _pad_text(self, items: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        length = max(len(s["input_ids"]) for s in items if "input_ids" in s)
        n = len(items)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        token_sentence = torch.full((n, length), NO_INDEX, dtype=torch.long)
        token_word = torch.full((n, length), NO_INDEX, dtype=torch.long)
        for i, s in enumerate(items):
            if "input_ids" not in s:
                continue  # an image-label item: its row stays padding
            t = len(s["input_ids"])
            input_ids[i, :t] = s["input_ids"]
            attention[i, :t] = 1
            token_sentence[i, :t] = s["token_sentence"]
            token_word[i, :t] = s["token_word"]
        batch["input_ids"] = input_ids  # (B, T)
        batch["attention_mask"] = attention  # (B, T)
        batch["token_sentence"] = token_sentence  # (B, T), -1 outside sentences
        batch["token_word"] = token_word  # (B, T), -1 outside words
        batch["n_sentences"] = token_sentence.amax(dim=1) + 1  # (B,)


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int, *, sentences: bool = True) -> dict[str, Any]:
    """Free texts -> padded text tensors as a batch holds them (``input_ids``, ``attention_mask``, ``token_sentence``,
    ``token_word``, ``n_sentences``); ``sentences``: split each text into sentences first, as training did reports."""
    from radalign.data.reports import split_sentences

    items = []
    for text in texts:
        parts = (split_sentences(text) or [text]) if sentences else [text]
        encoded = encode_report(tokenizer, parts, max_length)
        items.append({k: torch.from_numpy(getattr(encoded, k)) for k in ("input_ids", "token_sentence", "token_word")})
    batch: dict[str, Any] = {}
    Collate(pad_token_id=getattr(tokenizer, "pad_token_id", 0) or 0)._pad_text(items, batch)
    return batch


def mixed_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from several non-negative integers (SeedSequence: nearby inputs give unrelated
    seeds): an item's augmentation seed (seed, epoch, index), a multi-source batch's draw."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed (reproducible augments)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
