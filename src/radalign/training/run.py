"""``pretrain(config, out)``: data module + method + Lightning Trainer, checkpoints, logs and the export.

The run folder holds everything a run produces:

    out/
      config.yaml            the resolved config (every default filled in)
      checkpoints/           step-N.ckpt + step-N.ckpt.sha256, the newest two: a re-run of the same command resumes
                             from the newest one that verifies (training/checkpoints.py)
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
from lightning.fabric.utilities.rank_zero import rank_zero_only

from radalign.config.loading import config_changes
from radalign.config.pretrain import RESUMABLE_CHANGES, PretrainConfig
from radalign.data.datamodule import RadDataModule, SkippedSamplesCallback
from radalign.errors import ConfigError, DataError
from radalign.methods.registry import build_method
from radalign.training.checkpoints import RunCheckpoints, resumable_checkpoint, set_aside, sha256_of
from radalign.training.export import export
from radalign.training.module import PretrainModule
from radalign.utils.files import write_atomic
from radalign.utils.logging import get_logger


@dataclass
class RunResult:
    out: Path
    export: Path
    checkpoint: Path | None
    steps: int
    metrics: dict[str, float]
    already_complete: bool = False  # nothing was trained or written: the run had finished before


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


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 mixed precision where the GPU supports it, else full float32."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def build_trainer(config: PretrainConfig, out: Path, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = config.trainer
    # every invocation (a first run, each resume) logs into its own version folder: nothing is overwritten
    version = f"version_{len(list((out / 'logs').glob('version_*')))}"
    checkpoint = RunCheckpoints(out / "checkpoints", t.checkpoint_every_n_steps)
    all_callbacks: list[L.Callback] = [checkpoint, SkippedSamplesCallback(config.loader.max_skip_fraction)]
    if t.progress:
        all_callbacks.append(_progress_bar())
    all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    all_callbacks += callbacks or []
    interval = t.val_check_interval
    if interval is None and t.max_steps > 0:
        # every tenth of the run, counted in batches: per-epoch validation would run after every step of a small
        # dataset (one batch an epoch) and almost never on a large one
        interval = max(1, t.max_steps * t.accumulate_grad_batches // 10)
    trainer = L.Trainer(
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
        val_check_interval=interval,
        check_val_every_n_epoch=None if isinstance(interval, int) else 1,  # an int interval counts across epochs
        deterministic=t.deterministic,
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        enable_checkpointing=False,  # RunCheckpoints saves; Lightning's own saver would add a second, unchecked copy
        use_distributed_sampler=False,  # the datamodule shards (EpochSampler): a wrapped sampler cannot resume
        logger=[CSVLogger(out, name="logs", version=version), TensorBoardLogger(out, name="logs", version=version)],
        callbacks=all_callbacks,
        num_sanity_val_steps=0,
    )
    if t.sync_batchnorm and trainer.world_size > 1 and not isinstance(trainer.accelerator, CUDAAccelerator):
        raise ConfigError(
            f"trainer.sync_batchnorm: true needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation, and this "
            f"run has {trainer.world_size} processes on {type(trainer.accelerator).__name__}. Set "
            "--trainer.sync_batchnorm false for CPU runs (each process then normalises with its own batch)"
        )
    return trainer


def _read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The run config and data digest a checkpoint was written with, read without unpickling any object."""
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects from it could run code. mmap: the
        # tensors stay on disk, only the small dictionaries are read.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"refused to resume from {path}: it holds objects other than tensors and plain values, and loading "
            f"them could run code ({str(err).splitlines()[0]}). If you wrote it yourself, move it away to start "
            "afresh; never resume from a checkpoint of unknown origin"
        ) from err
    return {
        "config": (state.get("hyper_parameters") or {}).get("config"),
        "manifest_sha256": (state.get("radalign") or {}).get("manifest_sha256"),
        "global_step": int(state.get("global_step", 0)),
    }


def _check_resumable(
    path: Path, meta: dict[str, Any], config: PretrainConfig, manifest_sha256: str, allow_changes: bool
) -> dict[str, tuple[Any, Any]]:
    """A resume must continue the run that wrote the checkpoint: the same config (bar RESUMABLE_CHANGES) and the
    same manifest content. Otherwise config.yaml and the export would claim values the early steps never used.
    Returns every change (the allowed ones included), so the caller can record them."""
    every = config_changes(meta["config"], config.to_dict()) if meta["config"] is not None else {}
    changes = {k: v for k, v in every.items() if k not in RESUMABLE_CHANGES}
    if meta["manifest_sha256"] not in (None, manifest_sha256):
        was, now = meta["manifest_sha256"], manifest_sha256
        changes["loader.manifest (its content)"] = (f"sha256 {was[:12]}…", f"sha256 {now[:12]}…")
    if not changes:
        return every
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if "method" in changes:  # another method's weights do not fit this checkpoint: no flag can make that a resume
        was, now = changes["method"]
        raise ConfigError(
            f"refused to resume from {path}: it is a {was} run and this command trains {now}; another method cannot "
            "continue it. Write to a new --out folder (or pass --resume false to start afresh in this one, the "
            "earlier run kept in checkpoints/superseded/)"
        )
    if allow_changes:
        get_logger().warning(f"resuming {path} with changed settings, as asked: {listed}")
        return {**every, **changes}
    raise ConfigError(
        f"refused to resume from {path}: this command changes what the run trains with ({listed}). Run with the "
        "settings the run started with (its config.yaml), write to a new --out folder, or pass "
        "--allow-config-change true to continue with the new values deliberately"
    )


def _completed(out: Path, checkpoint: Path, step: int, config: PretrainConfig) -> RunResult | None:
    """A run whose newest checkpoint reached ``trainer.max_steps`` and whose export exists is done: say so and
    leave it as it is (re-exporting would rewrite a finished run's files)."""
    target = config.trainer.max_steps
    if target <= 0 or step < target or not (out / "export" / "model.safetensors").is_file():
        return None
    get_logger().info(
        f"run {out} is already complete: {step} of {target} steps, export in {out / 'export'}. To train it longer, "
        "raise --trainer.max_steps (the run resumes); to start again, pass --resume false or a new --out"
    )
    return RunResult(out, out / "export", checkpoint, step, {}, already_complete=True)


def _refuse_foreign_run(out: Path, config: PretrainConfig) -> None:
    """A folder whose config.yaml names another run, with no checkpoint to resume, is not this run's to overwrite."""
    path = out / "config.yaml"
    if not path.is_file():
        return
    import yaml

    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        recorded = None
    if not isinstance(recorded, dict):
        return
    changes = {k: v for k, v in config_changes(recorded, config.to_dict()).items() if k not in RESUMABLE_CHANGES}
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:8])
    more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
    raise ConfigError(
        f"refused to write into {out}: it holds another run (its config.yaml differs: {listed}{more}) and no "
        "checkpoint to resume. Write to a new --out folder, or pass --resume false to start afresh there (the "
        "earlier config.yaml and export are kept in checkpoints/superseded/)"
    )


def _record_config(out: Path, config: PretrainConfig, resumed_step: int | None, changes: dict[str, Any]) -> None:
    """config.yaml is what the run started with and is never rewritten; a resume with changed settings records
    the new config beside it, named for the step it took effect."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if resumed_step is None or not (out / "config.yaml").is_file():
        write_atomic(out / "config.yaml", text)
    elif changes:
        write_atomic(out / f"config.resumed-step{resumed_step:08d}.yaml", text)


def data_fingerprint(config: PretrainConfig) -> str:
    """What a resume checks it reads the same data by: the manifest's sha256, or for several sources a sha256
    over each source's name and manifest hash."""
    import hashlib

    lines = []
    for name, source in zip(config.loader.source_names(), config.loader.source_list(), strict=True):
        path = Path(source.manifest)  # type: ignore[arg-type]
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist; pass the path of a .csv or .parquet manifest")
        lines.append(f"{name} {sha256_of(path)}")
    if not config.loader.sources:
        return lines[0].split(" ", 1)[1]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def check_sources(method: Any, data: RadDataModule) -> None:
    """Refuse, before training, data the method cannot use: samples without reports for a method that needs one,
    images of a kind (2D / 3D) its encoder does not take; the message names the source."""
    for name, splits in data.per_source.items():
        records = splits["train"].records
        modality = records[0].modality.value if records else None
        if modality is not None and modality not in method.modalities():
            raise ConfigError(
                f"source {name!r} holds {modality} images, but {method.config.method}'s image encoder "
                f"({method.config.model.image.name}) takes {', '.join(sorted(method.modalities()))} only; use an "
                "encoder for that kind (a name ending in _3d for CT volumes) or leave the source out"
            )
        without = sum(1 for r in records if not (r.report or "").strip())
        if without and not method.label_only_samples and data.config.tokenizer is not None:  # no tokenizer: no text
            raise ConfigError(
                f"source {name!r} has {without} training records without a report (image-label records), and "
                f"{method.config.method} needs a report for every sample; train them with a method that makes "
                "text from labels (umcl), or set require_report: true on the source to leave them out"
            )


def pretrain(
    config: PretrainConfig,
    out: str | Path,
    *,
    resume: bool = True,
    allow_config_change: bool = False,
    callbacks: list[L.Callback] | None = None,
) -> RunResult:
    """Pre-train ``config.method`` on ``config.loader.manifest`` into ``out``.

    Resumes from the newest valid checkpoint in ``out/checkpoints/`` when its config matches (bar
    ``RESUMABLE_CHANGES``, or any change with ``allow_config_change``); returns at once, touching nothing, when that
    checkpoint already reached ``trainer.max_steps``. ``resume=False`` moves the earlier checkpoints, config.yaml
    and export to ``checkpoints/superseded/<time>/`` and starts afresh. ``out/config.yaml`` is the config the run
    started with and is never rewritten.
    """
    out = Path(out)
    if config.loader.manifest is None and not config.loader.sources:
        raise ConfigError("no training data: set loader.manifest (CLI: --data MANIFEST) or list loader.sources")
    manifest_sha256 = data_fingerprint(config)
    manifest = Path(config.loader.manifest) if config.loader.manifest is not None else None
    folder = out / "checkpoints"
    log = get_logger()
    first_process = rank_zero_only.rank == 0  # under DDP every process runs this function; one writes shared files
    ckpt_path = resumable_checkpoint(folder) if resume else None
    changes: dict[str, tuple[Any, Any]] = {}
    resumed_step: int | None = None
    if ckpt_path is not None:
        meta = _read_checkpoint_meta(ckpt_path)
        resumed_step = meta["global_step"]
        changes = _check_resumable(ckpt_path, meta, config, manifest_sha256, allow_config_change)
        done = _completed(out, ckpt_path, meta["global_step"], config)  # already verified: not hashed again
        if done is not None:
            return done
        log.info(f"resuming from {ckpt_path}")
    elif not resume:
        if first_process:
            set_aside(folder, also=(out / "config.yaml", out / "export"))
    else:
        _refuse_foreign_run(out, config)
    _quiet_lightning(config)
    trainer = build_trainer(config, out, callbacks)  # before anything is written: it checks the trainer settings
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    if first_process:  # start-up takes a while (text encoder, manifest checks): say what is going on
        log.info(
            f"{'resuming' if ckpt_path else 'starting'} {config.method} in {out}: checking "
            f"{manifest or ', '.join(config.loader.source_names())} and building the model "
            f"({config.model.image.name} + {config.model.text.name})"
        )
    data = RadDataModule(config.loader)
    method = build_method(config, tokenizer=data.tokenizer)
    data.setup("fit")
    check_sources(method, data)  # data the method cannot use is refused before anything is written
    if first_process:
        _record_config(out, config, resumed_step, changes)
    module = PretrainModule(config, method, manifest_sha256=manifest_sha256)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    export_dir = out / "export"
    if trainer.is_global_zero:  # one writer of the shared export, written whole and renamed into place
        export(method, config, export_dir, tokenizer=data.tokenizer)
    trainer.strategy.barrier("radalign-export")  # no process returns an export that is not there yet
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        log.info(f"run {out}: {trainer.global_step} steps; export in {export_dir}")
    newest = next((c.newest for c in trainer.callbacks if isinstance(c, RunCheckpoints)), None)  # type: ignore[attr-defined]
    return RunResult(out, export_dir, newest, trainer.global_step, metrics)
