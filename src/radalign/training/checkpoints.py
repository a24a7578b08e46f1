"""Checkpoints that survive a kill, a full disk, a flipped bit and a moved run folder.

``RunCheckpoints`` saves ``checkpoints/step-00000123.ckpt`` every ``trainer.checkpoint_every_n_steps`` optimiser
steps and at the end of training. Each save is written next to its final name (same file system, so the rename is
atomic), flushed to disk, checksummed into ``step-00000123.ckpt.sha256`` (``sha256sum -c`` format) *before* the
rename, and only then renamed into place; the newest ``keep`` checkpoints stay. A kill at any moment therefore
leaves the previous checkpoint and its checksum intact.

``resumable_checkpoint`` picks the newest checkpoint whose checksum verifies and names every newer one it passed
over and why, so a damaged file costs the steps since the previous save, never the run. File names carry the step
and no absolute path, so a run folder moved or copied elsewhere resumes where it was.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

from radalign.utils.files import fsync_dir, write_atomic
from radalign.utils.logging import get_logger

_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
# Written by radalign before checkpoints were checksummed: used when nothing newer verifies, with a note.
_LEGACY = "last.ckpt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def commit_checkpoint(written: Path, final: Path) -> None:
    """Make the fully written ``written`` (in ``final``'s folder) the checkpoint ``final``: flush, checksum, rename."""
    with written.open("rb+") as f:
        os.fsync(f.fileno())
    write_atomic(final.with_name(final.name + ".sha256"), f"{sha256_of(written)}  {final.name}\n".encode())
    os.replace(written, final)
    fsync_dir(final.parent)


def step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the folder's step checkpoints, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found, reverse=True)


def verify(path: Path) -> str | None:
    """Why ``path`` cannot be trusted, or None when its recorded checksum matches."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty (the save was interrupted)"
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return f"no checksum file {sidecar.name} (the save was interrupted)"
    recorded = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not recorded or recorded[0] != sha256_of(path):
        return f"its content does not match the checksum in {sidecar.name} (damaged after it was written)"
    return None


def resumable_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` that verifies; each newer one passed over is named with the reason and
    moved to ``damaged/`` (kept for inspection, and out of the way: left in place, a damaged checkpoint of a later
    step would count as one of the newest two and have a good one pruned)."""
    log = get_logger()
    rejected: list[str] = []
    chosen: Path | None = None
    damaged: list[Path] = []
    for _, path in step_checkpoints(folder):
        reason = verify(path)
        if reason is None:
            chosen = path
            break
        rejected.append(f"{path} is not used: {reason}")
        damaged.append(path)
    if damaged and rank_zero_only.rank == 0:  # under DDP every rank looks; one moves the files
        aside = folder / "damaged"
        aside.mkdir(exist_ok=True)
        for path in damaged:
            for file in (path, path.with_name(path.name + ".sha256")):
                if file.exists():
                    os.replace(file, aside / file.name)
        rejected.append(f"kept in {aside}")
    if chosen is not None:
        if rejected:
            log.warning(f"resuming from the previous good checkpoint {chosen.name}: " + "; ".join(rejected))
        return chosen
    legacy = folder / _LEGACY
    if legacy.is_file() and legacy.stat().st_size > 0:
        log.info(f"{legacy} was written before checkpoints carried checksums: resuming from it unverified")
        return legacy
    if rejected:
        log.warning("no checkpoint verifies, starting from step 0: " + "; ".join(rejected))
    return None


def set_aside(folder: Path, also: Sequence[Path] = ()) -> Path | None:
    """A fresh start in a folder with checkpoints moves them, and the files in ``also`` (the earlier run's
    config.yaml and export), to ``superseded/<time>/`` rather than deleting them."""
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    files += [p for p in also if p.exists()]
    if not files:
        return None
    target = folder / "superseded" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        os.replace(path, target / path.name)
    get_logger().info(f"starting afresh: the earlier run's checkpoints and files are kept in {target}")
    return target


class RunCheckpoints(L.Callback):
    """Saves every ``every_n_steps`` optimiser steps and at the end of training, keeping the newest ``keep``."""

    def __init__(self, folder: Path, every_n_steps: int, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder, self.every_n_steps, self.keep = folder, max(1, every_n_steps), keep
        self._saved_step: int | None = None

    @property
    def newest(self) -> Path | None:
        found = step_checkpoints(self.folder)
        return found[0][1] if found else None

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._saved_step:
            return
        final = self.folder / checkpoint_name(step)
        written = self.folder / f".{final.name}.partial"
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
        # every rank takes part, global rank zero writes; weights_only=False here means "optimiser and loops too"
        trainer.save_checkpoint(written, weights_only=False)
        if trainer.is_global_zero:
            commit_checkpoint(written, final)
            self._prune()
        self._saved_step = step

    def _prune(self) -> None:
        for _, path in step_checkpoints(self.folder)[self.keep :]:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed run's step is already on disk; saving it again mid-accumulation would lose the half-step
        self._saved_step = trainer.global_step
        if trainer.is_global_zero and self.folder.is_dir():
            for leftover in [*self.folder.glob(".*.partial"), *self.folder.glob(".*.tmp")]:
                leftover.unlink(missing_ok=True)  # a save that was killed before its rename

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # global_step has already counted this batch's optimiser step; under accumulation it repeats until the next
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)
