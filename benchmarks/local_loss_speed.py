"""Local-alignment losses: vectorised radalign versions against per-sample loop formulations (issue 6).

At the papers' shapes (batch 32, 768-d; GLoRIA: 19x19 regions and 97 words; MGCA: 14x14 patches and 97 words;
LoVT: 7x7 regions and 12 sentences), forward + backward time and the extra peak memory of each loss, and the
largest difference between the two results. The loop formulations follow the official code's structure (GLoRIA
loops over reports, the intra-sample losses over samples) and call the same math on one sample at a time.
Target: at least 10x faster at equal results.

    .venv/bin/python benchmarks/local_loss_speed.py [--repeats 3] [--batch 32]
    python benchmarks/local_loss_speed.py --device cuda --repeats 10     # on a GPU: synchronised timings
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from radalign.objectives.local.gloria import GloriaLocalLoss, gloria_attention
from radalign.objectives.local.lovt import local_intra_sample_loss, spatial_positives
from radalign.objectives.local.mgca import mgca_token_loss

D = 768


def inputs(name: str, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, t = {"gloria": (361, 97), "mgca": (196, 97), "lovt": (49, 12)}[name]
    lengths = torch.randint(t // 3, t + 1, (batch,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]  # variable report lengths
    x = {
        "regions": torch.randn(batch, n, D, generator=g),
        "tokens": torch.randn(batch, t, D, generator=g),
        "token_mask": mask,
        "region_mask": torch.ones(batch, n, dtype=torch.bool),
    }
    x = {k: v.to(device) for k, v in x.items()}
    x["regions"].requires_grad_()
    x["tokens"].requires_grad_()
    return x


def gloria_vectorised(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return GloriaLocalLoss()(x["regions"], x["region_mask"], x["tokens"], x["token_mask"])


def gloria_chunked(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """8 reports at a time, each chunk recomputed in the backward pass: bounded memory, same result."""
    return GloriaLocalLoss(chunk_size=8)(x["regions"], x["region_mask"], x["tokens"], x["token_mask"])


def gloria_loop(x: dict[str, torch.Tensor]) -> torch.Tensor:
    regions, words, mask = x["regions"], x["tokens"], x["token_mask"]
    b = len(regions)
    columns = []
    for j in range(b):  # as the official code: one report at a time against every image
        w = words[j, mask[j]][None].expand(b, -1, -1)  # (B, W_j, D)
        context, _ = gloria_attention(w, regions, 4.0)
        sim = F.cosine_similarity(w, context, dim=-1) * 5.0  # (B, W_j)
        columns.append(torch.logsumexp(sim, dim=1))
    logits = torch.stack(columns, dim=1) * 10.0  # (B_img, B_txt)
    target = torch.arange(b, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def mgca_vectorised(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return mgca_token_loss(x["regions"], x["region_mask"], x["tokens"], x["token_mask"])


def mgca_loop(x: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = []
    for i in range(len(x["regions"])):
        one = {k: v[i : i + 1] for k, v in x.items()}
        terms.append(mgca_token_loss(one["regions"], one["region_mask"], one["tokens"], one["token_mask"]))
    return torch.stack(terms).mean()


def lovt_vectorised(x: dict[str, torch.Tensor]) -> torch.Tensor:
    positives = spatial_positives((7, 7), device=x["regions"].device)
    a = local_intra_sample_loss(x["regions"], x["regions"].flip(1), x["region_mask"], positives)
    s = local_intra_sample_loss(x["tokens"], x["tokens"].flip(1), x["token_mask"])
    return sum(a) + sum(s)


def lovt_loop(x: dict[str, torch.Tensor]) -> torch.Tensor:
    positives = spatial_positives((7, 7), device=x["regions"].device)
    total = x["regions"].new_zeros(())
    b = len(x["regions"])
    for i in range(b):
        r, t, m = x["regions"][i : i + 1], x["tokens"][i : i + 1], x["token_mask"][i : i + 1]
        a = local_intra_sample_loss(r, r.flip(1), x["region_mask"][i : i + 1], positives)
        s = local_intra_sample_loss(t, t.flip(1), m)
        total = total + (sum(a) + sum(s)) / b  # each call averages over its one sample
    return total


VARIANTS: dict[str, dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]] = {
    "gloria": {"vectorised": gloria_vectorised, "chunked": gloria_chunked, "loop": gloria_loop},
    "mgca": {"vectorised": mgca_vectorised, "loop": mgca_loop},
    "lovt": {"vectorised": lovt_vectorised, "loop": lovt_loop},
}


def measure(name: str, variant: str, batch: int, repeats: int, device: str) -> dict[str, float]:
    # Random 768-d features saturate GLoRIA's softmaxes, and the resulting denormal gradients make CPU GEMMs
    # ~4x slower (measured: 11 s vs 2.7 s backward); flushing them is what a CPU user should do too.
    torch.set_flush_denormal(True)
    cuda = device.startswith("cuda")
    x = inputs(name, batch, device)
    fn = VARIANTS[name][variant]
    if cuda:  # the first call pays for kernel selection and the allocator's growth: not part of the loss's cost
        fn(x).backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: kB)
    times = []
    for _ in range(repeats):
        x["regions"].grad = x["tokens"].grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = fn(x)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        extra = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"seconds": min(times), "extra_mib": extra, "loss": float(loss), "grad": x["regions"].grad.norm().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement, so that its peak memory is its own
        print(json.dumps(measure(*args.one, args.batch, args.repeats, args.device)))
        return
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"batch {args.batch}, {D}-d, forward + backward, best of {args.repeats}, {args.device} ({where})")
    print("| loss | shapes | vectorised (s) | loop (s) | speed-up | extra peak MiB (vec / loop) | max rel. diff |")
    print("|---|---|--:|--:|--:|--:|--:|")
    shapes = {"gloria": "361 regions x 97 words", "mgca": "196 patches x 97 words", "lovt": "49 regions, 12 sent."}
    for name, variants in VARIANTS.items():
        result = {}
        for variant in variants:
            command = [sys.executable, __file__, "--one", name, variant, "--batch", str(args.batch),
                       "--repeats", str(args.repeats), "--device", args.device]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        loop = result.pop("loop")
        for variant, v in result.items():
            diff = max(abs(v[k] - loop[k]) / max(abs(loop[k]), 1e-12) for k in ("loss", "grad"))
            speed = loop["seconds"] / v["seconds"]
            memory = f"{v['extra_mib']:.0f} / {loop['extra_mib']:.0f}"
            times = f"{v['seconds']:.3f} | {loop['seconds']:.3f} | {speed:.1f}x"
            label = name if variant == "vectorised" else f"{name} ({variant})"
            print(f"| {label} | {shapes[name]} | {times} | {memory} | {diff:.1e} |")
    print("target: >= 10x faster than the per-sample loop at equal results")


if __name__ == "__main__":
    main()
