"""LightningDataModule: manifest -> splits -> datasets -> loaders, with deterministic per-worker seeding."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from radalign.data.cache import PreparedCache
from radalign.data.config import DataConfig
from radalign.data.dataset import Collate, RadDataset, seed_worker
from radalign.data.manifest import Manifest, load_manifest
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
    def __init__(self, config: DataConfig, tokenizer: Any = None) -> None:
        super().__init__()
        if config.manifest is None:
            raise ConfigError("loader.manifest is not set; pass --data MANIFEST (a .csv or .parquet manifest)")
        self.config = config
        self._tokenizer = tokenizer
        self.manifest: Manifest | None = None
        self.datasets: dict[str, RadDataset] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None and self.config.tokenizer is not None:
            from radalign.data.tokenization import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        c = self.config
        # File existence is checked here (cheap); decoding problems surface per item and are skipped/counted.
        self.manifest = load_manifest(
            c.manifest, require_report=c.require_report, on_error=c.on_error, data_root=c.data_root
        )
        if self.manifest.problems:
            self._log_problems()
        for note in self.manifest.notes:
            from radalign.utils.logging import get_logger

            get_logger().warning(f"manifest {c.manifest}: {note}")
        vocabulary = c.vocabulary or self.manifest.vocabulary
        cache = PreparedCache(c.cache_dir) if c.cache_dir is not None else None
        wanted = Modality.parse(c.modality)
        if cache is not None and wanted is Modality.XRAY:
            cache.check_covers(c.image_size, "loader.cache_dir")
        augment = build_sentence_augment(c)
        for split in ("train", "val", "test"):
            records = [r for r in self.manifest.split(split) if r.modality == wanted]
            train = split == "train"
            self.datasets[split] = RadDataset(
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
            )
        if not self.datasets["val"].records and stage in (None, "fit"):
            from radalign.utils.logging import get_logger

            get_logger().info(
                f"manifest {c.manifest}: no '{c.modality}' records in the 'val' split: training runs without "
                "validation (rows with split=val give a validation loss to watch)"
            )
        if not self.datasets["train"].records and stage in (None, "fit"):
            raise DataError(
                f"manifest {c.manifest} has no usable '{c.modality}' records in the train split "
                f"({len(self.manifest.records)} records in all, {len(self.manifest.problems)} skipped as bad)"
            )

    def _log_problems(self, shown: int = 10) -> None:
        from radalign.data.manifest import problem_counts
        from radalign.utils.logging import get_logger

        assert self.manifest is not None
        problems = self.manifest.problems
        kinds = ", ".join(f"{count} {kind}" for kind, count in problem_counts(problems).most_common())
        lines = "\n  ".join(str(p) for p in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        get_logger().warning(
            f"manifest {self.config.manifest}: {len(problems)} rows left out as bad ({kinds}); "
            f"`radalign data check {self.config.manifest}` lists them all:\n  {lines}{more}"
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        c = self.config
        pad = getattr(self.tokenizer, "pad_token_id", 0) or 0
        generator = torch.Generator().manual_seed(c.seed)
        dataset = self.datasets[split]
        # the trainer is attached once fit starts; under DDP this process reads its own share (see EpochSampler)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
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
    ``sample_seed`` (a hash of seed, epoch and index): what keeps loader workers reproducible, since which worker
    reads an item, and what that worker's generator drew before, changes after a resume. Without workers the items
    are augmented in order in the main process from torch's global generator, whose state the checkpoint keeps.
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

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        offset, self.offset = self.offset, 0
        rest = order[offset:]
        mine = rest[self.rank : len(rest) - len(rest) % self.num_replicas : self.num_replicas]
        if not self.per_item_seeds:
            return iter(mine)
        epoch = self.epoch  # seeds drawn lazily: an epoch of a large archive would otherwise hash every index up front
        return ((index, sample_seed(self.seed, epoch, index)) for index in mine)

    def __len__(self) -> int:
        return self.size // self.num_replicas


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one item of one epoch (SeedSequence: nearby inputs give unrelated seeds)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints (the ``_Stateful`` protocol).

    It counts the batches it has handed out; on load, the sampler skips the items the interrupted run had already
    trained on, on all its processes (so a run may resume on another number of them). (Lightning's fetcher does not
    hold a batch in advance when it saves a step checkpoint: every batch handed out was trained on;
    tests/test_training.py and tests/test_ddp.py check this against an uninterrupted run.)
    """

    sampler: EpochSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handed_out = 0

    def __iter__(self):
        self.handed_out = 0
        for batch in super().__iter__():
            self.handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "handed_out": self.handed_out, "batches": len(self),
                "batch_size": self.batch_size or 1, "num_replicas": self.sampler.num_replicas}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["handed_out"] >= state.get("batches", len(self)):
            return  # the epoch was complete: Lightning starts the next one
        # checkpoints written before the loader recorded its process count and batch size came from one process
        per_process = state["handed_out"] * state.get("batch_size", self.batch_size or 1)
        self.sampler.set_epoch(state["epoch"])
        self.sampler.offset = per_process * state.get("num_replicas", 1)


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
