"""Human-readable views of results.json: one run's report.md, and the side-by-side table of ``radalign compare``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radalign.evaluation.metrics import Metric


def _metric(data: dict[str, Any] | None) -> str:
    if not data or data.get("value") is None:
        return "n/a"
    return str(Metric.from_dict(data))


def write_report(results: dict[str, Any], out: Path) -> Path:
    """report.md next to results.json: what was evaluated, one table per task, its figures and notes."""
    model, protocol, data = results["model"], results["protocol"], results["data"]
    lines = [
        f"# Evaluation of `{model['name']}` under protocol `{protocol['name']}`",
        "",
        f"- model: `{model['path']}` (method {model['method']}, image encoder {model['image_encoder']}, "
        f"weights sha256 {model['weights_sha256']})",
        f"- data: `{data['manifest']}` (sha256 {data['sha256']}; records {data['records']})",
        f"- radalign {results['radalign_version']}, torch {results['environment']['torch']}, "
        f"{results['environment']['device']}; {results['created']}; {results.get('seconds', 0) / 60:.1f} min",
        f"- protocol: {protocol.get('description') or protocol['name']}. Intervals: 95% bootstrap `[low, high]` over "
        f"{protocol['bootstrap']} resamples; `±` is the standard deviation over seeds {protocol['seeds']}.",
        "",
    ]
    for name, task in results["tasks"].items():
        lines += [f"## {name}", ""]
        if "error" in task:
            lines += [f"**Failed:** {task['error']}", ""]
            continue
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_metric(value)} |" for key, value in task["metrics"].items()]
        lines.append("")
        lines += [f"- {note}" for note in task.get("notes", [])]
        if task.get("notes"):
            lines.append("")
        lines += [f"![{name}]({figure})" for figure in task.get("figures", [])]
        lines += ["", f"({task.get('seconds', 0):.0f} s)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def comparability_key(results: dict[str, Any]) -> str:
    """Equal keys = same protocol settings on the same data: only such results may share a table."""
    protocol = dict(results["protocol"])
    protocol.pop("data", None)  # the manifest's path differs between machines; its hash is compared instead
    protocol.pop("cache_dir", None)
    payload = json.dumps({"protocol": protocol, "data": results["data"]["sha256"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def headline(task: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """A task's first metric: the one its table leads with (macro AUROC, Recall@1, Dice, mAP...)."""
    metrics = task.get("metrics") or {}
    if not metrics:
        return "error" if "error" in task else "", None
    key = next(iter(metrics))
    return key, metrics[key]


def compare_table(runs: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """Markdown: methods as rows, tasks as columns (each task's headline metric); one table per comparable group.

    Returns the markdown and warnings for runs that could not be put in the same table.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(comparability_key(run), []).append(run)
    warnings = []
    if len(groups) > 1:
        described = [
            f"{g[0]['protocol']['name']} on data {g[0]['data']['sha256']} ({len(g)} runs)" for g in groups.values()
        ]
        warnings.append(
            "these results come from different protocols or data and are NOT compared with each other: "
            + "; ".join(described)
        )
    blocks = []
    for key, group in groups.items():
        tasks: list[str] = []
        for run in group:
            tasks += [t for t in run["tasks"] if t not in tasks]
        header_metrics = {t: next((headline(r["tasks"][t])[0] for r in group if t in r["tasks"]), "") for t in tasks}
        first = group[0]
        lines = [
            f"### protocol `{first['protocol']['name']}` (settings {key}), data sha256 {first['data']['sha256']}",
            "",
            "| model | method | " + " | ".join(f"{t}: {header_metrics[t]}" for t in tasks) + " |",
            "|---|---|" + "---|" * len(tasks),
        ]
        for run in group:
            cells = []
            for t in tasks:
                task = run["tasks"].get(t)
                if task is None:
                    cells.append("—")
                    continue
                _, value = headline(task)
                cells.append("failed" if "error" in task else _metric(task["metrics"].get(header_metrics[t], value)))
            lines.append(f"| {run['model']['name']} | {run['model']['method']} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n", warnings
