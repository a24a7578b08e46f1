"""The one LightningModule that trains every method.

It weights the method's named losses by the stage schedule, builds AdamW with warm-up + cosine, recreates the
optimiser at a stage boundary when the config asks (PRIOR), updates EMA teachers after each optimiser step, and
logs losses, learning rate, throughput and method metrics. Devices, precision, strategy, accumulation and
clipping are Lightning's (``TrainerConfig``), so nothing here knows whether it runs on a CPU or 64 GPUs.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import lightning as L
import torch

from radalign.config import PretrainConfig, stage_started
from radalign.methods.base import Method
from radalign.utils.logging import get_logger


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step``: linear warm-up, then cosine or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PretrainModule(L.LightningModule):
    def __init__(self, config: PretrainConfig, method: Method, manifest_sha256: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.method = method
        self.manifest_sha256 = manifest_sha256  # saved with each checkpoint: a resume must read the same data
        self.save_hyperparameters({"config": config.to_dict()})
        self._started_stages: set[int] = set()
        self._optimizer_start_step = 0
        self._tick: float | None = None
        self.seen: Counter[str] = Counter()  # training samples this process has read, per source (in checkpoints)

    # -- training ---------------------------------------------------------------------------------------------
    def weighted_loss(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        weights = self.config.weights_at(self.global_step, self.current_epoch)
        terms = [weights.get(name, 1.0) * value for name, value in losses.items() if weights.get(name, 1.0) != 0]
        if not terms:
            raise RuntimeError(f"every objective has weight 0 at step {self.global_step}: {weights}")
        return torch.stack(terms).sum(), weights

    def method_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The method's losses on a batch; a multi-source step's ``parts`` (one batch per modality, 2D and 3D)
        are each given to the method, and each objective's losses on them are summed into the step's."""
        # The method sees the weights in force, so it can skip objectives that are off (PRIOR's stage 3 decoders).
        self.method.stage_weights = self.config.weights_at(self.global_step, self.current_epoch)
        self.method.step = int(self.global_step)
        parts = [part for part in batch.get("parts", [batch]) if part["batch_size"] > 0]
        losses: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, value in self.method.losses(part).items():
                losses[name] = losses[name] + value if name in losses else value
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["batch_size"] == 0:
            return None  # every item was unreadable; counted by SkippedSamplesCallback
        losses = self.method_losses(batch)
        total, _ = self.weighted_loss(losses)
        size = batch["batch_size"]
        self._count_sources(batch)
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=size)
        for name, value in self.method.metrics().items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return total

    def _count_sources(self, batch: dict[str, Any]) -> None:
        for part in batch.get("parts", [batch]):
            self.seen.update(part.get("source", []))
        if self.global_step % self.config.trainer.log_every_n_steps:
            return
        world = self.trainer.world_size
        for name in self.config.loader.source_names():  # the same names on every process: one collective each
            self.log(f"data/seen/{name}", float(self.seen[name]), on_step=True, on_epoch=False, reduce_fx="sum",
                     sync_dist=world > 1, batch_size=1)  # fmt: skip

    def on_train_end(self) -> None:
        seen = [dict(self.seen)]
        if self.trainer.world_size > 1:
            seen = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(seen, dict(self.seen))
        if self.trainer.is_global_zero and len(self.config.loader.source_names()) > 1:
            total = sum((Counter(s) for s in seen), Counter())
            get_logger().info("training samples seen per source: " + ", ".join(
                f"{name} {total[name]}" for name in self.config.loader.source_names()))  # fmt: skip

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["batch_size"] == 0:
            return
        total, _ = self.weighted_loss(self.method_losses(batch))
        self.log("val/loss", total, prog_bar=True, batch_size=batch["batch_size"], sync_dist=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for index, stage in enumerate(self.config.stages):
            if index in self._started_stages or not stage_started(
                stage, self.global_step, self.current_epoch, self.config.trainer.max_steps
            ):
                continue
            self._started_stages.add(index)
            reset = stage.reset_optimizer and self.global_step > 0
            if reset:
                # Fresh moments and a fresh schedule over the remaining steps, as PRIOR restarts at each stage.
                self._optimizer_start_step = self.global_step
                self.trainer.strategy.setup_optimizers(self.trainer)
            weights = self.config.weights_at(self.global_step, self.current_epoch)
            if self.trainer.is_global_zero:
                get_logger().info(
                    f"stage {index + 1} ({stage.name}) begins at step {self.global_step}: losses "
                    + ", ".join(f"{name} x {weight:g}" for name, weight in weights.items())
                    + ("; optimiser and schedule re-created" if reset else "")
                )
            self.log("train/stage", float(index + 1), batch_size=1)
        if self._tick is None:
            self._tick = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Wall time from one batch's end to the next one's, so data loading counts: what a user calls throughput.
        now = time.perf_counter()
        if self._tick is not None and isinstance(batch, dict) and batch.get("batch_size"):
            self.log("train/samples_per_s", batch["batch_size"] / max(now - self._tick, 1e-9), prog_bar=True)
        self._tick = now

    def on_validation_end(self) -> None:
        self._tick = None  # the validation pass is not part of the next step's time

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # Called once per optimiser step (not per micro-batch under accumulation): the EMA's natural clock.
        if self.method.ema is not None and self.trainer.training:
            self.method.ema.update(self.method)

    # -- optimiser --------------------------------------------------------------------------------------------
    def _stage_optim(self) -> tuple[float, int]:
        """Peak lr and warm-up of the optimiser in force: the last started stage that re-created it may set its own
        (PRIOR: stage 3 at half the lr with a longer warm-up); read from the started stages, so a resume agrees."""
        lr, warmup = self.config.optim.lr, self.config.optim.warmup_steps
        for index in sorted(self._started_stages):
            stage = self.config.stages[index]
            if stage.reset_optimizer:
                lr = stage.lr if stage.lr is not None else self.config.optim.lr
                warmup = stage.warmup_steps if stage.warmup_steps is not None else self.config.optim.warmup_steps
        return lr, warmup

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.config.optim
        base_lr, warmup_steps = self._stage_optim()
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, param in self.method.named_parameters():
            if not param.requires_grad or name.startswith("ema."):
                continue
            factor = 1.0
            for prefix, multiplier in optim.lr_multipliers.items():
                if name.startswith(prefix):
                    factor = multiplier
            no_decay = param.ndim <= 1 or name.endswith(".bias")  # norms, biases, temperatures: no weight decay
            decay = 0.0 if no_decay else optim.weight_decay
            for prefix, value in optim.weight_decays.items():
                if name.startswith(prefix):
                    decay = float(value)
            groups.setdefault((factor, decay), []).append(param)
        param_groups = [
            {"params": params, "lr": base_lr * factor, "weight_decay": decay}
            for (factor, decay), params in groups.items()
        ]
        optimizer = torch.optim.AdamW(param_groups, lr=base_lr, betas=optim.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches) - self._optimizer_start_step)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_lambda(step, warmup_steps, total, optim.schedule, optim.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        # Every process was seeded alike (the same initial weights everywhere); from here each draws its own
        # dropout masks and augmentations, as one process on the whole batch would. Rank 0 keeps the run's seed, so
        # one process trains exactly as before. A resume then restores each rank's own generators.
        if stage == "fit" and self.trainer.world_size > 1:
            L.seed_everything(self.config.trainer.seed + self.trainer.global_rank, workers=True, verbose=False)

    # -- checkpoint state -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # called on every rank (only global rank 0 writes): the generators of all of them go into the file
        states = [rng_state()]
        seen = [dict(self.seen)]
        if self.trainer.world_size > 1:
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, rng_state())
            seen = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(seen, dict(self.seen))
        checkpoint["radalign"] = {
            "started_stages": sorted(self._started_stages),
            "optimizer_start_step": self._optimizer_start_step,
            "rng": states[0],
            "rng_per_rank": states,
            "seen_per_rank": seen,
            "manifest_sha256": self.manifest_sha256,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("radalign", {})
        self._started_stages = set(state.get("started_stages", []))
        self._optimizer_start_step = int(state.get("optimizer_start_step", 0))
        # dropout and anything else on the global generators continues as if never stopped, on every rank
        per_rank = state.get("rng_per_rank") or ([state["rng"]] if "rng" in state else [])
        rank, world = self.trainer.global_rank, self.trainer.world_size
        seen = state.get("seen_per_rank") or []
        self.seen = Counter(seen[rank]) if rank < len(seen) else Counter()
        if rank < len(per_rank):  # a rank the checkpoint did not know keeps the seed setup() gave it
            set_rng_state(per_rank[rank])
        if per_rank and len(per_rank) != world and rank == 0:
            get_logger().warning(
                f"the checkpoint was written by {len(per_rank)} process(es), this run has {world}: the data order "
                "continues exactly, the random draws (dropout, augmentation) of the added or removed processes do not"
            )


def rng_state() -> dict[str, Any]:
    """Every global random generator's state, as tensors and plain values (what a weights-only load accepts)."""
    import random

    import numpy as np

    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
