"""What a linear probe sees: the frozen global image features of trained models, and the probe on each (issue 13).

For each exported model, on the train split of the `quick` protocol: the feature width, its effective rank (exp of
the entropy of the normalised singular values of the centred feature matrix, Roy & Vetterli 2007), the share of
variance on the first principal component, the mean per-dimension standard deviation, and the `quick` linear probe
(100% of the labels, evaluation seeds 0 and 1) on two representations:

- ``backbone``: the image encoder's pooled output (average pool of the last map), what every method's probe read
  before; - ``global``: the method's own global image representation before its projection head (LoVT's and PRIOR's
  attention pools; the same as ``backbone`` for CLIP, ConVIRT, GLoRIA and MGCA).

    .venv/bin/python benchmarks/probe_features.py --data demo_out/data/manifest.csv --cache demo_out/cache \\
        clip=bench_out/compare/clip-seed0/export lovt=bench_out/compare/lovt-seed0/export
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from radalign.config import TaskSpec, load_protocol
from radalign.evaluation.context import FEATURE_KINDS, EvalContext
from radalign.evaluation.probe import run_linear_probe


def spectrum(x: torch.Tensor) -> dict[str, float]:
    """Effective rank, first-PC variance share and mean per-dimension std of (N, D) features."""
    centred = x.double() - x.double().mean(dim=0)
    s = torch.linalg.svdvals(centred)
    p = s / s.sum()
    variance = s.pow(2)
    return {
        "dim": x.shape[1],
        "effective_rank": float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum())),
        "pc1_share": float(variance[0] / variance.sum()),
        "mean_std": float(centred.std(dim=0).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="NAME=EXPORT_FOLDER")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()

    from radalign.data.manifest import load_manifest
    from radalign.inference import load

    protocol = load_protocol("quick")
    protocol.data, protocol.cache_dir = args.data, args.cache
    manifest = load_manifest(args.data, on_error="skip", decode=False)
    print("| model | features | dim | effective rank | PC1 share | mean std | LP 100% AUROC |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for item in args.models:
        name, _, path = item.partition("=")
        with tempfile.TemporaryDirectory() as out:
            ctx = EvalContext(load(path), protocol, manifest.records, Path(out), vocabulary=manifest.vocabulary,
                              progress=False)  # fmt: skip
            for kind in FEATURE_KINDS:
                stats = spectrum(ctx.features("train", kind).x)
                spec = TaskSpec("linear_probe", params={"fractions": [1.0], "features": kind})
                auroc = run_linear_probe(ctx, spec).metrics["auroc@100%"]
                print(
                    f"| {name} | {kind} | {stats['dim']} | {stats['effective_rank']:.1f} | {stats['pc1_share']:.3f} "
                    f"| {stats['mean_std']:.3f} | {auroc.value:.3f} ± {auroc.std:.3f} |"
                )


if __name__ == "__main__":
    main()
