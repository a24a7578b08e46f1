"""LoVT local alignment: the vectorised loss against a plain loop reference, spatial positives, cross-attention."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from radalign.errors import ConfigError
from radalign.objectives.local.lovt import LovtCrossAttention, local_intra_sample_loss, spatial_positives

GRID = (3, 4)


def _reference_loss(z, z_att, mask, positives, weights, tau):
    """The loss written out per sample and per local, only over the valid locals."""
    b_size, length, _ = z.shape
    l2att_total, att2l_total = z.new_zeros(()), z.new_zeros(())
    for b in range(b_size):
        idx = [i for i in range(length) if bool(mask[b, i])]
        if not idx:
            continue
        zb, ab = F.normalize(z[b, idx], dim=-1), F.normalize(z_att[b, idx], dim=-1)
        s = zb @ ab.T / tau
        p = torch.eye(length, dtype=z.dtype) if positives is None else positives.to(z.dtype)
        p = p[idx][:, idx]
        p = p / p.sum(dim=1, keepdim=True)
        w = torch.ones(len(idx), dtype=z.dtype) if weights is None else weights.detach()[b, idx].to(z.dtype)
        w = w / w.sum()
        for n in range(len(idx)):
            l2att = -sum(p[n, k] * s[n, k] for k in range(len(idx))) + torch.logsumexp(s[n, :], 0)
            att2l = -sum(p[n, k] * s[k, n] for k in range(len(idx))) + torch.logsumexp(s[:, n], 0)
            l2att_total = l2att_total + w[n] * l2att
            att2l_total = att2l_total + w[n] * att2l
    return l2att_total / b_size, att2l_total / b_size


def _inputs(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, length, 6, generator=g, dtype=torch.float64)
    z_att = torch.randn(3, length, 6, generator=g, dtype=torch.float64)
    weights = torch.rand(3, length, generator=g, dtype=torch.float64) + 0.1
    return z, z_att, weights


def test_loss_matches_loop_reference_for_regions_and_sentences():
    # Regions on a 3x4 grid with spatial positives and some padded cells; weights given.
    z, z_att, weights = _inputs(12)
    region_mask = torch.ones(3, 12, dtype=torch.bool)
    region_mask[1, [0, 5, 11]] = False
    positives = spatial_positives(GRID)
    got = local_intra_sample_loss(z, z_att, region_mask, positives, weights, tau=0.3)
    want = _reference_loss(z, z_att, region_mask, positives, weights, 0.3)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-10), (g, w)
    # Sentences: variable counts (incl. a sample with one sentence), identity positives, uniform weights.
    z, z_att, _ = _inputs(5, seed=1)
    sentence_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = local_intra_sample_loss(z, z_att, sentence_mask, None, None, tau=0.3)
    want = _reference_loss(z, z_att, sentence_mask, None, None, 0.3)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-10), (g, w)
    # Per-local weights are normalised per sample: their scale is irrelevant, also when they sum to less than 1
    # (attention-pool weights sum to exactly 1, which would hide a wrong floor on the sum)
    z3, z3_att, weights = _inputs(12, seed=2)
    scaled = [local_intra_sample_loss(z3, z3_att, region_mask, positives, weights * c, tau=0.3) for c in (1.0, 1e-3)]
    for a, b in zip(*scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Padded positions carry garbage that must not matter.
    z2 = z.clone()
    z2[~sentence_mask] = 1e3
    assert all(torch.equal(a, b) for a, b in zip(local_intra_sample_loss(z2, z_att, sentence_mask), got, strict=True))


def test_gradients_match_reference_and_weights_are_detached():
    z, z_att, weights = _inputs(12, seed=2)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 7:] = False
    positives = spatial_positives(GRID)
    grads = []
    for fn in (local_intra_sample_loss, _reference_loss):
        zz, aa = z.clone().requires_grad_(), z_att.clone().requires_grad_()
        ww = weights.clone().requires_grad_()
        l2att, att2l = fn(zz, aa, mask, positives, ww, 0.3)
        (l2att + 2.0 * att2l).backward()
        assert ww.grad is None  # the attention-pool weights get no gradient from this loss
        grads.append((zz.grad, aa.grad))
    for g, w in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(g, w, atol=1e-10)
    assert torch.count_nonzero(grads[0][0][2, 7:]) == 0  # padded locals get no gradient


def test_spatial_positives_are_thresholded_exponentials_of_normalised_distance():
    h, w = GRID
    p = spatial_positives(GRID, threshold=0.5)
    assert torch.allclose(p.sum(dim=1), torch.ones(h * w))
    for a in range(h * w):
        for b in range(h * w):
            (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
            d = math.hypot(ya - yb, xa - xb) / math.hypot(h, w)
            if d > 0.5:
                assert p[a, b] == 0
            else:  # relative to the cell itself (d = 0, exp(0) = 1), so the row normaliser cancels
                assert math.isclose(float(p[a, b] / p[a, a]), math.exp(-d), rel_tol=1e-5)
    assert torch.equal(spatial_positives(GRID, smooth=False), torch.eye(h * w))
    assert torch.equal(spatial_positives(GRID), p)  # the default threshold is LoVT's 0.5


def test_the_distance_threshold_is_inclusive_on_the_grids_the_configs_use():
    # 2x2 (tiny configs at 64 px) and 4x4 (128 px) have cell pairs at exactly half the diagonal: they are positives
    # (d <= 0.5); just past it they are not. The 3x4 grid above has no such pair.
    for grid in ((2, 2), (4, 4)):
        h, w = grid
        p = spatial_positives(grid, threshold=0.5)
        for a in range(h * w):
            for b in range(h * w):
                (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
                d = math.hypot(ya - yb, xa - xb) / math.hypot(h, w)
                assert (p[a, b] > 0) == (d <= 0.5 + 1e-9), (grid, a, b, d)
    assert (spatial_positives((2, 2)) > 0).all()  # diagonal neighbours at d = 0.5 exactly
    assert torch.count_nonzero(spatial_positives((2, 2), threshold=0.49)) == 4 * 3  # itself + 2 neighbours, no diagonal


def _identity_attention(dim: int) -> LovtCrossAttention:
    module = LovtCrossAttention(dim)
    with torch.no_grad():
        for lin in (module.key, module.value, module.out):
            lin.weight.copy_(torch.eye(dim))
        module.out.bias.zero_()
    return module.eval()


def test_cross_attention_orientation_and_padding():
    dim = 8
    module = _identity_attention(dim)
    regions = 4.0 * torch.eye(dim)[:6].repeat(2, 1, 1)  # (2, 6, 8): region r is the scaled one-hot e_r
    region_mask = torch.ones(2, 6, dtype=torch.bool)
    picks = [[3, 1, 5], [0, 2]]  # sentence j of sample b equals region picks[b][j]
    sentences = torch.randn(2, 4, dim) * 10  # padded sentences: large garbage
    sentence_mask = torch.zeros(2, 4, dtype=torch.bool)
    for b, pb in enumerate(picks):
        sentences[b, : len(pb)] = regions[b, pb]
        sentence_mask[b, : len(pb)] = True
    r2s, s2r = module.attention(regions, region_mask, sentences, sentence_mask)
    for b, pb in enumerate(picks):
        for j, r in enumerate(pb):
            assert int(r2s[b, r].argmax()) == j  # region r attends most to the sentence equal to it
            assert int(s2r[b, j].argmax()) == r  # that sentence attends most to region r
    assert torch.count_nonzero(r2s[~sentence_mask[:, None, :].expand_as(r2s)]) == 0
    sent2region, region2sent = module(regions, region_mask, sentences, sentence_mask)
    assert sent2region.shape == (2, 6, dim) and region2sent.shape == (2, 4, dim)
    # With identity projections and fresh BN (eval), the output for region r is close to its matching sentence.
    assert torch.allclose(sent2region[0, 3], regions[0, 3], atol=0.1)
    assert torch.allclose(region2sent[1, 1], regions[1, 2], atol=0.1)
    assert torch.count_nonzero(region2sent[~sentence_mask]) == 0


def _reference_cross_attention(module, regions, region_mask, sentences, sentence_mask, with_means=False):
    """The official CrossAttention written out per sample: project keys and values of both sides, softmax over the
    other side's valid items, attend, project the output; then BatchNorm over the valid rows of the batch."""
    dim = module.dim
    s2r_rows, r2s_rows = [], []
    for b in range(regions.shape[0]):
        r, s = regions[b][region_mask[b]], sentences[b][sentence_mask[b]]
        kr, ks = module.key(r), module.key(s)
        scores = kr @ ks.T / math.sqrt(dim)  # (N_b, S_b)
        s2r_rows.append(module.out(torch.softmax(scores, dim=1) @ module.value(s)))  # per region
        r2s_rows.append(module.out(torch.softmax(scores.T, dim=1) @ module.value(r)))  # per sentence
    outs, means = [], []
    for rows, bn in ((s2r_rows, module.bn_sent2region), (r2s_rows, module.bn_region2sent)):
        flat = torch.cat(rows)
        mean, var = flat.mean(0), flat.var(0, unbiased=False)  # training-mode BN statistics
        outs.append((flat - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
        means.append(mean)
    return (outs, means) if with_means else outs


def test_cross_attention_matches_the_official_formulas_with_biases():
    torch.manual_seed(0)
    dim = 6
    module = LovtCrossAttention(dim).double().train()
    assert module.key.bias is not None and module.value.bias is not None  # the official nn.Linear(d, d_k)
    with torch.no_grad():  # biases trained away from their zero init, so that they matter
        for layer in (module.key, module.value, module.out):
            layer.bias.normal_()
    regions = torch.randn(3, 5, dim, dtype=torch.float64)
    region_mask = torch.ones(3, 5, dtype=torch.bool)
    region_mask[1, 3:] = False
    sentences = torch.randn(3, 4, dim, dtype=torch.float64)
    sentence_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    sent2region, region2sent = module(regions, region_mask, sentences, sentence_mask)
    want, means = _reference_cross_attention(module, regions, region_mask, sentences, sentence_mask, True)
    assert torch.allclose(sent2region[region_mask], want[0], atol=1e-10)
    assert torch.allclose(region2sent[sentence_mask], want[1], atol=1e-10)
    # train-mode BN removes a constant shift, so the output bias shows only in the running statistics (eval mode)
    for bn, mean in zip((module.bn_sent2region, module.bn_region2sent), means, strict=True):
        torch.testing.assert_close(bn.running_mean, bn.momentum * mean, rtol=1e-9, atol=1e-12)
    # The key bias is not a no-op (it shifts every score by <b, W z>): dropping it changes the outputs.
    no_key_bias = copy.deepcopy(module)
    no_key_bias.key.bias = None
    assert not torch.allclose(no_key_bias(regions, region_mask, sentences, sentence_mask)[0], sent2region)
    assert LovtCrossAttention(dim, bias=False).key.bias is None
    # Infinite garbage in padded rows changes nothing.
    r2, s2 = regions.clone(), sentences.clone()
    r2[~region_mask], s2[~sentence_mask] = float("inf"), float("-inf")
    for a, b in zip(module(r2, region_mask, s2, sentence_mask), (sent2region, region2sent), strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-12)


def test_padding_changes_nothing_including_batchnorm_statistics():
    torch.manual_seed(0)
    dim = 8
    module = LovtCrossAttention(dim).train()
    regions = torch.randn(3, 12, dim)
    region_mask = torch.ones(3, 12, dtype=torch.bool)
    region_mask[2, 9:] = False
    sentences = torch.randn(3, 5, dim)
    sentence_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    m1, m2 = copy.deepcopy(module), copy.deepcopy(module)
    out1 = m1(regions, region_mask, sentences, sentence_mask)
    regions2, sentences2 = regions.clone(), sentences.clone()
    regions2[~region_mask] = 100.0 * torch.randn(int((~region_mask).sum()), dim)
    sentences2[~sentence_mask] = -50.0 * torch.randn(int((~sentence_mask).sum()), dim)
    out2 = m2(regions2, region_mask, sentences2, sentence_mask)
    for a, b, valid in zip(out1, out2, (region_mask, sentence_mask), strict=True):
        assert torch.allclose(a[valid], b[valid], atol=1e-6)
        assert torch.allclose(a[valid].mean(0), torch.zeros(dim), atol=1e-5)  # normalised over valid rows only
    for bn in ("bn_sent2region", "bn_region2sent"):
        assert torch.allclose(getattr(m1, bn).running_mean, getattr(m2, bn).running_mean)
        assert torch.allclose(getattr(m1, bn).running_var, getattr(m2, bn).running_var)


def test_adam_steps_on_learnable_features_lower_the_total_local_loss():
    torch.manual_seed(0)
    dim = 16
    module = LovtCrossAttention(dim).train()
    regions = torch.randn(4, 12, dim, requires_grad=True)
    sentences = torch.randn(4, 5, dim, requires_grad=True)
    region_mask = torch.ones(4, 12, dtype=torch.bool)
    sentence_mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 4 + [0]], dtype=torch.bool)
    region_weights = torch.rand(4, 12)
    positives = spatial_positives(GRID)
    opt = torch.optim.Adam([regions, sentences, *module.parameters()], lr=0.02)

    def total() -> torch.Tensor:
        sent2region, region2sent = module(regions, region_mask, sentences, sentence_mask)
        terms = (
            *local_intra_sample_loss(regions, sent2region, region_mask, positives, region_weights),
            *local_intra_sample_loss(sentences, region2sent, sentence_mask),
        )
        return 0.375 * sum(terms)

    with torch.no_grad():
        first = float(total())
    for _ in range(30):
        opt.zero_grad()
        loss = total()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(total()) < 0.8 * first


def test_initialisation_is_the_official_kaiming_fan_out_or_pytorchs_default():
    torch.manual_seed(0)
    dim = 256
    official, default = LovtCrossAttention(dim), LovtCrossAttention(dim, init="torch")
    for layer in ("key", "value", "out"):
        w_official, w_default = getattr(official, layer).weight, getattr(default, layer).weight
        # Kaiming normal, fan-out, linear gain: std 1 / sqrt(dim); nn.Linear: U(-1/sqrt(dim), 1/sqrt(dim))
        assert abs(float(w_official.std()) * math.sqrt(dim) - 1) < 0.02
        assert abs(float(w_default.std()) * math.sqrt(3 * dim) - 1) < 0.02
        assert float(w_default.abs().max()) <= 1 / math.sqrt(dim)
        assert torch.count_nonzero(getattr(official, layer).bias) == 0
    with pytest.raises(ConfigError, match="init must be one of official, torch"):
        LovtCrossAttention(dim, init="xavier")
