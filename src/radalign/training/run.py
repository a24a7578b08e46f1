"""``pretrain(config, out)``: data module + method + Lightning Trainer, checkpoints, logs and the export.

The run folder holds everything a run produces:

    out/
      config.yaml            the resolved config (every default filled in)
      checkpoints/last.ckpt  Lightning checkpoints: a re-run of the same command resumes from last.ckpt
      logs/version_N/        metrics.csv (CSV logger) and TensorBoard events, one folder per invocation
      export/                model.safetensors + config.json (+ tokenizer/): ``radalign.load(out / "export")``
"""

from __future__ import annotations

import logging
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from radalign.data.datamodule import RadDataModule, SkippedSamplesCallback
from radalign.errors import ConfigError
from radalign.methods.registry import build_method
from radalign.training.config import PretrainConfig, resolve_precision
from radalign.training.export import export
from radalign.training.module import PretrainModule
from radalign.utils.logging import get_logger


@dataclass
class RunResult:
    out: Path
    export: Path
    checkpoint: Path | None
    steps: int
    metrics: dict[str, float]


def _progress_bar() -> L.Callback:
    from lightning.pytorch.callbacks import ProgressBar
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class StepProgressBar(ProgressBar):
        """One bar over the whole run's optimiser steps (not Lightning's per-epoch bar): loss, samples/s, ETA."""

        def __init__(self) -> None:
            super().__init__()
            self._enabled = True
            self._progress: Progress | None = None
            self._task: Any = None

        def disable(self) -> None:
            self._enabled = False

        def enable(self) -> None:
            self._enabled = True

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not self._enabled or not trainer.is_global_zero:
                return
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            self._progress = Progress(
                TextColumn("[bold]pre-train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps ·"),
                TimeElapsedColumn(),
                TextColumn("· ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=int(total), completed=trainer.global_step, stats="")

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            if self._progress is None:
                return
            metrics = trainer.callback_metrics
            parts = []
            for key, label, fmt in (
                ("train/loss", "loss", ".3f"),
                ("val/loss", "val", ".3f"),
                ("train/samples_per_s", "samples/s", ".1f"),
            ):
                if key in metrics:
                    parts.append(f"{label} {float(metrics[key]):{fmt}}")
            self._progress.update(self._task, completed=trainer.global_step, stats=" · ".join(parts))

        def _stop(self) -> None:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._stop()

        def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
            self._stop()

    return StepProgressBar()


class _DropAdverts(logging.Filter):
    """Lightning's rank-zero log advertises a cloud service on every run; the rest of its messages stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def _quiet_lightning(config: PretrainConfig) -> None:
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())
    # Raised inside Lightning's own pytree helper on every fit with recent torch: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if config.ema.modules:
        # EMA teachers stay in eval mode on purpose (no dropout, frozen BatchNorm statistics).
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def build_trainer(config: PretrainConfig, out: Path, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = config.trainer
    # every invocation (a first run, each resume) logs into its own version folder: nothing is overwritten
    version = f"version_{len(list((out / 'logs').glob('version_*')))}"
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=max(1, t.checkpoint_every_n_steps),
    )
    all_callbacks: list[L.Callback] = [checkpoint, SkippedSamplesCallback(config.loader.max_skip_fraction)]
    if t.progress:
        all_callbacks.append(_progress_bar())
    all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    all_callbacks += callbacks or []
    return L.Trainer(
        default_root_dir=out,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs if t.max_epochs is not None else (-1 if t.max_steps > 0 else 1),
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        sync_batchnorm=t.sync_batchnorm,
        precision=resolve_precision(t.precision),  # type: ignore[arg-type]
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        logger=[CSVLogger(out, name="logs", version=version), TensorBoardLogger(out, name="logs", version=version)],
        callbacks=all_callbacks,
        num_sanity_val_steps=0,
    )


def pretrain(
    config: PretrainConfig,
    out: str | Path,
    *,
    resume: bool = True,
    callbacks: list[L.Callback] | None = None,
) -> RunResult:
    """Pre-train ``config.method`` on ``config.loader.manifest``; resumes from ``out/checkpoints/last.ckpt``."""
    import yaml

    out = Path(out)
    if config.loader.manifest is None:
        raise ConfigError("no training data: set loader.manifest (CLI: --data MANIFEST)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    _quiet_lightning(config)
    data = RadDataModule(config.loader)
    method = build_method(config, tokenizer=data.tokenizer)
    module = PretrainModule(config, method)
    trainer = build_trainer(config, out, callbacks)
    last = out / "checkpoints" / "last.ckpt"
    ckpt_path = last if resume and last.is_file() else None
    log = get_logger()
    if ckpt_path is not None:
        log.info(f"resuming from {ckpt_path}")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects from it could run code
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as err:
        if ckpt_path is None:
            raise
        raise ConfigError(
            f"refused to resume from {ckpt_path}: it holds objects other than tensors and plain values, and loading "
            f"them could run code ({str(err).splitlines()[0]}). If you wrote it yourself, move it away to start "
            "afresh; never resume from a checkpoint of unknown origin"
        ) from err
    export_dir = export(method, config, out / "export", tokenizer=data.tokenizer)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    log.info(f"run {out}: {trainer.global_step} steps; export in {export_dir}")
    return RunResult(out, export_dir, last if last.is_file() else None, trainer.global_step, metrics)
