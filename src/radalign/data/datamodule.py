"""LightningDataModule: manifest(s) -> splits -> datasets -> loaders, with deterministic per-worker seeding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from radalign.config import DataConfig
from radalign.data.cache import PreparedCache
from radalign.data.dataset import Collate, RadDataset, mixed_seed, seed_worker
from radalign.data.manifest import Manifest, load_manifest
from radalign.data.multisource import SourcesDataset, WeightedSourceSampler
from radalign.data.schema import Modality
from radalign.errors import ConfigError, DataError


def build_transform(config: DataConfig, train: bool) -> Any:
    """The image transform for the configured modality, as ``f(tensor, spacing) -> tensor``."""
    from radalign.data import transforms

    if config.modality == "ct":
        return transforms.build_volume_transform(
            config.volume_size, config.volume_spacing_mm, hu_window=config.hu_window, train=train
        )
    return transforms.build_image_transform(config.preset, config.image_size, train=train, hflip=config.hflip)


def build_sentence_augment(config: DataConfig) -> Any:
    from radalign.data.transforms import TextAugment

    augment = TextAugment(shuffle=config.text_shuffle, swap_p=config.text_swap_p, one_sentence=config.text_one_sentence)
    return augment if augment.active else None


class RadDataModule(L.LightningDataModule):
    """The training data of a run: one manifest (``loader.manifest``) or several weighted sources
    (``loader.sources``, data/multisource.py), each split into train / val / test datasets."""

    def __init__(self, config: DataConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.sources = config.source_list()  # raises when neither a manifest nor sources are set
        self.config = config
        self._tokenizer = tokenizer
        self.manifest: Manifest | None = None  # the (first) source's manifest
        self.manifests: dict[str, Manifest] = {}
        self.datasets: dict[str, RadDataset | SourcesDataset] = {}
        self.per_source: dict[str, dict[str, RadDataset]] = {}  # source name -> split -> dataset

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None and self.config.tokenizer is not None:
            from radalign.data.tokenization import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    @property
    def multi_source(self) -> bool:
        return bool(self.config.sources)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        names = self.config.source_names()
        for name, c in zip(names, self.sources, strict=True):
            # File existence is checked here (cheap); decoding problems surface per item and are skipped/counted.
            manifest = load_manifest(
                c.manifest, require_report=c.require_report, on_error=c.on_error, data_root=c.data_root
            )
            if manifest.problems:
                self._log_problems(c, manifest)
            for note in manifest.notes:
                from radalign.utils.logging import get_logger

                get_logger().warning(f"manifest {c.manifest}: {note}")
            self.manifests[name] = manifest
        self.manifest = self.manifests[names[0]]
        vocabulary = self.config.vocabulary or _union(m.vocabulary for m in self.manifests.values())
        for name, c in zip(names, self.sources, strict=True):
            self.per_source[name] = self._source_datasets(name, c, self.manifests[name], vocabulary, stage)
        for split in ("train", "val", "test"):
            parts = [self.per_source[name][split] for name in names]
            self.datasets[split] = parts[0] if not self.multi_source else SourcesDataset(parts)
        if self.multi_source and stage in (None, "fit"):
            self._check_batch_sizes()
            from radalign.utils.logging import get_logger

            get_logger().info(
                "training sources: "
                + "; ".join(
                    f"{s.name} ({len(self.per_source[s.name]['train'])} {src.modality} train records, weight "
                    f"{s.weight:g}, {_without_report(self.per_source[s.name]['train'])} without a report)"
                    for s, src in zip(self.config.sources, self.sources, strict=True)
                )
            )

    def _source_datasets(
        self, name: str, c: DataConfig, manifest: Manifest, vocabulary: tuple[str, ...], stage: str | None
    ) -> dict[str, RadDataset]:
        cache = PreparedCache(c.cache_dir) if c.cache_dir is not None else None
        wanted = Modality.parse(c.modality)
        if cache is not None and wanted is Modality.XRAY:
            cache.check_covers(c.image_size, "loader.cache_dir" if not self.multi_source else f"source {name}")
        augment = build_sentence_augment(c)
        out: dict[str, RadDataset] = {}
        for split in ("train", "val", "test"):
            records = [r for r in manifest.split(split) if r.modality == wanted]
            train = split == "train"
            out[split] = RadDataset(
                records,
                vocabulary=vocabulary,
                image_transform=build_transform(c, train=train),
                tokenizer=self.tokenizer,
                max_length=c.max_length,
                sentence_augment=augment if train else None,
                report_sections=c.report_sections,
                require_report=c.require_report,
                cache=cache,
                image_choice=c.image_choice if train else "first",
                on_error=c.on_error,
                source=name,
            )
        if not out["val"].records and stage in (None, "fit"):
            from radalign.utils.logging import get_logger

            get_logger().info(
                f"manifest {c.manifest}: no '{c.modality}' records in the 'val' split: training runs without "
                "validation on it (rows with split=val give a validation loss to watch)"
            )
        if not out["train"].records and stage in (None, "fit"):
            raise DataError(
                f"manifest {c.manifest} has no usable '{c.modality}' records in the train split "
                f"({len(manifest.records)} records in all, {len(manifest.problems)} skipped as bad)"
                + (f"; it is the source {name!r} of loader.sources" if self.multi_source else "")
            )
        return out

    def _check_batch_sizes(self) -> None:
        sizes: dict[str, dict[int, str]] = {}
        for source, c in zip(self.config.sources, self.sources, strict=True):
            sizes.setdefault(c.modality, {}).setdefault(c.batch_size, source.name)
        for modality, given in sizes.items():
            if len(given) > 1:
                shown = ", ".join(f"{name}: {size}" for size, name in given.items())
                raise ConfigError(
                    f"loader.sources: the {modality} sources ask for different batch sizes ({shown}); the sources "
                    "of one modality share their batches, so give them one batch_size"
                )

    def _log_problems(self, c: DataConfig, manifest: Manifest, shown: int = 10) -> None:
        from radalign.data.manifest import problem_counts
        from radalign.utils.logging import get_logger

        problems = manifest.problems
        kinds = ", ".join(f"{count} {kind}" for kind, count in problem_counts(problems).most_common())
        lines = "\n  ".join(str(p) for p in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        get_logger().warning(
            f"manifest {c.manifest}: {len(problems)} rows left out as bad ({kinds}); "
            f"`radalign data check {c.manifest}` lists them all:\n  {lines}{more}"
        )

    def _world(self) -> tuple[int, int]:
        # the trainer is attached once fit starts; under DDP this process reads its own share
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _loader(self, split: str, train: bool) -> DataLoader:
        c = self.config
        if self.multi_source:
            return self._multi_source_loader(split, train)
        pad = getattr(self.tokenizer, "pad_token_id", 0) or 0
        generator = torch.Generator().manual_seed(c.seed)
        dataset = self.datasets[split]
        world, rank = self._world()
        sampler: Sampler | None
        if train:
            sampler = EpochSampler(len(dataset), c.seed, per_item_seeds=c.num_workers > 0, num_replicas=world,
                                   rank=rank)  # fmt: skip
        else:  # what Lightning's own sharding would give: in order, padded to an equal share
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=c.batch_size if train else (c.eval_batch_size or c.batch_size),
            sampler=sampler,
            drop_last=train and len(dataset) // world >= c.batch_size,
            num_workers=c.num_workers,
            collate_fn=Collate(pad_token_id=pad),
            worker_init_fn=seed_worker,
            generator=generator,
            persistent_workers=c.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _multi_source_loader(self, split: str, train: bool) -> DataLoader:
        c = self.config
        world, rank = self._world()
        dataset = self.datasets[split]
        assert isinstance(dataset, SourcesDataset)
        batch_sampler: Sampler
        if train:
            batch_sampler = WeightedSourceSampler(
                [len(d) for d in dataset.datasets],
                [s.weight for s in c.sources],
                [s.modality for s in self.sources],
                {s.modality: s.batch_size for s in self.sources},
                c.seed,
                mix=c.mix_modalities,
                per_item_seeds=c.num_workers > 0,
                num_replicas=world,
                rank=rank,
            )
        else:
            batch_sampler = EvalBatches(dataset, c.eval_batch_size or c.batch_size, world, rank)
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=c.num_workers,
            collate_fn=Collate(pad_token_id=getattr(self.tokenizer, "pad_token_id", 0) or 0),
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(c.seed),
            persistent_workers=c.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.datasets["val"].records:
            import warnings

            # setup() said it in radalign's words; Lightning's "Total length ... is zero" would only puzzle
            warnings.filterwarnings("ignore", message=r"Total length of `\w+` across ranks is zero")
            return []
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def _union(vocabularies: Any) -> tuple[str, ...]:
    """Every source's label names, in order of first appearance."""
    return tuple(dict.fromkeys(name for vocabulary in vocabularies for name in vocabulary))


def _without_report(dataset: RadDataset) -> int:
    return sum(1 for r in dataset.records if not (r.report or "").strip())


class EvalBatches(Sampler[list[int]]):
    """Validation batches of a multi-source run: in order, source by source (a batch never mixes two sources,
    so 2D and 3D stay apart), dealt out to the processes in turn, the last ones repeated so that every process
    gets the same number (as torch's DistributedSampler pads)."""

    def __init__(self, dataset: SourcesDataset, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.batches: list[list[int]] = []
        for start, part in zip(dataset.starts, dataset.datasets, strict=False):
            for first in range(0, len(part), batch_size):
                self.batches.append(list(range(start + first, start + min(first + batch_size, len(part)))))
        self.num_replicas, self.rank = num_replicas, rank

    def __len__(self) -> int:
        return -(-len(self.batches) // self.num_replicas) if self.batches else 0

    def __iter__(self) -> Iterator[list[int]]:
        if not self.batches:
            return iter(())
        padded = [self.batches[i % len(self.batches)] for i in range(len(self) * self.num_replicas)]
        return iter(padded[self.rank :: self.num_replicas])


class EpochSampler(Sampler[int | tuple[int, int]]):
    """Shuffles with a permutation seeded by (seed, epoch), so the order of any epoch can be re-created, and shares
    it out among ``num_replicas`` processes (DDP): process ``rank`` takes every ``num_replicas``-th item.

    radalign shards the training data itself rather than letting Lightning wrap this sampler: the wrapper reshuffles
    what this sampler yields and cannot skip into an epoch, so a resumed DDP run replayed its epoch from the start
    (tests/test_ddp.py). Every
    process gets the same number of items; the few left over (fewer than ``num_replicas``) sit the epoch out, which
    changes with the shuffle, instead of being repeated: a repeated sample would be its own false negative in a
    gathered contrastive batch.

    ``offset`` drops the first items of the next epoch's *global* order, which is how a resumed run continues
    mid-epoch with the same data order, on any number of processes: after t steps of batch b on W processes the
    consumed items are exactly the first t x b x W of the order.

    With ``per_item_seeds`` it yields ``(index, sample_seed)`` and the dataset draws that item's augmentation from
    ``sample_seed`` (``mixed_seed`` of seed, epoch and index): what keeps loader workers reproducible, since which
    worker reads an item, and what that worker's generator drew before, changes after a resume. Without workers the
    items are augmented in order in the main process from torch's global generator, whose state the checkpoint
    keeps.
    """

    def __init__(
        self, size: int, seed: int, *, per_item_seeds: bool = False, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} processes")
        self.size = size
        self.seed = seed
        self.per_item_seeds = per_item_seeds
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, handed_out: int, batch_size: int, num_replicas: int) -> None:
        """Continue epoch ``epoch`` after the ``handed_out`` batches of ``batch_size`` each of ``num_replicas``
        processes had trained on (the process count may differ from this run's)."""
        self.set_epoch(epoch)
        self.offset = handed_out * batch_size * num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        offset, self.offset = self.offset, 0
        rest = order[offset:]
        mine = rest[self.rank : len(rest) - len(rest) % self.num_replicas : self.num_replicas]
        if not self.per_item_seeds:
            return iter(mine)
        epoch = self.epoch  # seeds drawn lazily: an epoch of a large archive would otherwise hash every index up front
        return ((index, mixed_seed(self.seed, epoch, index)) for index in mine)

    def __len__(self) -> int:
        return self.size // self.num_replicas


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints (the ``_Stateful`` protocol).

    It counts the batches it has handed out; on load, its sampler (an ``EpochSampler``, or a multi-source
    ``WeightedSourceSampler`` as batch sampler) skips what the interrupted run had already trained on, on all its
    processes. (Lightning's fetcher does not hold a batch in advance when it saves a step checkpoint: every batch
    handed out was trained on; tests/test_training.py and tests/test_ddp.py check this against an uninterrupted
    run.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handed_out = 0

    @property
    def position(self) -> EpochSampler | WeightedSourceSampler:
        """The sampler that knows the data order: the batch sampler of a multi-source run, else the sampler."""
        if isinstance(self.batch_sampler, WeightedSourceSampler):
            return self.batch_sampler
        assert isinstance(self.sampler, EpochSampler)
        return self.sampler

    def __iter__(self):
        self.handed_out = 0
        for batch in super().__iter__():
            self.handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "handed_out": self.handed_out, "batches": len(self),
                "batch_size": self.batch_size or 1, "num_replicas": self.position.num_replicas}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["handed_out"] >= state.get("batches", len(self)):
            return  # the epoch was complete: Lightning starts the next one
        # checkpoints written before the loader recorded its process count and batch size came from one process
        self.position.resume(
            state["epoch"], state["handed_out"], state.get("batch_size", self.batch_size or 1),
            state.get("num_replicas", 1),
        )  # fmt: skip


class SkippedSamplesCallback(L.Callback):
    """Counts items skipped as unreadable and reports them at the end of every training epoch.

    The run continues unless more than ``max_fraction`` of the epoch's items were skipped: a few corrupt files
    in a hospital export should not end a run, a broken mount should.
    """

    def __init__(self, max_fraction: float = 0.05, show: int = 10) -> None:
        self.max_fraction = max_fraction
        self.show = show
        self.skipped: list[tuple[str, str]] = []
        self.seen = 0
        self.total_skipped = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.skipped += batch.get("skipped", [])
        self.seen += batch.get("batch_size", 0) + len(batch.get("skipped", []))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        count = len(self.skipped)
        self.total_skipped += count
        pl_module.log("data/skipped", float(count), on_epoch=True, on_step=False, reduce_fx="sum", sync_dist=True)
        if count:
            lines = "\n".join(f"  {i}: {reason}" for i, reason in self.skipped[: self.show])
            more = f"\n  ... and {count - self.show} more" if count > self.show else ""
            message = f"epoch {trainer.current_epoch}: skipped {count} of {self.seen} items:\n{lines}{more}"
            from radalign.utils.logging import get_logger

            get_logger().warning(message)
            if self.seen and count / self.seen > self.max_fraction:
                raise DataError(
                    f"{count} of {self.seen} items ({count / self.seen:.0%}) were unreadable in one epoch, more "
                    f"than loader.max_skip_fraction={self.max_fraction}. First problems:\n{lines}"
                )
        self.skipped, self.seen = [], 0
