"""Several training sources in one run: their datasets as one, and batches drawn from them by weight.

A source is a manifest with a sampling weight and its own loader settings (``loader.sources``, docs/training.md):
an image-report archive beside an image-label one (MIMIC-CXR and CheXpert), or 2D radiographs beside 3D CT.

Decisions:
- Sources are grouped by modality, since a 2D image and a 3D volume cannot be stacked. Each batch of a group is
  drawn by weight: every slot picks its source with probability weight / (the group's total weight), so the
  share of a source in training is its weight whatever the sizes (a small source is repeated, a large one
  subsampled). ``mix_modalities: both`` gives every optimiser step one batch of each group (the collate hands
  them to the engine as ``parts``); ``alternate`` gives the steps to the groups in turn.
- Within a source the items come in the order of a seeded permutation, reshuffled each time the source is used
  up: no item repeats before every item of its source has been seen once, nor twice in one batch across the
  reshuffle (for a source of at least two batches' worth of items).
- The whole stream is a function of the seed and the global batch number, computed for all processes together:
  process r of W takes slots [r x B, (r + 1) x B) of each global batch, so no two processes read the same item
  and every process gets the same number of batches. A resume replays the cheap part (which source each slot
  takes) up to its batch; nothing is read twice and nothing is skipped. A run resumed on another number of
  processes continues from the right place in the stream but composes its batches differently.
- An epoch is as many steps as one pass over all the sources' records would take; with weights, some sources
  are seen more than once in it and others less.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from radalign.data.dataset import RadDataset, mixed_seed


class SourcesDataset(Dataset):
    """The datasets of several sources as one: item ``i`` (or ``(i, seed)``) of the concatenation."""

    def __init__(self, datasets: Sequence[RadDataset]) -> None:
        self.datasets = list(datasets)
        self.starts = [0]
        for dataset in self.datasets:
            self.starts.append(self.starts[-1] + len(dataset))

    @property
    def records(self) -> list:
        return [record for dataset in self.datasets for record in dataset.records]

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Flat index -> (source number, index in that source)."""
        source = bisect.bisect_right(self.starts, index) - 1
        return source, index - self.starts[source]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index, seed = key if isinstance(key, tuple) else (key, None)
        source, local = self.locate(index)
        return self.datasets[source][local if seed is None else (local, seed)]


class WeightedSourceSampler(Sampler[list[Any]]):
    """Yields this process's batches of flat ``SourcesDataset`` indices (or ``(index, seed)`` pairs with
    ``per_item_seeds``), drawn from the sources by weight, group by group (see the module docstring).

    ``sizes``, ``weights`` and ``groups`` have one entry per source (``groups``: the modality); ``batch_sizes``
    maps each group to its per-process batch size.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        groups: Sequence[str],
        batch_sizes: dict[str, int],
        seed: int,
        *,
        mix: str = "both",
        per_item_seeds: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} processes")
        if not (len(sizes) == len(weights) == len(groups)) or not sizes:
            raise ValueError("one size, weight and group per source")
        empty = [i for i, size in enumerate(sizes) if size <= 0]
        if empty:
            raise ValueError(f"source {empty[0]} has no items")
        self.sizes, self.weights, self.groups = list(sizes), [float(w) for w in weights], list(groups)
        self.group_names = list(dict.fromkeys(groups))  # in the order of the sources
        self.batch_sizes = dict(batch_sizes)
        self.seed, self.mix, self.per_item_seeds = seed, mix, per_item_seeds
        self.num_replicas, self.rank = num_replicas, rank
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.members = {g: [i for i, name in enumerate(groups) if name == g] for g in self.group_names}
        self.epoch = 0
        self.offset = 0  # batches of the next epoch to skip (a resume)
        self._cursor = (0, [0] * len(self.sizes))  # (global batch, items used per source) reached so far
        self._perms: dict[tuple[int, int], list[int]] = {}

    # -- the stream -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        per_step = [self.batch_sizes[g] for g in self.group_names]
        step = sum(per_step) if self.mix == "both" else sum(per_step) / len(per_step)
        return max(1, round(sum(self.sizes) / (step * self.num_replicas)))

    def active_groups(self, batch: int) -> list[str]:
        if self.mix == "both" or len(self.group_names) == 1:
            return self.group_names
        return [self.group_names[batch % len(self.group_names)]]

    def slot_sources(self, batch: int, group: str) -> list[int]:
        """The source of every slot of global batch ``batch`` in ``group`` (all processes' slots, in order)."""
        members = self.members[group]
        slots = self.batch_sizes[group] * self.num_replicas
        if len(members) == 1:
            return [members[0]] * slots
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, batch, self.group_names.index(group)))
        probs = torch.tensor([self.weights[i] for i in members], dtype=torch.float64)
        picks = torch.multinomial(probs, slots, replacement=True, generator=generator)
        return [members[i] for i in picks.tolist()]

    def _used_before(self, batch: int) -> list[int]:
        """Items used per source by global batches 0 .. batch - 1 (replayed from the nearest known point)."""
        known, used = self._cursor
        if batch < known:
            known, used = 0, [0] * len(self.sizes)
        used = list(used)
        for b in range(known, batch):
            for group in self.active_groups(b):
                for source in self.slot_sources(b, group):
                    used[source] += 1
        self._cursor = (batch, used)
        return used

    def _item(self, source: int, position: int) -> Any:
        cycle, at = divmod(position, self.sizes[source])
        index = self.starts[source] + self._permutation(source, cycle)[at]
        if not self.per_item_seeds:
            return index
        return index, mixed_seed(self.seed, cycle * len(self.sizes) + source, index)

    def _permutation(self, source: int, cycle: int) -> list[int]:
        """The order of ``source``'s items in its ``cycle``-th pass: a seeded shuffle whose first k items avoid the
        previous pass's last k (k = the slots of a global batch), so a batch that straddles the reshuffle never
        holds one item twice (a duplicate would be its own false negative). A source smaller than 2k cannot
        avoid it and is shuffled plainly. Each pass depends on the one before: built upwards from the newest
        pass kept (a loop, not a recursion, for runs of many passes)."""
        if (source, cycle) in self._perms:
            return self._perms[(source, cycle)]
        known = [c for (s, c) in self._perms if s == source and c < cycle]
        first = max(known) + 1 if known else 0
        size, k = self.sizes[source], self.batch_sizes[self.groups[source]] * self.num_replicas
        for c in range(first, cycle + 1):
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, source, c, 1))
            order = torch.randperm(size, generator=generator).tolist()
            if c > 0 and size >= 2 * k:
                tail = set(self._perms[(source, c - 1)][-k:])
                head = [i for i in order if i not in tail][:k]
                taken = set(head)
                order = head + [i for i in order if i not in taken]
            self._perms[(source, c)] = order
            # keep the two newest passes of each source: the stream only moves forward (a rewind rebuilds)
            self._perms.pop((source, c - 2), None)
        return self._perms[(source, cycle)]

    def batch(self, batch: int, used: list[int]) -> list[Any]:
        """This process's items of global batch ``batch``; advances ``used`` by all processes' items."""
        mine: list[Any] = []
        for group in self.active_groups(batch):
            size = self.batch_sizes[group]
            for slot, source in enumerate(self.slot_sources(batch, group)):
                if self.rank * size <= slot < (self.rank + 1) * size:
                    mine.append(self._item(source, used[source]))
                used[source] += 1
        return mine

    def __iter__(self) -> Iterator[list[Any]]:
        length = len(self)
        first = self.epoch * length + self.offset
        self.offset = 0
        used = self._used_before(first)
        for b in range(first, (self.epoch + 1) * length):
            items = self.batch(b, used)
            self._cursor = (b + 1, list(used))
            yield items

    # -- the ResumableLoader protocol -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, handed_out: int, batch_size: int, num_replicas: int) -> None:
        """Continue epoch ``epoch`` after the ``handed_out`` batches each process had trained on."""
        self.set_epoch(epoch)
        self.offset = handed_out
