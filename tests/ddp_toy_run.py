"""A tiny pre-training under Lightning DDP on the CPU (gloo), run as a script by tests/test_ddp.py.

Lightning's "ddp" strategy starts the other ranks by re-running this command, so the toy method must be
registered at import time here, not in a test module. Each rank writes what it saw (BatchNorm statistics, the
ids of the samples it trained on) to ``RECORD/rank-R.json`` so the test can compare ranks and runs.

    python tests/ddp_toy_run.py MANIFEST RUN RECORD [--sync-batchnorm] [--devices 2] [--steps 4] [--stop-at N]
        [--second-source MANIFEST]   (two weighted sources, 3:1, instead of one manifest)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch import nn

from radalign.methods.base import Method
from radalign.methods.registry import register


@register("ddp-toy")
class DdpToy(Method):
    """Pixels -> linear -> BatchNorm (momentum 1: running stats = the last batch's) -> dropout -> 4-d embedding."""

    name = "ddp-toy"
    objective_names = ("fit",)

    def __init__(self, config, tokenizer=None, *, for_inference=False):
        super().__init__(config, tokenizer, for_inference=for_inference)
        self.encoder = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(64, 6))
        self.norm = nn.BatchNorm1d(6, momentum=1.0)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(6, 4))
        self.seen: list[str] = []
        self.batch_means: list[list[float]] = []

    def losses(self, batch):
        features = self.encoder(batch["image"])
        if self.training:  # validation batches run through here too
            self.seen += list(batch["id"])
            self.batch_means.append(features.detach().mean(dim=0).tolist())
        z = self.head(self.norm(features))
        target = torch.nan_to_num(batch["labels"][:, :4], nan=0.0).clamp_min(0)
        return {"fit": ((z - target) ** 2).mean()}

    def encode_images(self, images):
        return nn.functional.normalize(self.head(self.norm(self.encoder(images))), dim=-1)


class _Record(L.Callback):
    def __init__(self, out: Path, stop_at: int | None) -> None:
        self.out, self.stop_at = out, stop_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.stop_at is not None and trainer.global_step == self.stop_at:
            self._write(trainer, module)
            os._exit(17)  # a crash: no teardown, no export; the checkpoint of step stop_at is on disk

    def on_train_end(self, trainer, module):
        self._write(trainer, module)

    def _write(self, trainer, module):
        method = module.method
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "norm_type": type(method.norm).__name__,
            "running_mean": method.norm.running_mean.tolist(),
            "batch_means": method.batch_means,
            "seen": method.seen,
            "torch_rng": torch.get_rng_state()[:32].tolist(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    from radalign.config import PretrainConfig, from_dict
    from radalign.training.run import pretrain

    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("run", type=Path)
    parser.add_argument("record", type=Path)
    parser.add_argument("--sync-batchnorm", action="store_true")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--second-source", default=None)
    args = parser.parse_args()
    data = {"manifest": args.manifest}
    if args.second_source:
        data = {"sources": [{"manifest": args.manifest, "name": "first", "weight": 3.0},
                            {"manifest": args.second_source, "name": "second", "weight": 1.0}]}  # fmt: skip
    config = from_dict(
        PretrainConfig,
        {
            "method": "ddp-toy",
            "objectives": {"fit": {"weight": 1.0}},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "loader": {**data, "tokenizer": None, "image_size": 32, "batch_size": args.batch_size,
                       "preset": "none", "require_report": False},
            "trainer": {"max_steps": args.steps, "progress": False, "checkpoint_every_n_steps": 1,
                        "log_every_n_steps": 1, "accelerator": args.accelerator, "devices": args.devices,
                        "strategy": "ddp" if args.devices > 1 else "auto", "sync_batchnorm": args.sync_batchnorm},
        },
    )  # fmt: skip
    pretrain(config, args.run, callbacks=[_Record(args.record, args.stop_at)])


if __name__ == "__main__":
    main()
