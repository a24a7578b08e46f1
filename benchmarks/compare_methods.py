"""Methods compared on the simulated data: same tiny backbone, data and step budget; `quick` protocol (issues 6, 7).

Each method's ``-tiny`` config (ResNet-18 at 128 px, the bundled MiniLM with 4 of 6 layers frozen, batch 32) is
pre-trained for ``--steps`` steps per seed on the demo's simulated data (1,000 patients, 75/5/20 split), then
evaluated under ``quick`` on the test split: zero-shot AUROC, image->report R@10, linear probe at 1% and 100%,
linear segmentation Dice, detection mAP and the pointing game. Rows are methods; each cell is the mean over
pre-training seeds ± their standard deviation (with one seed: the task's own interval or evaluation-seed std).

Every run is its own process and is skipped when its output exists, so an interrupted comparison resumes. A run
in progress holds a lock file (``<run>/.lock``), so several copies of the command share the work: on 2 cores,
two copies with ``OMP_NUM_THREADS=1`` finish sooner than one with two threads (and a run killed mid-way leaves its
lock behind: delete it to run that one again):

    .venv/bin/python benchmarks/compare_methods.py --out bench_out/compare                # 6 methods x 2 seeds
    .venv/bin/python benchmarks/compare_methods.py --methods clip,gloria --seeds 0 --steps 50   # a quick look

On 2 CPU cores one method and seed takes about 6-9 min of pre-training and 4-5 min of evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ["zero_shot", "retrieval", "linear_probe", "segmentation", "detection", "grounding"]
OVERRIDES = {"tasks.linear_probe.fractions": [0.01, 1.0], "tasks.segmentation.heads": ["linear"]}
# (column title, task, metric key): the localized tasks are the last three
COLUMNS = [
    ("zero-shot AUROC", "zero_shot", "auroc"),
    ("i2t R@10", "retrieval", "i2t_R@10"),
    ("LP 1%", "linear_probe", "auroc@1%"),
    ("LP 100%", "linear_probe", "auroc@100%"),
    ("seg. Dice (linear)", "segmentation", "linear/dice"),
    ("det. mAP", "detection", "map"),
    ("pointing game", "grounding", "pointing_game"),
]


def radalign(*args: str) -> None:
    command = [sys.executable, "-m", "radalign.cli", *args]
    print("$ radalign " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def ensure_data(args: argparse.Namespace) -> tuple[Path, Path]:
    """The demo's data (simulated once into OUT/data unless --data is given) and its cache."""
    from radalign.data.cache import CacheSettings, prepare_cache
    from radalign.data.manifest import load_manifest
    from radalign.data.simulate.generate import SimulationConfig, simulate

    manifest = args.data or args.out / "data" / "manifest.csv"
    if not manifest.is_file():
        if args.data:
            sys.exit(f"--data {manifest} does not exist; leave --data out to simulate the demo's data there")
        simulate(SimulationConfig(n=1000, seed=0, size=128, splits=(0.75, 0.05, 0.2)), manifest.parent)
    cache = args.cache or args.out / "cache"
    if not (cache / "index.json").is_file():
        records = load_manifest(manifest, require_report=True, decode=False, on_error="skip").records
        prepare_cache(records, cache, CacheSettings(size=128, spacing_mm=(4.0, 4.0, 4.0)))
    return manifest, cache


def run_one(method: str, seed: int, manifest: Path, cache: Path, args: argparse.Namespace) -> dict[str, float] | None:
    """Pre-train and evaluate one method and seed unless done or locked by another copy of this command (None)."""
    run = args.out / f"{method}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    lock = run / ".lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        print(f"{run.name}: another copy holds {lock}; skipped (delete the lock if no copy is running)")
        return None
    try:
        return _pretrain_and_evaluate(method, seed, run, manifest, cache, args)
    finally:
        lock.unlink()


def _pretrain_and_evaluate(
    method: str, seed: int, run: Path, manifest: Path, cache: Path, args: argparse.Namespace
) -> dict[str, float]:
    from radalign.config import find_config

    timings: dict[str, float] = {}
    if not (run / "export" / "model.safetensors").is_file():
        start = time.perf_counter()
        radalign(
            "pretrain", "--config", str(find_config(f"{method}-tiny")), "--data", str(manifest),
            "--out", str(run / "run"), "--max_steps", str(args.steps), "--loader.cache_dir", str(cache),
            "--trainer.seed", str(seed), "--loader.seed", str(seed), "--trainer.progress", "false",
        )  # fmt: skip
        (run / "run" / "export").rename(run / "export")  # moved out so a finished run is recognised by its export
        timings["pretrain_s"] = time.perf_counter() - start
    results = run / "eval" / "results.json"
    if not results.is_file() or not all(t in json.loads(results.read_text())["tasks"] for t in TASKS):
        start = time.perf_counter()
        radalign(
            "evaluate", "--model", str(run / "export"), "--protocol", "quick", "--data", str(manifest),
            "--cache", str(cache), "--out", str(run / "eval"), "--tasks", json.dumps(TASKS),
            "--overrides", json.dumps({**OVERRIDES, "seeds": args.eval_seeds}),
        )  # fmt: skip
        timings["evaluate_s"] = time.perf_counter() - start
    return timings


def cell(values: list[dict[str, Any]]) -> str:
    """Mean ± std over pre-training seeds; with one seed, the metric's own interval or evaluation-seed std."""
    if not values:
        return "—"
    if len(values) > 1:
        numbers = [v["value"] for v in values]
        return f"{statistics.mean(numbers):.3f} ± {statistics.stdev(numbers):.3f}"
    v = values[0]
    if "low" in v and v["low"] is not None and not math.isnan(v["low"]):
        return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
    if v.get("std") is not None and v.get("n", 1) > 1:
        return f"{v['value']:.3f} ± {v['std']:.3f}"
    return f"{v['value']:.3f}"


def table(methods: list[str], seeds: list[int], out: Path) -> tuple[str, dict[str, dict[str, list[float]]]]:
    lines = [
        "| method | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|--:|" + "--:|" * len(COLUMNS),
    ]
    raw: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        found = []
        for seed in seeds:
            path = out / f"{method}-seed{seed}" / "eval" / "results.json"
            if path.is_file():
                found.append(json.loads(path.read_text()))
        if not found:
            continue
        cells, raw[method] = [], {}
        for title, task, key in COLUMNS:
            values = [
                r["tasks"][task]["metrics"][key] for r in found if key in r["tasks"].get(task, {}).get("metrics", {})
            ]
            raw[method][title] = [v["value"] for v in values]
            cells.append(cell(values))
        lines.append(f"| {method} | {len(found)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), raw


def plot(raw: dict[str, dict[str, list[float]]], path: Path) -> None:
    from radalign.utils.plotting import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(2.1 * len(COLUMNS), 2.8))
    methods = list(raw)
    for ax, (title, _, _) in zip(axes, COLUMNS, strict=True):
        for m, method in enumerate(methods):
            values = raw[method][title]
            if not values:
                continue
            ax.bar(
                m,
                statistics.mean(values),
                color=plt.cm.tab10(m),
                yerr=statistics.stdev(values) if len(values) > 1 else 0,
            )
            ax.scatter([m] * len(values), values, color="black", s=6, zorder=3)
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("same backbone, data and steps; bars: mean over pre-training seeds, dots: each seed", fontsize=8)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/compare"))
    parser.add_argument("--methods", default="clip,convirt,gloria,mgca,lovt,prior")
    parser.add_argument("--seeds", default="0,1", help="pre-training seeds")
    parser.add_argument("--eval-seeds", default="0,1", help="evaluation seeds (probe, segmentation, detection heads)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--data", type=Path, help="a simulated manifest (default: simulate the demo's data in OUT)")
    parser.add_argument("--cache", type=Path, help="its `radalign prepare` cache (default: OUT/cache)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args()
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    held: list[str] = []  # runs another copy was still working on
    if not args.table_only:
        manifest, cache = ensure_data(args)
        timings_path = args.out / "timings.json"
        for seed in seeds:  # seed-major: an interrupted comparison still has every method at the first seed
            for method in methods:
                spent = run_one(method, seed, manifest, cache, args)
                if spent is None:
                    held.append(f"{method}-seed{seed}")
                elif spent:  # re-read first: another copy may have written its own runs' times meanwhile
                    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
                    timings.setdefault(f"{method}-seed{seed}", {}).update(spent)
                    timings_path.write_text(json.dumps(timings, indent=1))
    markdown, raw = table(methods, seeds, args.out)
    header = (
        f"{args.steps} pre-training steps per run, `quick` protocol on the test split (evaluation seeds "
        f"{args.eval_seeds}); cells: mean ± std over pre-training seeds (one seed: 95% bootstrap interval or "
        "evaluation-seed std)\n\n"
    )
    (args.out / "comparison.md").write_text(header + markdown + "\n")
    print(header + markdown)
    if raw:
        plot(raw, args.out / "comparison.png")
        print(f"figure: {args.out / 'comparison.png'}")
    held = [name for name in held if not (args.out / name / "eval" / "results.json").is_file()]
    if held:
        print(
            f"not in the table yet, another copy was still running them: {', '.join(held)}; that copy writes the "
            f"full table when it finishes (or run this command again with --table-only)"
        )


if __name__ == "__main__":
    main()
