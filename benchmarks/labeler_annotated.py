"""The report labeler against hand-annotated real IU X-ray sentences (benchmarks/data/iu_sentences_annotated.tsv).

    .venv/bin/python benchmarks/labeler_annotated.py [--split test|dev|all] [--show-errors] [--tsv PATH]

The annotation file holds no report text (the IU reports are CC BY-NC-ND): each row names a report uid and the sha1
of one of its FINDINGS + IMPRESSION sentences, and the sentences are found again in the archive installed with
torchxrayvision; a reference that does not resolve (a different archive, or a changed sentence splitter) is an
error. The draw and the annotation guideline are in the file's header (benchmarks/labeler_draw.py drew it).

Prints a Markdown table per observation on the chosen split (default: test, the half not used for tuning the
rules; tune on dev): the number of annotated mentions, mention F1 (any label vs none) and, as in the CheXpert
labeler paper, precision / recall / F1 per class: positive (1), negative (0) and uncertain (-1), where for class c
a true positive is a sentence with gold == c and predicted == c, precision is over predicted == c and recall over
gold == c ("-" where a denominator is 0), then a micro-averaged row over all observations. ``--show-errors`` lists
the disagreeing sentences (text, gold, predicted) for reading while tuning on dev.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from radalign.data.labeler import Labeler
from radalign.data.reports import parse_report
from radalign.data.sources.iu_xray import read_iu_reports

DEFAULT_TSV = Path(__file__).resolve().parent / "data" / "iu_sentences_annotated.tsv"
KEY_COLUMNS = ("uid", "sha1", "split", "section")
CLASSES = ((1, "positive"), (0, "negative"), (-1, "uncertain"))
_VALUES = {"1": 1, "0": 0, "-1": -1}


@dataclass
class Row:
    uid: str
    sha1: str
    split: str
    section: str
    gold: dict[str, int] = field(default_factory=dict)
    text: str = ""


def read_annotations(path: Path) -> tuple[list[str], list[Row]]:
    """(observations, rows) of the annotation TSV; '#' lines are comments, the first other line is the header."""
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip() and not line.startswith("#")]
    if not lines:
        sys.exit(f"{path}: no header line")
    header = lines[0][1].split("\t")
    if tuple(header[: len(KEY_COLUMNS)]) != KEY_COLUMNS:
        sys.exit(f"{path}: the header must start with the columns {', '.join(KEY_COLUMNS)}, got {header[:4]}")
    observations = header[len(KEY_COLUMNS) :]
    rows, seen = [], set()
    for n, line in lines[1:]:
        cells = line.split("\t")
        cells += [""] * (len(header) - len(cells))
        if len(cells) != len(header):
            sys.exit(f"{path}:{n}: {len(cells)} cells, the header has {len(header)}")
        row = Row(*cells[: len(KEY_COLUMNS)])
        if (row.uid, row.sha1) in seen:
            sys.exit(f"{path}:{n}: {row.uid} {row.sha1} is annotated twice")
        seen.add((row.uid, row.sha1))
        for observation, value in zip(observations, cells[len(KEY_COLUMNS) :], strict=True):
            value = value.strip()
            if value and value not in _VALUES:
                sys.exit(f"{path}:{n}: {observation} is {value!r}; a label is 1, 0, -1 or empty")
            if value:
                row.gold[observation] = _VALUES[value]
        rows.append(row)
    return observations, rows


def resolve(rows: list[Row]) -> None:
    """Fill in each row's sentence text from the installed IU archive; exit naming every reference not found."""
    wanted = {row.uid for row in rows}
    sentences: dict[tuple[str, str], str] = {}
    for report in read_iu_reports():
        if report.uid in wanted:
            for text in parse_report(report.raw_text()).sentences:
                sentences[(report.uid, hashlib.sha1(text.encode("utf-8")).hexdigest()[:12])] = text
    missing = [row for row in rows if (row.uid, row.sha1) not in sentences]
    if missing:
        listed = ", ".join(f"{row.uid} {row.sha1}" for row in missing[:20]) + (" ..." if len(missing) > 20 else "")
        sys.exit(
            f"{len(missing)} of {len(rows)} annotated sentences do not resolve against the installed IU archive "
            f"({listed}): the archive differs from torchxrayvision's NLMCXR_reports.tgz, or parse_report's "
            "sectioning / sentence splitting changed since the annotation"
        )
    for row in rows:
        row.text = sentences[(row.uid, row.sha1)]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@dataclass
class Counts:
    """True positives, predicted and gold counts: for mentions (any label) and for each class."""

    tp: Counter[object] = field(default_factory=Counter)
    pred: Counter[object] = field(default_factory=Counter)
    gold: Counter[object] = field(default_factory=Counter)

    def add(self, gold: int | None, pred: int | None) -> None:
        if gold is not None:
            self.gold["mention"] += 1
            self.gold[gold] += 1
        if pred is not None:
            self.pred["mention"] += 1
            self.pred[pred] += 1
        if gold is not None and pred is not None:
            self.tp["mention"] += 1
        if gold is not None and gold == pred:
            self.tp[gold] += 1

    def __iadd__(self, other: Counts) -> Counts:
        self.tp += other.tp
        self.pred += other.pred
        self.gold += other.gold
        return self

    def prf(self, key: object) -> tuple[float | None, float | None, float | None]:
        precision, recall = _ratio(self.tp[key], self.pred[key]), _ratio(self.tp[key], self.gold[key])
        return precision, recall, _f1(precision, recall)

    def cells(self, name: str) -> str:
        out = [name, str(self.gold["mention"]), _fmt(self.prf("mention")[2])]
        for value, _ in CLASSES:
            precision, recall, f1 = self.prf(value)
            out.append(f"{_fmt(precision)} / {_fmt(recall)} / {_fmt(f1)} ({self.gold[value]})")
        return "| " + " | ".join(out) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("test", "dev", "all"), default="test")
    parser.add_argument("--show-errors", action="store_true", help="print the disagreeing sentences")
    parser.add_argument("--tsv", type=Path, default=DEFAULT_TSV)
    args = parser.parse_args()
    observations, rows = read_annotations(args.tsv)
    resolve(rows)
    labeler = Labeler.from_yaml()
    chosen = [row for row in rows if args.split == "all" or row.split == args.split]
    per_observation = {observation: Counts() for observation in observations}
    errors = []
    for row in chosen:
        predicted = labeler.label_sentence(row.text)
        wrong = {}
        for observation in observations:
            gold, pred = row.gold.get(observation), predicted.get(observation)
            per_observation[observation].add(gold, pred)
            if gold != pred:
                wrong[observation] = (gold, pred)
        if wrong:
            errors.append((row, wrong))
    unscored = sorted(set().union(*(labeler.label_sentence(row.text) for row in chosen)) - set(observations))
    splits = Counter(row.split for row in rows)
    print(
        f"{len(chosen)} annotated IU sentences ({args.split}; all: {dict(sorted(splits.items()))}), "
        f"{len(chosen) - len(errors)} with every label agreeing"
    )
    print("cells: precision / recall / F1 (gold count)\n")
    print("| observation | mentions | mention F1 | positive (1) | negative (0) | uncertain (-1) |")
    print("|---|--:|--:|--:|--:|--:|")
    total = Counts()
    for observation in observations:
        print(per_observation[observation].cells(observation))
        total += per_observation[observation]
    print(total.cells("**micro average**"))
    if unscored:
        print(f"\nnot annotated, so not scored: {', '.join(unscored)}")
    if args.show_errors:
        print(f"\n{len(errors)} sentences with a disagreement ({args.split}): observation gold -> predicted")
        show = {None: "-", 1: "1", 0: "0", -1: "-1"}
        for row, wrong in errors:
            diffs = ", ".join(f"{obs} {show[g]} -> {show[p]}" for obs, (g, p) in wrong.items())
            print(f"- {row.uid} {row.sha1}: {row.text}\n    {diffs}")


if __name__ == "__main__":
    main()
