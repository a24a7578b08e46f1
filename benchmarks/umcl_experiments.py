"""UMCL's four experiments on the simulated data (issue 18), at one small budget for every arm:

1. label-aware contrast (UMCL, label-set positives) vs plain CLIP on image-report data alone;
2. adding an image-label source (another simulated seed, labels and no reports, weight 1:1) vs report data alone;
3. learned prompts vs the hand-written template they start from ("findings consistent with <name>"), zero-shot;
4. prompt sensitivity: the spread of zero-shot AUROC over five paraphrased hand-written prompt pairs.

Every arm uses the -tiny configs (ResNet-18, MiniLM with 4 of 6 layers frozen) at ``--size`` px for ``--steps``
steps of batch 32, per pre-training seed; evaluation is the ``quick`` protocol's zero-shot, retrieval and linear
probe (1% and 100%) on the paired data's test split. Cells are mean ± sd over pre-training seeds. Runs are skipped
when their results exist, so an interrupted run resumes.

    .venv/bin/python benchmarks/umcl_experiments.py --out bench_out/umcl            # 2 seeds, about an hour on 2 cores
    .venv/bin/python benchmarks/umcl_experiments.py --out bench_out/umcl-quick --seeds 0 --steps 30 --n 300
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

TEMPLATES = [  # five paraphrased prompt pairs (experiment 4): the same finding, different wording
    ("{name}.", "No {name}."),
    ("There is {name}.", "There is no {name}."),
    ("Findings consistent with {name}.", "No evidence of {name}."),
    ("The radiograph shows {name}.", "The radiograph shows no {name}."),
    ("{name} is present.", "{name} is absent."),
]
START = ("findings consistent with {name}", "findings consistent with no {name}")  # the learned prompt's start
FINDINGS = ["cardiomegaly", "edema", "consolidation", "atelectasis", "pleural_effusion", "pneumothorax", "nodule",
            "mass", "support_devices"]  # fmt: skip


def data(out: Path, n: int, size: int) -> tuple[Path, Path]:
    from radalign.data.simulate.generate import SimulationConfig, simulate

    paired, labels = out / "data" / "paired" / "manifest.csv", out / "data" / "labels" / "manifest.csv"
    if not paired.is_file():
        simulate(SimulationConfig(n=n, seed=0, size=size), paired.parent)
    if not labels.is_file():  # other patients, as CheXpert is to MIMIC-CXR
        simulate(SimulationConfig(n=n, seed=1, size=size, reports=False), labels.parent)
    return paired, labels


def pretrain(arm: str, seed: int, paired: Path, labels: Path, args: argparse.Namespace) -> Path:
    from radalign.config import find_config, load_config
    from radalign.training.run import pretrain as run

    out = args.out / "runs" / f"{arm}-seed{seed}"
    if (out / "export" / "config.json").is_file():
        return out / "export"
    config_name = "clip-tiny" if arm == "clip" else "umcl-tiny"
    overrides: dict[str, Any] = {"trainer.max_steps": args.steps, "trainer.seed": seed, "loader.seed": seed,
                                 "loader.image_size": args.size, "trainer.progress": False,
                                 "trainer.checkpoint_every_n_steps": args.steps}  # fmt: skip
    if arm == "umcl-both":
        overrides["loader.sources"] = [
            {"name": "paired", "manifest": str(paired), "weight": 1.0},
            {"name": "labels", "manifest": str(labels), "weight": 1.0, "require_report": False},
        ]
    else:
        overrides["loader.manifest"] = str(paired)
    run(load_config(find_config(config_name), overrides), out)
    return out / "export"


def evaluate(export: Path, name: str, paired: Path, tasks: list[str], extra: dict[str, Any], args) -> dict:
    from radalign.evaluation.run import evaluate as run

    out = export.parent / "eval" / name
    if not (out / "results.json").is_file():
        overrides = {"image_size": args.size, "bootstrap": 0, "seeds": [0], "findings": FINDINGS,
                     "tasks.linear_probe.fractions": [0.01, 1.0], **extra}  # fmt: skip
        run(export, "quick", out, data=paired, overrides=overrides, tasks=tasks)
    return json.loads((out / "results.json").read_text())["tasks"]


def custom(pair: tuple[str, str]) -> dict[str, Any]:
    def text(template: str, finding: str) -> str:
        written = template.format(name=finding.replace("_", " "))
        return written[0].upper() + written[1:]

    return {"tasks.zero_shot.prompts": "custom", "tasks.zero_shot.custom": {
        f: {"positive": [text(pair[0], f)], "negative": [text(pair[1], f)]} for f in FINDINGS}}  # fmt: skip


def value(tasks: dict, task: str, metric: str) -> float:
    return float(tasks[task]["metrics"][metric]["value"])


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/umcl"))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n", type=int, default=1000, help="patients per simulated source")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    paired, labels = data(args.out, args.n, args.size)
    arms = ["clip", "umcl-reports", "umcl-both"]
    results: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}

    def add(arm: str, key: str, x: float) -> None:
        results[arm].setdefault(key, []).append(x)

    for seed in args.seeds:
        for arm in arms:
            export = pretrain(arm, seed, paired, labels, args)
            tasks = evaluate(export, "standard", paired, ["zero_shot", "retrieval", "linear_probe"], {}, args)
            add(arm, "zero-shot AUROC (pairs)", value(tasks, "zero_shot", "auroc"))
            add(arm, "i2t R@10", value(tasks, "retrieval", "i2t_R@10"))
            add(arm, "LP 1%", value(tasks, "linear_probe", "auroc@1%"))
            add(arm, "LP 100%", value(tasks, "linear_probe", "auroc@100%"))
            aurocs = []
            for k, pair in enumerate(TEMPLATES):
                zs = evaluate(export, f"template{k}", paired, ["zero_shot"], custom(pair), args)
                aurocs.append(value(zs, "zero_shot", "auroc"))
            add(arm, "template AUROC mean", statistics.mean(aurocs))
            add(arm, "template AUROC sd (spread)", statistics.stdev(aurocs))
            add(arm, "template AUROC range", max(aurocs) - min(aurocs))
            if arm.startswith("umcl"):
                start = evaluate(export, "start-template", paired, ["zero_shot"], custom(START), args)
                learned = evaluate(export, "learned", paired, ["zero_shot"], {"tasks.zero_shot.prompts": "learned"},
                                   args)  # fmt: skip
                add(arm, "zero-shot, starting template", value(start, "zero_shot", "auroc"))
                add(arm, "zero-shot, learned prompts", value(learned, "zero_shot", "auroc"))
    keys = list(dict.fromkeys(k for arm in arms for k in results[arm]))
    lines = [f"seeds {args.seeds}, {args.steps} steps of batch 32, {args.size} px, {args.n} patients per source", "",
             "| metric | " + " | ".join(arms) + " |", "|---|" + "--:|" * len(arms)]  # fmt: skip
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(cell(results[a][key]) if key in results[a] else "-" for a in arms)
                     + " |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "raw.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
