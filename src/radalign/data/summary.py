"""Dataset summary for ``radalign data check``: counts, label prevalence, report lengths and problems."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radalign.data.manifest import Manifest, problem_counts
from radalign.data.reports import kept_share, parse_report, unknown_headers


@dataclass
class Summary:
    records: int
    by_split: Counter[str]
    by_modality: Counter[str]
    by_view: Counter[str]
    # finding -> counts of positive / negative / uncertain / missing
    labels: dict[str, dict[str, int]]
    report_sentences: dict[str, float]  # min / median / p95 / max sentences per report
    report_words: dict[str, float]
    reports_missing: int
    problems: Counter[str] = field(default_factory=Counter)
    # reports whose training text (FINDINGS + IMPRESSION) keeps under half their words, and the capitalised
    # "NAME:" headers in them that sectioning does not know, most common first
    reports_mostly_dropped: int = 0
    unknown_headers: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_share(self) -> float:
        with_report = self.records - self.reports_missing
        return self.reports_mostly_dropped / with_report if with_report else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "by_split": dict(self.by_split),
            "by_modality": dict(self.by_modality),
            "by_view": dict(self.by_view),
            "labels": self.labels,
            "report_sentences": self.report_sentences,
            "report_words": self.report_words,
            "reports_missing": self.reports_missing,
            "reports_mostly_dropped": self.reports_mostly_dropped,
            "unknown_headers": self.unknown_headers,
            "problems": dict(self.problems),
        }


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    array = np.asarray(values)
    return {
        "min": float(array.min()),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
    }


# data check warns when more than this share of the reports lose most of their words to sectioning
DROPPED_WARNING = 0.2


def summarize(manifest: Manifest, report_sections: Sequence[str] = ("FINDINGS", "IMPRESSION")) -> Summary:
    sentences, words, missing, dropped = [], [], 0, 0
    headers: Counter[str] = Counter()
    for record in manifest.records:
        report = parse_report(record.report, sections=report_sections) if record.report else None
        if report is None or report.is_empty:
            missing += 1
            continue
        sentences.append(len(report.sentences))
        words.append(sum(len(s.split()) for s in report.sentences))
        if kept_share(report) < 0.5:
            dropped += 1
            headers.update(set(unknown_headers(report.raw)))
    labels = {}
    for name in manifest.vocabulary:
        values = Counter(record.labels.get(name) for record in manifest.records)
        labels[name] = {
            "positive": values[1],
            "negative": values[0],
            "uncertain": values[-1],
            "missing": values[None],
        }
    return Summary(
        records=len(manifest.records),
        by_split=Counter(r.split for r in manifest.records),
        by_modality=Counter(r.modality.value for r in manifest.records),
        by_view=Counter(r.view.value if r.view else "(none)" for r in manifest.records),
        labels=labels,
        report_sentences=_stats(sentences),
        report_words=_stats(words),
        reports_missing=missing,
        problems=problem_counts(manifest.problems),
        reports_mostly_dropped=dropped,
        unknown_headers=dict(headers.most_common(5)),
    )


def print_summary(manifest: Manifest, summary: Summary, *, show_problems: int = 20) -> None:
    """Render the summary as rich tables on the console."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{manifest.path}[/bold]: {summary.records} usable records")
    for note in manifest.notes:
        console.print(f"[bold yellow]note[/bold yellow]: {note}", highlight=False)
    counts = Table(title="Records")
    counts.add_column("by")
    counts.add_column("value")
    counts.add_column("count", justify="right")
    for title, counter in (("split", summary.by_split), ("modality", summary.by_modality), ("view", summary.by_view)):
        for key, count in sorted(counter.items()):
            counts.add_row(title, key, str(count))
    console.print(counts)
    if summary.labels:
        table = Table(title="Label prevalence")
        for column in ("finding", "positive", "negative", "uncertain", "missing", "prevalence"):
            table.add_column(column, justify="left" if column == "finding" else "right")
        for name, c in summary.labels.items():
            known = c["positive"] + c["negative"] + c["uncertain"]
            prevalence = f"{c['positive'] / known:.1%}" if known else "-"
            table.add_row(name, *(str(c[k]) for k in ("positive", "negative", "uncertain", "missing")), prevalence)
        console.print(table)
    lengths = Table(title="Report lengths")
    for column in ("per report", "min", "median", "p95", "max"):
        lengths.add_column(column, justify="right")
    for title, stats in (("sentences", summary.report_sentences), ("words", summary.report_words)):
        lengths.add_row(title, *(f"{stats[k]:g}" for k in ("min", "median", "p95", "max")))
    console.print(lengths)
    console.print(f"records without a report: {summary.reports_missing}")
    if summary.dropped_share > DROPPED_WARNING:
        known = ", ".join(f"{name!r} ({n})" for name, n in summary.unknown_headers.items())
        console.print(
            f"[bold yellow]warning[/bold yellow]: {summary.reports_mostly_dropped} of "
            f"{summary.records - summary.reports_missing} reports ({summary.dropped_share:.0%}) keep less than half "
            "their words in the training text (the FINDINGS and IMPRESSION sections)"
            + (f"; headers radalign does not know: {known}" if known else "")
            + ". Rename those headers to FINDINGS / IMPRESSION, or choose the sections with loader.report_sections "
            "(docs/data.md, 'Report sections')",
            markup=True, highlight=False,
        )  # fmt: skip
    if manifest.problems:
        console.print(f"[bold red]{len(manifest.problems)} problems[/bold red] (rows left out):")
        for kind, count in summary.problems.most_common():
            console.print(f"  {kind}: {count}")
        for problem in manifest.problems[:show_problems]:
            console.print(f"  - {problem}", markup=False)
        if len(manifest.problems) > show_problems:
            console.print(f"  ... and {len(manifest.problems) - show_problems} more")
    else:
        console.print("[green]no problems found[/green]")
