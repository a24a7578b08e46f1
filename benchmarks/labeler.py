"""The report labeler's speed on the 3,955 real IU X-ray reports (target: 2,000 reports/s on one core) and its
agreement with the simulator's sentence labels (a sanity check: the simulator's phrasing is our own).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/labeler.py [--repeats 5] [--simulated 400]

Prints reports per second for sectioning + sentence splitting + labelling and for labelling already-parsed
reports (medians of the repeats), how many IU reports get a label per observation, and the share of the simulated
sentences' labels the labeler reproduces, per observation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

from radalign.data.labeler import Labeler, simulated_agreement
from radalign.data.reports import parse_report
from radalign.data.sources.iu_xray import read_iu_reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--simulated", type=int, default=400, help="simulated reports for the agreement table")
    args = parser.parse_args()
    texts = [r.raw_text() for r in read_iu_reports()]
    labeler = Labeler.from_yaml()
    parsed = [parse_report(t) for t in texts]
    whole, labelling = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for text in texts:
            labeler.label_report(text)
        whole.append(len(texts) / (time.perf_counter() - start))
        start = time.perf_counter()
        for report in parsed:
            labeler.label_report(report)
        labelling.append(len(texts) / (time.perf_counter() - start))
    mentioned = Counter(k for r in parsed for k, v in labeler.label_report(r).labels.items())
    print(f"{len(texts)} IU reports, median of {args.repeats}:")
    print("| step | reports/s |\n|---|--:|")
    print(f"| parse (sections, sentences) + label | {statistics.median(whole):,.0f} |")
    print(f"| label already-parsed reports | {statistics.median(labelling):,.0f} |")
    print("\nreports with a label per observation:", dict(mentioned.most_common()))
    agreement(labeler, args.simulated)


def agreement(labeler: Labeler, reports: int) -> None:
    counts = simulated_agreement(labeler, reports)
    agree, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    print(f"\nagreement with {reports} simulated reports' sentence labels: {agree}/{total} = {agree / total:.1%}")
    print("| observation | agree | labels |\n|---|--:|--:|")
    for key, (ok, n) in sorted(counts.items()):
        print(f"| {key} | {ok / n:.0%} | {n} |")


if __name__ == "__main__":
    main()
