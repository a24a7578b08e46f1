"""PRIOR's conditional image reconstruction on held-out radiographs: input, reconstruction from the image and its
report, and from the image only (the sentence context set to zero) (issue 7).

    .venv/bin/python benchmarks/prior_reconstruction.py --model bench_out/compare/prior-seed0/export \\
        --data demo_out/data/manifest.csv --out docs/img/prior-reconstruction.jpg

The decoder sees the patch features with channel dropout switched off (evaluation mode), so what the report adds
is the difference between the two right-hand columns; the L1 error against the input is printed per column.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported PRIOR model")
    parser.add_argument("--data", type=Path, required=True, help="a manifest; test-split images are shown")
    parser.add_argument("--cache", type=Path, help="its `radalign prepare` cache")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("prior-reconstruction.jpg"))
    args = parser.parse_args()

    from radalign.data.datamodule import RadDataModule
    from radalign.inference import load
    from radalign.utils.plotting import pyplot, save

    model = load(args.model)
    method = model.method.eval()
    config = method.config
    if config.method != "prior":
        raise SystemExit(f"{args.model} is a {config.method} model; this figure needs PRIOR's decoder")
    loader = dataclasses.replace(config.loader, manifest=args.data, cache_dir=args.cache, batch_size=args.n)
    data = RadDataModule(loader, tokenizer=model.tokenizer)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        images = batch["image"]
        with_text = method.reconstruct(images, batch)  # it reads the batch's text fields
        image_only = method.reconstruct(images)
    plt = pyplot()
    fig, axes = plt.subplots(len(images), 3, figsize=(6.3, 2.2 * len(images)))
    columns = (("input", images), ("image + report", with_text), ("image only", image_only))
    for c, (title, tensor) in enumerate(columns):
        error = (tensor - images).abs().mean().item()
        print(f"{title}: mean L1 to the input {error:.3f}")
        for r in range(len(images)):
            ax = axes[r, c]
            ax.imshow(tensor[r, 0].numpy(), cmap="gray", vmin=float(images[r].min()), vmax=float(images[r].max()))
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title if c == 0 else f"{title}\nL1 {error:.3f}", fontsize=8)
    save(fig, args.out)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
