"""Simulation throughput on this machine: samples per second for 2D only and for 2D + 3D.

Target (issue 3): 2,000 2D samples at 224 px in under 3 minutes on 2 cores.

    .venv/bin/python benchmarks/simulate_speed.py [--n 400] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from radalign.data.simulate.anatomy import load_anatomy
from radalign.data.simulate.generate import WORKING_SPACING, SimulationConfig, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    load_anatomy(WORKING_SPACING)  # the one-off anatomy cache is not part of the per-sample cost
    rows = []
    for label, with_3d in (("2D radiograph", False), ("2D + 3D volume (3 mm)", True)):
        with tempfile.TemporaryDirectory() as out:
            config = SimulationConfig(n=args.n, seed=1, size=args.size, with_3d=with_3d, workers=args.workers)
            start = time.perf_counter()
            simulate(config, out, progress=False)
            seconds = time.perf_counter() - start
        rows.append((label, args.n / seconds, 2000 / (args.n / seconds)))
    print(f"\n{args.n} samples at {args.size} px, {args.workers} worker processes")
    print(f"| {'output':<24} | samples/s | time for 2,000 samples |")
    print(f"|{'-' * 26}|----------:|-----------------------:|")
    for label, rate, t2000 in rows:
        print(f"| {label:<24} | {rate:>9.1f} | {t2000:>20.0f} s |")
    print("target: 2,000 2D samples in under 180 s")


if __name__ == "__main__":
    main()
