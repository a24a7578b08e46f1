"""MGCA's token-level loss and prototype loss against plain loop references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from radalign.objectives.local.mgca import clip_percentile_weights, mgca_token_loss
from radalign.objectives.prototype import PrototypeLoss, sinkhorn_knopp


def _reference_weights(raw: torch.Tensor | None, n: int, clip: bool) -> torch.Tensor:
    if raw is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    raw = raw.detach()
    if clip:
        raw = raw.clamp(torch.quantile(raw, 0.1).item(), torch.quantile(raw, 0.9).item())
    return raw / raw.sum()


def _reference_direction(
    queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, tau: float, normalize: bool = True
) -> torch.Tensor:
    """Queries attend over keys; weighted InfoNCE between each query and the attended vectors, both directions."""
    ctx = []
    for i in range(len(queries)):
        a = torch.softmax(torch.stack([queries[i] @ k / tau for k in keys]), 0)
        c = sum(a[j] * keys[j] for j in range(len(keys)))
        ctx.append(c / c.norm() if normalize else c)
    loss = torch.zeros((), dtype=queries.dtype)
    for i in range(len(queries)):
        to_ctx = torch.stack([queries[i] @ c / tau for c in ctx]).log_softmax(0)[i]
        to_query = torch.stack([q @ ctx[i] / tau for q in queries]).log_softmax(0)[i]
        loss = loss - weights[i] * (to_ctx + to_query) / 2
    return loss


def _reference_token_loss(
    patches, patch_mask, words, word_mask, word_weights, patch_weights, tau=0.1, normalize_patch=True, clip_patch=True
):
    losses = []
    for b in range(patches.shape[0]):
        if not word_mask[b].any() or not patch_mask[b].any():
            continue
        p = F.normalize(patches[b][patch_mask[b]], dim=-1)
        w = F.normalize(words[b][word_mask[b]], dim=-1)
        ww = _reference_weights(None if word_weights is None else word_weights[b][word_mask[b]], len(w), True)
        pw = _reference_weights(None if patch_weights is None else patch_weights[b][patch_mask[b]], len(p), clip_patch)
        losses.append(_reference_direction(w, p, ww, tau) + _reference_direction(p, w, pw, tau, normalize_patch))
    return torch.stack(losses).mean()


def _official_token_loss(patches, words, word_mask, word_weights, patch_weights, vit: bool, tau=0.1):
    """MGCA's own batched formulation (mgca_module.py, forward): [PAD] words masked with -inf as keys of the
    patch->word attention only (elsewhere they are negatives), weighted cross-entropies summed and divided by the
    batch size. Its ViT branch leaves the patch contexts raw and
    clips the patch weights; its CNN branch normalises them and weighs patches uniformly."""
    b, n, _ = patches.shape
    patch_emb, word_emb = F.normalize(patches, dim=-1), F.normalize(words, dim=-1)
    ww = word_weights.clone()
    for i in range(b):  # the percentile over the non-zero weights (padding has weight 0 here)
        nz = ww[i].nonzero().squeeze(1)
        ww[i, nz] = ww[i, nz].clip(torch.quantile(ww[i, nz], 0.1), torch.quantile(ww[i, nz], 0.9))
    ww = ww / ww.sum(dim=1, keepdim=True)
    word_ctx = F.normalize(torch.softmax(word_emb @ patch_emb.transpose(1, 2) / tau, -1) @ patch_emb, dim=-1)
    word_sim = word_emb @ word_ctx.transpose(1, 2) / tau
    targets = torch.arange(word_sim.shape[1]).repeat(b)
    loss_word_1 = F.cross_entropy(word_sim.reshape(-1, word_sim.shape[2]), targets, reduction="none") * ww.view(-1)
    loss_word_2 = F.cross_entropy(word_sim.transpose(1, 2).reshape(-1, word_sim.shape[1]), targets, reduction="none")
    loss_word = (loss_word_1.sum() / b + (loss_word_2 * ww.view(-1)).sum() / b) / 2
    scores = patch_emb @ word_emb.transpose(1, 2)
    scores = scores.masked_fill(~word_mask[:, None, :], float("-inf"))
    patch_ctx = torch.softmax(scores / tau, -1) @ word_emb
    if vit:
        pw = torch.stack([row.clip(torch.quantile(row, 0.1), torch.quantile(row, 0.9)) for row in patch_weights])
    else:
        patch_ctx = F.normalize(patch_ctx, dim=-1)
        pw = torch.ones(b, n, dtype=patches.dtype)
    pw = pw / pw.sum(dim=1, keepdim=True)
    patch_sim = patch_emb @ patch_ctx.transpose(1, 2) / tau
    targets = torch.arange(n).repeat(b)
    loss_patch_1 = F.cross_entropy(patch_sim.reshape(-1, n), targets, reduction="none") * pw.view(-1)
    loss_patch_2 = F.cross_entropy(patch_sim.transpose(1, 2).reshape(-1, n), targets, reduction="none") * pw.view(-1)
    return loss_word + (loss_patch_1.sum() / b + loss_patch_2.sum() / b) / 2


def _token_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, w, d = 4, 6, 5, 8
    patches = torch.randn(b, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    words = torch.randn(b, w, d, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 3, 1, 0])  # variable report lengths, one empty report (excluded from the mean)
    word_mask = torch.arange(w)[None, :] < lengths[:, None]
    patch_mask = torch.ones(b, n, dtype=torch.bool)
    patch_mask[1, 4:] = False  # a padded image
    word_weights = torch.rand(b, w, generator=g, dtype=torch.float64)
    patch_weights = torch.rand(b, n, generator=g, dtype=torch.float64).softmax(dim=1)
    return patches, patch_mask, words, word_mask, word_weights, patch_weights


def test_token_loss_and_gradients_match_the_loop_reference():
    patches, patch_mask, words, word_mask, word_weights, patch_weights = _token_inputs()
    cases = [  # (word weights, patch weights, normalise patch contexts, clip patch weights)
        (word_weights, patch_weights, True, True),
        (None, None, True, True),
        (word_weights, patch_weights, False, True),
        (word_weights, patch_weights, True, False),
    ]
    for ww, pw, normalize, clip in cases:
        loss = mgca_token_loss(
            patches, patch_mask, words, word_mask, ww, pw, normalize_patch_context=normalize, clip_patch_weights=clip
        )
        grads = torch.autograd.grad(loss, (patches, words))
        ref = _reference_token_loss(patches, patch_mask, words, word_mask, ww, pw, 0.1, normalize, clip)
        ref_grads = torch.autograd.grad(ref, (patches, words))
        assert loss.dtype == torch.float64 and torch.allclose(loss, ref, atol=1e-10)
        for got, want in zip(grads, ref_grads, strict=True):
            assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-10)
        assert grads[1][3].abs().sum() == 0  # padded words get no gradient


def test_token_loss_equals_mgca_code_in_its_vit_and_cnn_branches():
    g = torch.Generator().manual_seed(5)
    b, n, w, d = 3, 7, 6, 8
    patches = torch.randn(b, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    words = torch.randn(b, w, d, generator=g, dtype=torch.float64, requires_grad=True)
    # MGCA lets [PAD] words be negatives (radalign does not: a [design] reading), so compare on unpadded reports
    word_mask = torch.ones(b, w, dtype=torch.bool)
    word_weights = torch.rand(b, w, generator=g, dtype=torch.float64) + 0.1
    patch_weights = torch.rand(b, n, generator=g, dtype=torch.float64).softmax(dim=1)
    patch_mask = torch.ones(b, n, dtype=torch.bool)
    for vit in (True, False):
        got = mgca_token_loss(
            patches, patch_mask, words, word_mask, word_weights, patch_weights if vit else None,
            normalize_patch_context=not vit,
        )  # fmt: skip
        want = _official_token_loss(patches, words, word_mask, word_weights, patch_weights, vit)
        assert torch.allclose(got, want, atol=1e-10), (vit, got, want)
        for a, c in zip(torch.autograd.grad(got, (patches, words)), torch.autograd.grad(want, (patches, words)),
                        strict=True):  # fmt: skip
            assert torch.allclose(a, c, atol=1e-10)
    # the two branches differ: a silent switch of the default would show
    vit_loss = mgca_token_loss(patches, patch_mask, words, word_mask, word_weights, patch_weights, 0.1, False, True)
    assert not torch.allclose(
        vit_loss, mgca_token_loss(patches, patch_mask, words, word_mask, word_weights, patch_weights)
    )


def test_token_loss_weights_are_detached_and_padding_values_are_ignored():
    patches, patch_mask, words, word_mask, word_weights, patch_weights = _token_inputs(1)
    word_weights.requires_grad_(True)
    loss = mgca_token_loss(patches, patch_mask, words, word_mask, word_weights, patch_weights)
    assert not torch.autograd.grad(loss, word_weights, allow_unused=True, materialize_grads=True)[0].any()
    garbage_p = patches.detach().masked_fill(~patch_mask[..., None], 1e3)
    garbage_w = words.detach().masked_fill(~word_mask[..., None], -7.0)
    other = mgca_token_loss(garbage_p, patch_mask, garbage_w, word_mask, word_weights, patch_weights)
    assert torch.allclose(loss, other, atol=1e-12)


def test_percentile_clipping_matches_numpy_quantile_without_padding():
    weights = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.05, 0.7, 100.0], [3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 6 + [False], [True, True, True, False, False, False, False]])
    got = clip_percentile_weights(weights.double(), mask).numpy()
    for row in range(2):
        valid = weights[row][mask[row]].double().numpy()
        lo, hi = np.quantile(valid, 0.1), np.quantile(valid, 0.9)
        np.testing.assert_allclose(got[row][mask[row].numpy()], np.clip(valid, lo, hi), atol=1e-12)
        assert (got[row][~mask[row].numpy()] == 0).all()
    single = clip_percentile_weights(torch.tensor([[2.0, 9.0]]), torch.tensor([[True, False]]))
    assert torch.equal(single, torch.tensor([[2.0, 0.0]]))  # one valid word: its own quantiles


def _reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    b, k = scores.shape
    q = [[float(np.exp(scores[i, j].item() / epsilon)) for i in range(b)] for j in range(k)]  # (K, B)
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            s = sum(q[j])
            q[j] = [v / s / k for v in q[j]]
        for i in range(b):
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / s / b
    out = [[q[j][i] / sum(q[jj][i] for jj in range(k)) for j in range(k)] for i in range(b)]
    return torch.tensor(out, dtype=torch.float64)


def test_sinkhorn_matches_a_loop_and_balances_the_prototypes():
    g = torch.Generator().manual_seed(0)
    b, k = 12, 4
    scores = F.normalize(torch.randn(b, 6, generator=g, dtype=torch.float64), dim=1)
    scores = scores @ F.normalize(torch.randn(k, 6, generator=g, dtype=torch.float64), dim=1).T  # (B, K)
    q = sinkhorn_knopp(scores, 0.05, 3)
    assert torch.allclose(q, _reference_sinkhorn(scores, 0.05, 3), rtol=1e-9, atol=1e-12)
    assert torch.allclose(q.sum(dim=1), torch.ones(b, dtype=torch.float64))
    uniform = torch.full((k,), b / k, dtype=torch.float64)
    softmax_gap = ((scores / 0.05).softmax(dim=1).sum(dim=0) - uniform).abs().max()
    assert (q.sum(dim=0) - uniform).abs().max() < softmax_gap
    converged = sinkhorn_knopp(scores, 0.05, 500)
    assert torch.allclose(converged.sum(dim=0), uniform, atol=1e-6)
    assert not sinkhorn_knopp(scores.clone().requires_grad_(True)).requires_grad
    shifted = (10.0 + scores).float()  # exp(10 / 0.05) overflows float32: the max is subtracted first
    assert torch.allclose(sinkhorn_knopp(shifted), sinkhorn_knopp(scores.float()), atol=1e-5)


def test_prototype_loss_matches_a_direct_computation_and_codes_carry_no_gradient():
    torch.manual_seed(0)
    module = PrototypeLoss(dim=6, n_prototypes=5, tau=0.2).double()
    with torch.no_grad():
        module.prototypes.mul_(3.0)  # forward must re-normalise them first
    image = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    text = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    loss = module(image, text)
    assert torch.allclose(module.prototypes.norm(dim=1), torch.ones(5, dtype=torch.float64))
    loss.backward()

    protos = module.prototypes.detach().clone().requires_grad_(True)
    img2, txt2 = image.detach().clone().requires_grad_(True), text.detach().clone().requires_grad_(True)
    s_img, s_txt = F.normalize(img2, dim=1) @ protos.T, F.normalize(txt2, dim=1) @ protos.T
    q_img, q_txt = _reference_sinkhorn(s_img.detach(), 0.05, 3), _reference_sinkhorn(s_txt.detach(), 0.05, 3)
    i2t = -(q_img * torch.log_softmax(s_txt / 0.2, 1)).sum(1).mean()
    t2i = -(q_txt * torch.log_softmax(s_img / 0.2, 1)).sum(1).mean()
    ref = (i2t + t2i) / 2
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-10)
    for got, want in [(module.prototypes.grad, protos.grad), (image.grad, img2.grad), (text.grad, txt2.grad)]:
        assert got is not None and got.abs().sum() > 0 and torch.allclose(got, want, atol=1e-10)


def test_a_few_adam_steps_lower_the_token_loss():
    torch.manual_seed(0)
    patches = torch.randn(3, 9, 16, requires_grad=True)
    words = torch.randn(3, 5, 16, requires_grad=True)
    patch_mask = torch.ones(3, 9, dtype=torch.bool)
    word_mask = torch.arange(5)[None, :] < torch.tensor([[5], [4], [2]])
    word_weights = torch.rand(3, 5)
    opt = torch.optim.Adam([patches, words], lr=0.05)
    losses = []
    for _ in range(20):
        loss = mgca_token_loss(patches, patch_mask, words, word_mask, word_weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_all_zero_word_weights_fall_back_to_uniform():
    patches, patch_mask, words, word_mask, _, _ = _token_inputs(2)
    zero = mgca_token_loss(patches, patch_mask, words, word_mask, torch.zeros(4, 5, dtype=torch.float64))
    assert torch.allclose(zero, mgca_token_loss(patches, patch_mask, words, word_mask, None), atol=1e-12)


def _sinkhorn_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = torch.load(Path(out_dir) / "scores.pt")
        torch.save(sinkhorn_knopp(data["scores"][data["rows"][rank]], 0.05, 3), Path(out_dir) / f"codes{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """DDP: the prototypes share the *global* batch (SwAV's distributed_sinkhorn), uneven shards included."""
    import torch.multiprocessing as mp

    scores = torch.randn(10, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = [torch.arange(0, 3), torch.arange(3, 10)]
    torch.save({"scores": scores, "rows": rows}, tmp_path / "scores.pt")
    mp.spawn(_sinkhorn_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    shards = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    whole = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(shards, whole, rtol=1e-12, atol=1e-12)
    # and one process per shard without the all-reduce would not: the check has teeth
    assert not torch.allclose(torch.cat([sinkhorn_knopp(scores[r], 0.05, 3) for r in rows]), whole, atol=1e-6)
