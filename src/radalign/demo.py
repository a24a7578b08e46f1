"""`radalign demo`: pre-train CLIP on simulated paired data on the CPU and show that it learned something.

1. simulate paired chest radiographs + reports from the real chest CT (cached in the output folder),
2. check them like user data and decode them once into a training cache,
3. measure the untrained model (random image encoder, pretrained MiniLM, random projections),
4. pre-train CLIP (configs/methods/clip-tiny.yaml) with the full training engine (checkpoints, logs, export),
5. load the exported model with ``radalign.load`` and measure it the same way,
6. write report.md with both models side by side and the loss curve.

Zero-shot classification (positive vs negative prompt per finding, AUROC) and image -> report retrieval
(Recall@K among the held-out reports) are the measures; both need no labels at training time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radalign.utils.logging import get_logger

FINDINGS = (
    "cardiomegaly",
    "edema",
    "consolidation",
    "atelectasis",
    "pleural_effusion",
    "pneumothorax",
    "nodule",
    "mass",
    "support_devices",
)


@dataclass
class Scores:
    auroc: dict[str, float]
    mean_auroc: float
    retrieval: dict[str, float]
    n: int  # items evaluated: chance Recall@K is K / n


def chance(key: str, n: int) -> float:
    """What a random scorer gets: AUROC 0.5, Recall@K = K / n (one correct item among n)."""
    return min(1.0, int(key.rsplit("@", 1)[1]) / n) if "@" in key else 0.5


@dataclass
class DemoResult:
    before: Scores
    after: Scores
    steps: int
    timings: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def evaluate(method: Any, tokenizer: Any, dataset: Any, max_length: int) -> Scores:
    """Zero-shot AUROC per finding and retrieval Recall@K of ``method`` on ``dataset``."""
    from radalign.evaluation.embed import embed_dataset
    from radalign.evaluation.retrieval import recall_at_k
    from radalign.evaluation.zero_shot import auroc_per_finding, class_embeddings, mean_auroc, zero_shot_scores
    from radalign.inference import Encoder

    encoder = Encoder(method, tokenizer, max_length)
    embedded = embed_dataset(method, dataset, pad_token_id=getattr(tokenizer, "pad_token_id", 0) or 0)
    findings = [f for f in FINDINGS if f in embedded.vocabulary]
    columns = [embedded.vocabulary.index(f) for f in findings]
    classes = class_embeddings(encoder.encode_texts, findings)
    scores = zero_shot_scores(embedded.images, classes).numpy()
    auroc = auroc_per_finding(scores, embedded.labels[:, columns], findings)
    retrieval = recall_at_k(embedded.images, embedded.texts, ks=(1, 5, 10)) if embedded.texts is not None else {}
    return Scores(auroc, mean_auroc(auroc), retrieval, len(embedded.images))


def run_demo(out: Path, n: int = 1000, steps: int = 250, size: int = 128) -> DemoResult:
    """Run the demo into ``out`` (re-running reuses the simulated data and cache; the training run restarts)."""
    import shutil

    import torch
    from rich.console import Console

    from radalign.config import find_config, load_config
    from radalign.data.cache import CacheSettings, prepare_cache
    from radalign.data.datamodule import RadDataModule
    from radalign.data.manifest import load_manifest
    from radalign.data.simulate.generate import SimulationConfig, simulate
    from radalign.data.simulate.preview import contact_sheet
    from radalign.data.summary import print_summary, summarize
    from radalign.inference import load
    from radalign.methods.registry import build_method
    from radalign.training.run import pretrain

    console = Console()
    log = get_logger()
    out = Path(out)
    timings: dict[str, float] = {}
    data_dir = out / "data"
    start_all = time.perf_counter()

    console.rule("1. simulate paired chest radiographs and reports from a real chest CT")
    start = time.perf_counter()
    manifest_path = data_dir / "manifest.csv"
    sim = SimulationConfig(n=n, seed=0, size=size, splits=(0.75, 0.05, 0.2))
    if manifest_path.is_file() and (data_dir / "simulation.json").is_file():
        log.info(f"reusing the simulated data in {data_dir} (delete it to simulate again)")
    else:
        simulate(sim, data_dir)
        contact_sheet(data_dir, out / "preview.png", n=8)
    timings["simulate"] = time.perf_counter() - start

    console.rule("2. check it like any user dataset, and decode it once into a training cache")
    manifest = load_manifest(manifest_path, require_report=True, decode=False, on_error="skip")
    print_summary(manifest, summarize(manifest))
    start = time.perf_counter()
    prepare_cache(manifest.records, out / "cache", CacheSettings(size=size, spacing_mm=(4.0, 4.0, 4.0)))
    timings["prepare"] = time.perf_counter() - start

    config = load_config(
        find_config("clip-tiny"),
        {
            "loader.manifest": str(manifest_path),
            "loader.cache_dir": str(out / "cache"),
            "loader.image_size": size,
            "trainer.max_steps": steps,
            "trainer.checkpoint_every_n_steps": max(50, steps // 4),
        },
    )
    torch.manual_seed(config.trainer.seed)
    data = RadDataModule(config.loader)
    data.setup("fit")
    test = data.datasets["test"]

    console.rule(f"3. the untrained model on {len(test)} held-out radiographs")
    start = time.perf_counter()
    untrained = build_method(config, tokenizer=data.tokenizer)
    before = evaluate(untrained, data.tokenizer, test, config.loader.max_length)
    timings["evaluate"] = time.perf_counter() - start
    _print_scores(console, {"untrained": before})

    console.rule(f"4. pre-train CLIP for {steps} steps on {len(data.datasets['train'])} radiograph-report pairs")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    start = time.perf_counter()
    result = pretrain(config, run_dir)
    timings["pretrain"] = time.perf_counter() - start

    console.rule("5. the pre-trained model, loaded from its export with radalign.load")
    trained = load(result.export)
    after = evaluate(trained.method, trained.tokenizer, test, config.loader.max_length)
    _print_scores(console, {"untrained": before, "pre-trained": after})
    timings["total"] = time.perf_counter() - start_all

    report = write_report(out, before, after, run_dir, steps, timings)
    console.rule("done")
    log.info(f"report: {report}; model: {result.export}; data: {data_dir}; total {timings['total'] / 60:.1f} min")
    return DemoResult(before, after, result.steps, timings, report)


def _print_scores(console: Any, columns: dict[str, Scores]) -> None:
    from rich.table import Table

    table = Table(title="zero-shot AUROC per finding, and image -> report retrieval")
    table.add_column("measure")
    table.add_column("chance", justify="right", style="dim")
    for name in columns:
        table.add_column(name, justify="right")
    first = next(iter(columns.values()))
    for finding in first.auroc:
        table.add_row(f"AUROC {finding}", "0.500", *(_fmt(s.auroc[finding]) for s in columns.values()))
    table.add_row("[b]mean AUROC[/b]", "0.500", *(f"[b]{_fmt(s.mean_auroc)}[/b]" for s in columns.values()))
    for key in first.retrieval:
        table.add_row(key, _fmt(chance(key, first.n)), *(_fmt(s.retrieval[key]) for s in columns.values()))
    console.print(table)


def _fmt(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def loss_curve(run_dir: Path, path: Path) -> Path | None:
    """Plot train/loss against step from every log version of the run (a resumed run has several)."""
    from radalign.utils.plotting import pyplot, save

    plt = pyplot()
    import pandas as pd

    frames = [pd.read_csv(p) for p in sorted((run_dir / "logs").glob("version_*/metrics.csv"))]
    if not frames:
        return None
    metrics = pd.concat(frames)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    train = metrics.dropna(subset=["train/loss"]) if "train/loss" in metrics else None
    if train is not None and len(train):
        ax.plot(train["step"], train["train/loss"], label="train", lw=1)
    if "val/loss" in metrics:
        val = metrics.dropna(subset=["val/loss"])
        ax.plot(val["step"], val["val/loss"], "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("InfoNCE loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)
    return path


# The rows README.md quotes, in its order: (measure as README names it, what it reads from Scores). The demo writes
# them as README's table into report.md, so a reader compares the two directly (tests/test_cli.py keeps them equal).
README_ROWS: tuple[tuple[str, Any], ...] = (
    ("mean zero-shot AUROC (9 findings)", lambda s: s.mean_auroc),
    ("zero-shot AUROC cardiomegaly", lambda s: s.auroc.get("cardiomegaly", float("nan"))),
    ("zero-shot AUROC pleural effusion", lambda s: s.auroc.get("pleural_effusion", float("nan"))),
    ("image -> report Recall@10", lambda s: s.retrieval.get("i2t_R@10", float("nan"))),
    ("report -> image Recall@10", lambda s: s.retrieval.get("t2i_R@10", float("nan"))),
)


def readme_table(before: Scores, after: Scores) -> list[str]:
    """README's demo table (markdown lines) filled with this run's figures: chance, untrained, pre-trained."""
    lines = ["| measure (held-out) | chance | untrained | pre-trained |", "|---|--:|--:|--:|"]
    for name, read in README_ROWS:
        chance_value = chance("R@10", before.n) if "Recall@10" in name else 0.5
        lines.append(f"| {name} | {chance_value:.3f} | {_fmt(read(before))} | **{_fmt(read(after))}** |")
    return lines


def write_report(out: Path, before: Scores, after: Scores, run_dir: Path, steps: int, timings: dict) -> Path:
    curve = loss_curve(run_dir, out / "loss_curve.png")
    total = timings.get("total", float("nan")) / 60
    training = timings.get("pretrain", float("nan")) / 60
    lines = [
        "# radalign demo: CLIP pre-trained on simulated chest radiographs and reports",
        "",
        f"## The README's table, from this run ({total:.1f} min in all, {training:.1f} min of it training)",
        "",
        *readme_table(before, after),
        "",
        "## Every measure",
        "",
        f"CLIP (`configs/methods/clip-tiny.yaml`: ResNet-18 at 128 px, MiniLM partly frozen) trained for {steps} "
        f"steps on the CPU. Both models are measured on the same {before.n} held-out radiographs and their reports "
        "(i2t: image -> report, t2i: report -> image; a random scorer gets the chance column).",
        "",
        "| measure | chance | untrained | pre-trained |",
        "|---|--:|--:|--:|",
    ]
    for f in before.auroc:
        lines.append(f"| zero-shot AUROC {f} | 0.500 | {_fmt(before.auroc[f])} | {_fmt(after.auroc[f])} |")
    lines.append(f"| **mean zero-shot AUROC** | 0.500 | **{_fmt(before.mean_auroc)}** | **{_fmt(after.mean_auroc)}** |")
    for key in before.retrieval:
        lines.append(
            f"| retrieval {key} | {_fmt(chance(key, before.n))} | {_fmt(before.retrieval[key])} "
            f"| {_fmt(after.retrieval[key])} |"
        )
    lines += ["", "Times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    if curve is not None:
        lines += ["![loss curve](loss_curve.png)", ""]
    lines += [
        f"Run folder: `{run_dir}` (checkpoints, logs, export). Use the model:",
        "",
        "```python",
        "import radalign",
        f'model = radalign.load("{run_dir / "export"}")',
        'model.encode_texts(["Small left pleural effusion."])',
        "```",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
