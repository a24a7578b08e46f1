"""Local-alignment losses: radalign's vectorised versions against per-sample loops and against the official code.

``--table loop`` (issue 6): at the papers' shapes (batch 32, 768-d; GLoRIA: 19x19 regions and 97 words; MGCA:
14x14 patches and 97 words; LoVT: 7x7 regions and 12 sentences), forward + backward time and the extra peak memory
of each loss against a per-sample loop formulation that calls the same math one sample at a time.
Target: at least 10x faster at equal results.

``--table official`` (issue 13): against plain formulations of each method's released loss code
(``official_formulations.py``) at the shapes the official configs train with, same parameters and inputs, paired
timings (the two alternate), median (min) of ``--repeats``. Target: never slower than the official formulation.

    .venv/bin/python benchmarks/local_loss_speed.py [--table loop|official|both] [--repeats 5] [--batch 32]
    python benchmarks/local_loss_speed.py --device cuda --repeats 10     # on a GPU: synchronised timings
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import official_formulations as official  # the sibling module: a script's folder is on sys.path
from radalign.objectives.local.gloria import GloriaLocalLoss, gloria_attention
from radalign.objectives.local.lovt import LovtCrossAttention, local_intra_sample_loss, spatial_positives
from radalign.objectives.local.mgca import mgca_token_loss
from radalign.objectives.local.prior import (
    PriorCrossAttention,
    SimSiamPredictor,
    prior_image_local_loss,
    prior_text_local_loss,
)

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
    return GloriaLocalLoss(chunk_size=None)(x["regions"], x["region_mask"], x["tokens"], x["token_mask"])


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


# ------------------------------------------------------------------------------------- against the official code
Case = tuple[dict[str, torch.Tensor], Callable[[], torch.Tensor], Callable[[], torch.Tensor]]


def _leaves(g: torch.Generator, device: str, **shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Random N(0, 1) tensors of the given shapes on ``device``, as leaves that take gradients."""
    return {k: torch.randn(*shape, generator=g).to(device).requires_grad_() for k, shape in shapes.items()}


def _lengths(g: torch.Generator, batch: int, low: int, high: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random lengths in [low, high] and their (batch, high) validity mask on ``device``."""
    lengths = torch.randint(low, high + 1, (batch,), generator=g)
    return lengths, (torch.arange(high)[None] < lengths[:, None]).to(device)


def gloria_case(device: str, chunk: int | str | None = "auto") -> Case:
    """GLoRIA's paper setting: batch 48, 768-d, 19x19 conv4 regions (299 px), reports of at most 25 words."""
    g = torch.Generator().manual_seed(0)
    b, n, w, d = 48, 361, 25, 768
    lengths, mask = _lengths(g, b, 8, w, device)
    x = _leaves(g, device, regions=(b, n, d), words=(b, w, d))
    with torch.no_grad():
        x["words"].mul_(0.1)  # milder word-region dot products: GLoRIA's first softmax not saturated
    loss = GloriaLocalLoss(chunk_size=chunk)
    # radalign averages the two directions, the official code adds them: compare 2 x ours with theirs
    ours = lambda: 2 * loss(x["regions"], None, x["words"], mask)  # noqa: E731
    theirs = lambda: official.gloria_local(x["regions"], x["words"], lengths.tolist())  # noqa: E731
    return x, ours, theirs


def mgca_case(device: str) -> Case:
    """MGCA's default: ViT-B/16 (196 patches), 128-d, batch 144, 111-token reports (unpadded: see the module)."""
    g = torch.Generator().manual_seed(0)
    b, n, w, d = 144, 196, 111, 128
    x = _leaves(g, device, patches=(b, n, d), words=(b, w, d))
    word_weights = torch.rand(b, w, generator=g).to(device)
    patch_weights = torch.rand(b, n, generator=g).softmax(dim=1).to(device)
    patch_mask = torch.ones(b, n, dtype=torch.bool, device=device)
    word_mask = torch.ones(b, w, dtype=torch.bool, device=device)

    def ours() -> torch.Tensor:
        return mgca_token_loss(x["patches"], patch_mask, x["words"], word_mask, word_weights, patch_weights,
                               normalize_patch_context=False)  # fmt: skip

    return x, ours, lambda: official.mgca_token(x["patches"], x["words"], word_weights, patch_weights)


def lovt_case(device: str) -> Case:
    """LoVT's paper setting: batch 32, 7x7 regions, at most 10 sentences, 512-d; cross-attention + 4 terms."""
    g = torch.Generator().manual_seed(0)
    b, n, s, d = 32, 49, 10, 512
    _, sentence_mask = _lengths(g, b, 3, s, device)
    x = _leaves(g, device, regions=(b, n, d), sentences=(b, s, d))
    region_mask = torch.ones(b, n, dtype=torch.bool, device=device)
    rw, sw = torch.rand(b, n, generator=g).to(device), torch.rand(b, s, generator=g).to(device)
    torch.manual_seed(0)
    module = LovtCrossAttention(d).to(device).train()
    positives = spatial_positives((7, 7), device=device)

    def ours() -> torch.Tensor:
        sent2region, region2sent = module(x["regions"], region_mask, x["sentences"], sentence_mask)
        a = local_intra_sample_loss(x["regions"], sent2region, region_mask, positives, rw)
        t = local_intra_sample_loss(x["sentences"], region2sent, sentence_mask, None, sw)
        return sum(a) + sum(t)

    theirs = lambda: official.lovt_local(  # noqa: E731
        module, x["regions"], region_mask, x["sentences"], sentence_mask, positives, rw, sw
    )
    return x, ours, theirs


def prior_case(device: str) -> Case:
    """PRIOR's paper setting: batch 98 per GPU, 7x7 patches, 768-d, reports of 4-12 sentences (>= 4 kept)."""
    g = torch.Generator().manual_seed(0)
    b, n, s, d = 98, 49, 12, 768
    lengths, sentence_mask = _lengths(g, b, 4, s, device)
    x = _leaves(g, device, patches=(b, n, d), sentences=(b, s, d))
    torch.manual_seed(0)
    attention, predictor = PriorCrossAttention(d).to(device), SimSiamPredictor(d).to(device)
    log_scale = torch.tensor(math.log(100.0), device=device, requires_grad=True)

    def ours() -> torch.Tensor:
        text_ctx, image_ctx, _ = attention(x["patches"], None, x["sentences"], sentence_mask)
        return prior_image_local_loss(predictor, x["patches"], text_ctx) + prior_text_local_loss(
            image_ctx, x["sentences"], sentence_mask, log_scale
        )

    theirs = lambda: official.prior_local(  # noqa: E731
        attention, predictor, x["patches"], x["sentences"], lengths.tolist(), log_scale
    )
    return x, ours, theirs


OFFICIAL_CASES: dict[str, tuple[str, Callable[[str], Case]]] = {
    "GLoRIA local (default: chunk_size auto)": ("B48, 19x19 regions, <=25 words, 768-d", gloria_case),
    "GLoRIA local, all pairs at once": ("same", lambda device: gloria_case(device, chunk=None)),
    "GLoRIA local, chunk 8 recomputed": ("same", lambda device: gloria_case(device, chunk=8)),
    "MGCA token (ViT branch)": ("B144, 196 patches, 111 words, 128-d", mgca_case),
    "LoVT cross-attention + 4 local terms": ("B32, 7x7 regions, <=10 sentences, 512-d", lovt_case),
    "PRIOR local (image + text)": ("B98, 7x7 patches, 4-12 sentences, 768-d", prior_case),
}


def _timed(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], cuda: bool) -> tuple[float, torch.Tensor]:
    for leaf in leaves:
        leaf.grad = None
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.detach()


def measure_official(name: str, repeats: int, device: str) -> dict[str, float]:
    torch.set_flush_denormal(True)  # see measure()
    x, ours, theirs = OFFICIAL_CASES[name][1](device)
    leaves, cuda = list(x.values()), device.startswith("cuda")
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    values, grads = {}, {}
    for i in range(repeats + 1):  # the first round warms both up and is not timed
        for label, fn in (("ours", ours), ("theirs", theirs)):  # alternating: drift hits both alike
            seconds, loss = _timed(fn, leaves, cuda)
            if i:
                times[label].append(seconds)
            values[label] = float(loss)
            grads[label] = torch.cat([leaf.grad.flatten() for leaf in leaves])
    diff = max(abs(values["ours"] - values["theirs"]) / max(abs(values["theirs"]), 1e-12),
               float((grads["ours"] - grads["theirs"]).abs().max() / grads["theirs"].abs().max()))  # fmt: skip
    return {
        f"{k}_{stat}": fn(v) for k, v in times.items() for stat, fn in (("median", statistics.median), ("min", min))
    } | {"diff": diff}


def official_table(repeats: int, device: str) -> None:
    print(f"\nagainst the official formulations: forward + backward, median (min) of {repeats}, {device}")
    print("| loss | shapes | official (ms) | radalign (ms) | speed-up (median) | max rel. diff |")
    print("|---|---|--:|--:|--:|--:|")
    for name, (shapes, _) in OFFICIAL_CASES.items():
        command = [sys.executable, __file__, "--official-one", name, "--repeats", str(repeats), "--device", device]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        theirs = f"{1e3 * r['theirs_median']:.1f} ({1e3 * r['theirs_min']:.1f})"
        ours = f"{1e3 * r['ours_median']:.1f} ({1e3 * r['ours_min']:.1f})"
        speed = r["theirs_median"] / r["ours_median"]
        print(f"| {name} | {shapes} | {theirs} | {ours} | {speed:.2f}x | {r['diff']:.1e} |")
    print("target: >= 1x (never slower than the official formulation)")


def loop_table(batch: int, repeats: int, device: str) -> None:
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"batch {batch}, {D}-d, forward + backward, best of {repeats}, {device} ({where})")
    print("| loss | shapes | vectorised (s) | loop (s) | speed-up | extra peak MiB (vec / loop) | max rel. diff |")
    print("|---|---|--:|--:|--:|--:|--:|")
    shapes = {"gloria": "361 regions x 97 words", "mgca": "196 patches x 97 words", "lovt": "49 regions, 12 sent."}
    for name, variants in VARIANTS.items():
        result = {}
        for variant in variants:
            command = [sys.executable, __file__, "--one", name, variant, "--batch", str(batch),
                       "--repeats", str(repeats), "--device", device]  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=("loop", "official", "both"), default="both")
    parser.add_argument("--batch", type=int, default=32, help="batch of the loop table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--official-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement, so that its peak memory is its own
        print(json.dumps(measure(*args.one, args.batch, args.repeats, args.device)))
        return
    if args.official_one:
        print(json.dumps(measure_official(args.official_one, args.repeats, args.device)))
        return
    if args.table in ("loop", "both"):
        loop_table(args.batch, args.repeats, args.device)
    if args.table in ("official", "both"):
        official_table(args.repeats, args.device)


if __name__ == "__main__":
    main()
