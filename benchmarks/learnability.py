"""Can a model see the simulated findings? Train a small supervised CNN and print per-finding AUROC.

Each simulated radiograph's ground truth (the findings actually inserted, from its regions file) is the target,
not the report labels: the question is whether the pixels carry the finding. A finding whose AUROC stays near 0.5
is invisible and must be made visible or removed from the simulator.

    # simulate (cached), pack and train on this machine:
    .venv/bin/python benchmarks/learnability.py --n 3000 --size 128
    # or pack here and train elsewhere (e.g. on a GPU machine without the simulator's data packages):
    .venv/bin/python benchmarks/learnability.py --n 3000 --pack-only        # writes learnability-3000-128.npz
    python benchmarks/learnability.py --packed learnability-3000-128.npz     # needs only torch + scikit-learn
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

KINDS = (
    "nodule",
    "mass",
    "consolidation",
    "atelectasis",
    "pleural_effusion",
    "pneumothorax",
    "cardiomegaly",
    "edema",
    "support_device",
)


def pack(n: int, size: int, seed: int, out: Path) -> Path:
    """Simulate (reusing a cached dataset) and pack images (uint8) and ground truth into one .npz."""
    import pandas as pd

    from radalign.data.io import read_image
    from radalign.data.simulate.anatomy import cache_dir
    from radalign.data.simulate.generate import SimulationConfig, simulate

    data = cache_dir() / f"learnability-{n}-{size}-{seed}"
    if not (data / "manifest.csv").is_file():
        simulate(SimulationConfig(n=n, seed=seed, size=size, workers=os.cpu_count()), data)
    table = pd.read_csv(data / "manifest.csv")
    table = table[table["modality"] == "xray"]
    images = np.zeros((len(table), size, size), dtype=np.uint8)
    truth = np.zeros((len(table), len(KINDS)), dtype=np.uint8)
    for i, row in enumerate(table.itertuples()):
        images[i] = np.rint(np.clip(read_image(data / row.image).array, 0, 1) * 255)
        kinds = {r["finding"] for r in json.loads((data / row.regions).read_text())["regions"]}
        truth[i] = [k in kinds for k in KINDS]
    is_train = (table["split"] == "train").to_numpy()
    np.savez_compressed(out, images=images, truth=truth, is_train=is_train, kinds=np.array(KINDS))
    return out


def small_cnn() -> nn.Module:
    """Five conv blocks: small enough for a CPU run, enough to see a 1 cm nodule at 128 px."""
    layers: list[nn.Module] = []
    channels = [1, 32, 64, 96, 128, 192]
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], len(KINDS)))


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as build

    model = build(num_classes=len(KINDS))
    model.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    return model


def train(packed: Path, model_name: str, epochs: int, batch: int, device: str) -> list[tuple[str, int, float]]:
    data = np.load(packed)
    images = torch.from_numpy(data["images"]).float().div_(255.0)[:, None]
    truth = torch.from_numpy(data["truth"]).float()
    is_train = torch.from_numpy(data["is_train"])
    x_train, y_train = images[is_train].to(device), truth[is_train].to(device)
    x_test, y_test = images[~is_train].to(device), truth[~is_train]
    torch.manual_seed(0)
    model = (small_cnn() if model_name == "small" else resnet18()).to(device)
    steps = epochs * max(1, len(x_train) // batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), device=device)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            x = x_train[idx]
            shift = [int(s) for s in torch.randint(-6, 7, (2,))]  # small translations: no memorised positions
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.binary_cross_entropy_with_logits(model(x), y_train[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    with torch.no_grad():
        scores = torch.cat([torch.sigmoid(model(x_test[i : i + 256])).cpu() for i in range(0, len(x_test), 256)])
    results = []
    for k, kind in enumerate(KINDS):
        positives = int(y_test[:, k].sum())
        auroc = roc_auc_score(y_test[:, k], scores[:, k]) if 0 < positives < len(y_test) else float("nan")
        results.append((kind, positives, float(auroc)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--packed", type=Path, help="train on an existing packed .npz (no simulation)")
    parser.add_argument("--pack-only", action="store_true")
    parser.add_argument("--model", choices=("small", "resnet18"), default="small")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    packed = args.packed or pack(args.n, args.size, args.seed, Path(f"learnability-{args.n}-{args.size}.npz"))
    if args.pack_only:
        print(f"packed {packed}")
        return
    results = train(packed, args.model, args.epochs, args.batch, args.device)
    n_test = int((~np.load(packed)["is_train"]).sum())
    print(f"\nper-finding AUROC on {n_test} held-out radiographs ({args.model}, {args.epochs} epochs, {args.device})")
    print(f"| {'finding':<16} | positives | AUROC |")
    print(f"|{'-' * 18}|----------:|------:|")
    for kind, positives, auroc in results:
        print(f"| {kind:<16} | {positives:>9} | {auroc:.3f} |")
    print(f"mean AUROC {np.nanmean([r[2] for r in results]):.3f} (chance 0.5)")


if __name__ == "__main__":
    main()
