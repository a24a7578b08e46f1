"""Pre-training throughput, peak memory and the data-loading share of step time (issue 4).

Two model sizes, batch 32, CLIP objective, on simulated radiographs read from the prepared cache:

* ``tiny``:  configs/methods/clip-tiny.yaml (ResNet-18 at 128 px, MiniLM with 4 of 6 layers frozen)
* ``paper``: configs/methods/clip.yaml with ResNet-50 at 224 px and a BERT-base-size text encoder (12 layers,
  768-d, the BERT vocabulary; randomly initialised because no hub is reachable here: same compute as BERT-base)

Each size runs in its own process so that its peak memory is its own. The data-loading share is the time the
training loop waits between one step's end and the next step's start (fetching the batch, plus Lightning's
own bookkeeping) over the whole step time; the loader is also timed alone. Target: under 10% with the cache.

    .venv/bin/python benchmarks/train_speed.py                      # both sizes on the CPU
    .venv/bin/python benchmarks/train_speed.py --sizes tiny --steps 20
    python benchmarks/train_speed.py --accelerator gpu --precision bf16-mixed --steps 30 --paper-steps 30
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH = 32
WARMUP_STEPS = 2  # first steps pay for allocator growth and lazy initialisation


def overrides(size: str, data: Path, cache: Path, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    common = {
        "loader.manifest": str(data),
        "loader.cache_dir": str(cache),
        "loader.batch_size": BATCH,
        "loader.num_workers": args.workers,
        "trainer.progress": False,
        "trainer.accelerator": args.accelerator,
        "trainer.precision": args.precision,
        "trainer.checkpoint_every_n_steps": 10_000,
        "trainer.log_every_n_steps": 1,
    }
    if size == "tiny":
        return "clip-tiny", {**common, "trainer.max_steps": args.steps}
    return "clip", {
        **common,
        "trainer.max_steps": args.paper_steps,
        "model.text.name": "tiny",
        "model.text.pooling": "cls",
        "model.text.tiny": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "max_position": 512},
        "optim.warmup_steps": 1,
    }


def run_one(size: str, data: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    from radalign.config import find_config, load_config
    from radalign.data.datamodule import RadDataModule
    from radalign.training.run import pretrain

    name, settings = overrides(size, data, cache, args)
    config = load_config(find_config(name), settings)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.step: list[float] = []
            self.wait: list[float] = []
            self._start = self._end = None

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()
            if self._end is not None:
                self.wait.append(self._start - self._end)

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._end = time.perf_counter()
            self.step.append(self._end - self._start)

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            # a validation pass between two steps is not the loader's wait (validation now runs every tenth of the
            # run, inside the timed steps)
            self._end = time.perf_counter()

    timer = StepTimer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        pretrain(config, Path(out), resume=False, callbacks=[timer])
    steps = timer.step[WARMUP_STEPS:]
    waits = timer.wait[WARMUP_STEPS - 1 :]  # wait[i] precedes step[i + 1]
    step_s, wait_s = statistics.mean(steps), statistics.mean(waits)

    # The loader alone, no model: what one batch costs to produce from the cache.
    module = RadDataModule(config.loader)
    module.setup("fit")
    batches = iter(module.train_dataloader())
    next(batches)  # worker start-up and first-touch costs are not per-batch costs
    timed = min(5, len(module.train_dataloader()) - 1)
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)
    loader_s = (time.perf_counter() - start) / max(timed, 1)

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GiB (Linux)
    peak_gpu = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None
    return {
        "size": size,
        "steps_timed": len(steps),
        "step_s": step_s,
        "wait_s": wait_s,
        "samples_per_s": BATCH / (step_s + wait_s),
        "data_share": wait_s / (step_s + wait_s),
        "loader_s_per_batch": loader_s,
        "peak_rss_gib": peak_rss,
        "peak_gpu_gib": peak_gpu,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def make_data(folder: Path, n: int) -> tuple[Path, Path]:
    from radalign.data.cache import CacheSettings, prepare_cache
    from radalign.data.manifest import load_manifest
    from radalign.data.simulate.generate import SimulationConfig, simulate

    manifest = simulate(SimulationConfig(n=n, seed=3, size=256, workers=2), folder / "sim", progress=False)
    cache = folder / "cache"
    prepare_cache(load_manifest(manifest).records, cache, CacheSettings(256, (1.5, 1.5, 1.5)), progress=False)
    return manifest, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,paper")
    parser.add_argument("--steps", type=int, default=12, help="steps of the tiny model")
    parser.add_argument("--paper-steps", type=int, default=5, help="steps of the paper-size model")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (0: in the main process)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="auto", help="auto = bf16-mixed where the GPU supports it, else 32")
    parser.add_argument("--n", type=int, default=160, help="simulated patients (training split is 80%%)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one size, result as JSON on the last line
        print(json.dumps(run_one(args.one, args.data, args.cache, args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = make_data(Path(tmp), args.n)
        for size in args.sizes.split(","):
            command = [sys.executable, __file__, "--one", size, "--data", str(data), "--cache", str(cache)]
            for flag in ("steps", "paper_steps", "workers", "accelerator", "precision"):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            print(f"running {size} ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{size} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\nCLIP pre-training, batch {BATCH}, {args.workers} loader workers, precision {args.precision}, "
          f"device {rows[0]['device']}; mean over steps after the first {WARMUP_STEPS}")  # fmt: skip
    print("| model | steps | samples/s | step (s) | loader wait (s) | data share | loader alone (s/batch) | peak mem |")
    print("|-------|------:|----------:|---------:|----------------:|-----------:|-----------------------:|---------:|")
    for r in rows:
        gpu = r["peak_gpu_gib"]
        memory = f"{gpu:.2f} GiB GPU" if gpu is not None else f"{r['peak_rss_gib']:.2f} GiB RSS"
        print(
            f"| {r['size']} | {r['steps_timed']} | {r['samples_per_s']:.1f} | {r['step_s']:.2f} | {r['wait_s']:.3f} "
            f"| {100 * r['data_share']:.1f}% | {r['loader_s_per_batch']:.3f} | {memory} |"
        )
    print("target: data share under 10% with the prepared cache")


if __name__ == "__main__":
    main()
