"""PRIOR objectives: sigmoid cross-attention, the local losses, the prototype bank, Hungarian matching and the
reconstruction / KL losses, each against a plain loop reference (values and gradients) with padding masks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from radalign.errors import ConfigError
from radalign.objectives.local.prior import (
    PriorCrossAttention,
    SimSiamPredictor,
    prior_image_local_loss,
    prior_text_local_loss,
    sigmoid_cross_attention,
)
from radalign.objectives.prior import (
    SentencePrototypeBank,
    hungarian_match,
    prototype_kl_loss,
    prototype_perplexity,
    prototype_reconstruction_loss,
)

B, N, S, D, NP = 3, 4, 5, 8, 7
# Variable sentence counts: 5, 2, 1 (and a report with none in some tests).
SENTENCE_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
PATCH_MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(fn, *tensors):
    """Gradients of ``fn(*copies)`` w.r.t. fresh leaf copies of ``tensors``."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    fn(*leaves).backward()
    return [leaf.grad for leaf in leaves]


# ----------------------------------------------------------------------------------------------- cross-attention


def test_sigmoid_attention_masks_keys_and_is_not_normalised():
    q, k, v = _randn(B, N, D, seed=1), _randn(B, S, D, seed=2), _randn(B, S, D, seed=3)
    context, weights = sigmoid_cross_attention(q, k, v, SENTENCE_MASK)
    assert weights.shape == (B, N, S) and context.shape == (B, N, D)
    assert (weights[~SENTENCE_MASK[:, None, :].expand(B, N, S)] == 0).all()
    for b in range(B):
        for i in range(N):
            want_ctx = torch.zeros(D, dtype=torch.float64)
            for j in range(S):
                if SENTENCE_MASK[b, j]:
                    w = 1 / (1 + math.exp(-float(q[b, i] @ k[b, j]) / math.sqrt(D)))
                    assert_close(weights[b, i, j], torch.tensor(w, dtype=torch.float64))
                    want_ctx = want_ctx + w * v[b, j]
            assert_close(context[b, i], want_ctx)
    # Sigmoid gates, not a distribution: full rows of 5 keys do not sum to 1.
    assert not torch.allclose(weights[0].sum(-1), torch.ones(N, dtype=torch.float64))
    # Garbage in padded keys / values changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[~SENTENCE_MASK], v2[~SENTENCE_MASK] = 1e6, float("nan")
    context2, weights2 = sigmoid_cross_attention(q, k2, v2, SENTENCE_MASK)
    assert torch.equal(weights2, weights)
    assert torch.equal(context2, context)


def test_sigmoid_attention_orientation():
    keys = (3.0 * torch.eye(S, D, dtype=torch.float64))[None]  # orthogonal, scaled
    values = _randn(1, S, D, seed=4)
    for r in range(S):
        _, weights = sigmoid_cross_attention(keys[:, r : r + 1], keys, values, None)
        assert int(weights[0, 0].argmax()) == r
        assert float(weights[0, 0, r]) > 0.5 and torch.allclose(
            weights[0, 0, torch.arange(S) != r], torch.full((S - 1,), 0.5, dtype=torch.float64)
        )


def test_prior_cross_attention_matches_loop_and_ignores_padding():
    torch.manual_seed(0)
    attn = PriorCrossAttention(D).double()
    patches, sentences = _randn(B, N, D, seed=5), _randn(B, S, D, seed=6)
    c_txt, c_img, w = attn(patches, PATCH_MASK, sentences, SENTENCE_MASK)
    assert c_txt.shape == (B, N, D) and c_img.shape == (B, S, D) and w.shape == (B, N, S)
    q, k, v = attn.query, attn.key, attn.value

    def context(query, others, others_mask, b):
        """sum over the real rows o of others[b]: sigmoid(q(query) . k(o) / sqrt(D)) v(o)"""
        real = [o for o, keep in zip(others[b], others_mask[b], strict=True) if keep]
        return sum(torch.sigmoid(q(query) @ k(o) / math.sqrt(D)) * v(o) for o in real)

    for b in range(B):
        for i in range(N):
            assert_close(c_txt[b, i], context(patches[b, i], sentences, SENTENCE_MASK, b))
        for j in range(S):
            assert_close(c_img[b, j], context(sentences[b, j], patches, PATCH_MASK, b))
    # Padded sentences contribute nothing to the patch contexts; valid sentence rows unchanged by padded patches.
    s2, p2 = sentences.clone(), patches.clone()
    s2[~SENTENCE_MASK], p2[~PATCH_MASK] = 1e3, -1e3
    c_txt2, c_img2, _ = attn(p2, PATCH_MASK, s2, SENTENCE_MASK)
    assert_close(c_txt2[PATCH_MASK], c_txt[PATCH_MASK])
    assert_close(c_img2[SENTENCE_MASK], c_img[SENTENCE_MASK])
    assert torch.isfinite(c_img2).all()


def test_simsiam_predictor_shape():
    h = SimSiamPredictor(D)
    assert h.net[0].out_features == D // 2 and h.net[2].out_features == D
    assert SimSiamPredictor(D, hidden=3).net[0].out_features == 3
    assert h(torch.randn(B, N, D)).shape == (B, N, D)


# ------------------------------------------------------------------------------------------------- local losses


def _image_loss_reference(h, patches, context, mask, predictor_branch_only=False):
    total, count = patches.new_zeros(()), 0
    for b in range(patches.shape[0]):
        for i in range(patches.shape[1]):
            if not mask[b, i]:
                continue
            term = F.cosine_similarity(h(patches[b, i]), context[b, i].detach(), dim=0)
            if not predictor_branch_only:
                term = term + F.cosine_similarity(h(context[b, i]), patches[b, i].detach(), dim=0)
            else:
                # The other branch only touches patches through a detached target: its value, no gradient.
                term = term + F.cosine_similarity(h(context[b, i]), patches[b, i], dim=0).detach()
            total, count = total - term / 2, count + 1
    return total / count


def test_image_local_loss_matches_reference_values_and_gradients():
    torch.manual_seed(0)
    h = SimSiamPredictor(D).double()
    patches, context = _randn(B, N, D, seed=7), _randn(B, N, D, seed=8)
    for mask in (PATCH_MASK, None):
        ref_mask = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
        got = prior_image_local_loss(h, patches, context, mask)
        assert_close(got, _image_loss_reference(h, patches, context, ref_mask))
        g_got = _grads(lambda p, c, m=mask: prior_image_local_loss(h, p, c, m), patches, context)
        g_ref = _grads(lambda p, c, m=ref_mask: _image_loss_reference(h, p, c, m), patches, context)
        for a, b in zip(g_got, g_ref, strict=True):
            assert_close(a, b)
    assert (g_got[0] != 0).any()
    # Padded patches: garbage changes nothing.
    p2 = patches.clone()
    p2[~PATCH_MASK] = 1e4
    assert_close(
        prior_image_local_loss(h, p2, context, PATCH_MASK), prior_image_local_loss(h, patches, context, PATCH_MASK)
    )


def test_image_local_loss_stop_gradient():
    torch.manual_seed(1)
    h = SimSiamPredictor(D).double().requires_grad_(False)
    patches, context = _randn(B, N, D, seed=9), _randn(B, N, D, seed=10)
    (g_got,) = _grads(lambda p: prior_image_local_loss(h, p, context, PATCH_MASK), patches)
    (g_ref,) = _grads(lambda p: _image_loss_reference(h, p, context, PATCH_MASK, predictor_branch_only=True), patches)
    assert_close(g_got, g_ref)
    # Without the stop-gradient the patches' gradient would differ (guards the reference itself).
    (g_no_sg,) = _grads(
        lambda p: (
            -(F.cosine_similarity(h(p), context, dim=-1) + F.cosine_similarity(h(context), p, dim=-1))[
                PATCH_MASK
            ].mean()
            / 2
        ),
        patches,
    )
    assert not torch.allclose(g_got, g_no_sg)
    assert (g_got[~PATCH_MASK] == 0).all()


def test_image_local_loss_without_valid_patches_is_connected_zero():
    h = SimSiamPredictor(D).double()
    patches = _randn(B, N, D, seed=11).requires_grad_()
    loss = prior_image_local_loss(h, patches, _randn(B, N, D, seed=12), torch.zeros(B, N, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert (patches.grad == 0).all()


def _text_loss_reference(c, s, mask, log_scale, average="report"):
    """The official structure: a loop over reports, each report's mean over its sentences, then the mean over
    reports ("report"); or every sentence of the batch counted once ("sentence")."""
    scale = log_scale.exp()
    per_report, per_sentence = [], []
    for b in range(c.shape[0]):
        idx = [i for i in range(c.shape[1]) if mask[b, i]]
        if not idx:
            continue
        cb, sb = F.normalize(c[b, idx], dim=-1), F.normalize(s[b, idx], dim=-1)
        logits = cb @ sb.T * scale
        terms = []
        for i in range(len(idx)):
            c2s = -torch.log_softmax(logits[i], 0)[i]
            s2c = -torch.log_softmax(logits[:, i], 0)[i]
            terms.append((c2s + s2c) / 2)
        per_report.append(torch.stack(terms).mean())
        per_sentence += terms
    return torch.stack(per_report).mean() if average == "report" else torch.stack(per_sentence).mean()


def test_text_local_loss_matches_reference_values_and_gradients():
    c, s = _randn(B, S, D, seed=13), _randn(B, S, D, seed=14)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    cases = [SENTENCE_MASK, torch.cat([SENTENCE_MASK[:2], torch.zeros(1, S, dtype=torch.bool)])]  # + empty report
    for mask, average in itertools.product(cases, ("report", "sentence")):
        got = prior_text_local_loss(c, s, mask, log_scale, average)
        assert_close(got, _text_loss_reference(c, s, mask, log_scale, average))
        g_got = _grads(lambda a, b_, ls, m=mask, av=average: prior_text_local_loss(a, b_, m, ls, av), c, s, log_scale)
        g_ref = _grads(lambda a, b_, ls, m=mask, av=average: _text_loss_reference(a, b_, m, ls, av), c, s, log_scale)
        for a, b in zip(g_got, g_ref, strict=True):
            assert_close(a, b)
        assert (g_got[0][~mask] == 0).all() and (g_got[0][mask] != 0).any()
    # Padded sentences: garbage changes nothing; a single-sentence report alone gives exactly 0.
    mask = SENTENCE_MASK
    c2 = c.clone()
    c2[~mask] = 1e3
    assert_close(prior_text_local_loss(c2, s, mask, log_scale), prior_text_local_loss(c, s, mask, log_scale))
    one = torch.zeros(B, S, dtype=torch.bool)
    one[0, 2] = True
    assert float(prior_text_local_loss(c, s, one, log_scale)) == 0.0
    with pytest.raises(ConfigError, match="average"):
        prior_text_local_loss(c, s, mask, log_scale, "token")


def test_text_local_loss_default_weighs_reports_equally_as_the_official_code():
    # The batch: reports of 5, 3, 4 and 1 sentences. The official mean-of-report-means is the default; the
    # mean over all sentences lets the long reports weigh more, and differs by tens of percent here.
    counts = [5, 3, 4, 1]
    mask = torch.arange(5)[None, :] < torch.tensor(counts)[:, None]
    c, s = _randn(4, 5, D, seed=31), _randn(4, 5, D, seed=32)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    by_report = prior_text_local_loss(c, s, mask, log_scale)
    assert_close(by_report, _text_loss_reference(c, s, mask, log_scale, "report"))
    by_sentence = prior_text_local_loss(c, s, mask, log_scale, "sentence")
    assert abs(float(by_sentence / by_report) - 1) > 0.05


# ------------------------------------------------------------------------------------------ sentence prototypes


def _bank(mode: str = "softmax") -> SentencePrototypeBank:
    torch.manual_seed(0)
    return SentencePrototypeBank(NP, D, tau=0.9, eval_assignment=mode).double()


def test_bank_rejects_unknown_eval_assignment():
    with pytest.raises(ConfigError, match=r"'gumbel'.*softmax.*argmax"):
        SentencePrototypeBank(NP, D, eval_assignment="gumbel")


def test_bank_eval_is_deterministic_and_argmax_gives_codebook_rows():
    s = _randn(B, S, D, seed=15)
    for mode in ("softmax", "argmax"):
        bank = _bank(mode).eval()
        q1, l1, logits1 = bank(s, SENTENCE_MASK)
        q2, l2, logits2 = bank(s, SENTENCE_MASK)
        assert torch.equal(q1, q2) and torch.equal(l1, l2) and torch.equal(logits1, logits2)
        assert (q1[~SENTENCE_MASK] == 0).all()
        assert_close(logits1, s @ bank.codebook.T)
    bank = _bank("argmax").eval()
    q, _, logits = bank(s, SENTENCE_MASK)
    best = logits.argmax(-1)
    for b in range(B):
        for j in range(S):
            if SENTENCE_MASK[b, j]:
                assert torch.equal(q[b, j], bank.codebook[best[b, j]].detach())


def _bank_loss_reference(bank, s, mask):
    """Eval-mode (softmax) loss written per row."""
    total, count = s.new_zeros(()), 0
    for b in range(s.shape[0]):
        for j in range(s.shape[1]):
            if mask[b, j]:
                pi = torch.softmax(s[b, j] @ bank.codebook.T / bank.tau, 0)
                total, count = total + (pi @ bank.codebook - s[b, j]).abs().mean(), count + 1
    return total / count


def test_bank_loss_matches_reference_and_padding_is_ignored():
    bank = _bank().eval()
    s = _randn(B, S, D, seed=16)
    _, loss, _ = bank(s, SENTENCE_MASK)
    assert_close(loss, _bank_loss_reference(bank, s, SENTENCE_MASK))
    (g_got,) = _grads(lambda x: bank(x, SENTENCE_MASK)[1], s)
    (g_ref,) = _grads(lambda x: _bank_loss_reference(bank, x, SENTENCE_MASK), s)
    assert_close(g_got, g_ref)
    bank.zero_grad()
    bank(s, SENTENCE_MASK)[1].backward()
    cb_got = bank.codebook.grad.clone()
    bank.zero_grad()
    _bank_loss_reference(bank, s, SENTENCE_MASK).backward()
    assert_close(cb_got, bank.codebook.grad)
    s2 = s.clone()
    s2[~SENTENCE_MASK] = 1e4
    assert torch.equal(bank(s2, SENTENCE_MASK)[1], loss)
    # Training mode too (the noise is fixed by the seed).
    bank.train()
    torch.manual_seed(3)
    l_a = bank(s, SENTENCE_MASK)[1]
    torch.manual_seed(3)
    l_b = bank(s2, SENTENCE_MASK)[1]
    assert torch.equal(l_a, l_b)


def test_bank_training_is_stochastic_and_gradients_reach_codebook_and_sentences():
    bank = _bank().train()
    s = _randn(B, S, D, seed=17).requires_grad_()
    q1, loss, _ = bank(s, SENTENCE_MASK)
    q2, _, _ = bank(s, SENTENCE_MASK)
    assert not torch.equal(q1[SENTENCE_MASK], q2[SENTENCE_MASK])
    loss.backward()
    assert bank.codebook.grad is not None and (bank.codebook.grad != 0).any()
    assert (s.grad[SENTENCE_MASK] != 0).any() and (s.grad[~SENTENCE_MASK] == 0).all()


def test_prototype_perplexity_counts_the_prototypes_in_use():
    noise = 0.1 * _randn(8, NP)  # the nearest prototype, not the soft weights, counts
    even = torch.eye(NP)[[0, 1, 2, 3, 0, 1, 2, 3]] + noise  # 8 sentences, 4 prototypes used equally
    assert float(prototype_perplexity(even)) == pytest.approx(4.0)
    collapsed = torch.eye(NP)[[2] * 8] + noise
    assert float(prototype_perplexity(collapsed)) == pytest.approx(1.0)
    skewed = torch.eye(NP)[[0, 0, 0, 1]]  # shares 3/4, 1/4
    assert float(prototype_perplexity(skewed)) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )
    # padded sentences do not count: the two real rows are on prototype 5, the padding on four others
    logits = torch.eye(NP)[[5, 0, 1, 5, 2, 3]].reshape(2, 3, NP)
    mask = torch.tensor([[True, False, False], [True, False, False]])
    assert float(prototype_perplexity(logits, mask)) == pytest.approx(1.0)
    assert float(prototype_perplexity(logits)) == pytest.approx(
        math.exp(-(2 / 6) * math.log(2 / 6) - 4 * (1 / 6) * math.log(1 / 6))
    )
    assert math.isnan(float(prototype_perplexity(logits, torch.zeros(2, 3, dtype=torch.bool))))


# -------------------------------------------------------------------------------------------- Hungarian matching


@pytest.mark.parametrize(("q", "t"), [(5, 5), (6, 4), (3, 5)])
def test_hungarian_match_against_brute_force(q, t):
    for seed in range(3):
        cost = torch.rand(q, t, generator=torch.Generator().manual_seed(seed))
        rows, cols = hungarian_match(cost)
        k = min(q, t)
        assert rows.dtype == torch.long and len(rows) == len(cols) == k
        assert len(set(rows.tolist())) == k and len(set(cols.tolist())) == k
        if q >= t:
            best = min(sum(float(cost[p[j], j]) for j in range(t)) for p in itertools.permutations(range(q), t))
        else:
            best = min(sum(float(cost[i, p[i]]) for i in range(q)) for p in itertools.permutations(range(t), q))
        assert math.isclose(float(cost[rows, cols].double().sum()), best, rel_tol=1e-6)


# ----------------------------------------------------------------------------------- reconstruction and KL losses

Q, T = 4, 3
TARGET_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)


def _reconstruction_reference(outputs, targets, mask):
    """Brute-force matching over all injective maps of the valid targets into the queries, then the L1 mean."""
    total, count = outputs.new_zeros(()), 0
    for b in range(outputs.shape[0]):
        idx = [t for t in range(targets.shape[1]) if mask[b, t]]
        if not idx:
            continue

        def cost(p, b=b, idx=idx):
            return sum((outputs[b, p[k]] - targets[b, t]).abs().mean().item() for k, t in enumerate(idx))

        best = min(itertools.permutations(range(outputs.shape[1]), len(idx)), key=cost)
        for k, t in enumerate(idx):
            total, count = total + (outputs[b, best[k]] - targets[b, t]).abs().mean(), count + 1
    return total / count


def test_reconstruction_loss_matches_reference_values_and_gradients():
    outputs, targets = _randn(B, Q, D, seed=18), _randn(B, T, D, seed=19)
    loss, matched, match_mask = prototype_reconstruction_loss(outputs, targets, TARGET_MASK)
    assert_close(loss, _reconstruction_reference(outputs, targets, TARGET_MASK))
    assert torch.equal(match_mask, TARGET_MASK) and (matched[~TARGET_MASK] == 0).all()
    for b in range(B):  # each matched row is one of the outputs, all distinct
        rows = [int((outputs[b] == matched[b, t]).all(-1).nonzero()) for t in range(T) if TARGET_MASK[b, t]]
        assert len(set(rows)) == len(rows)
    g_got = _grads(lambda o, t: prototype_reconstruction_loss(o, t, TARGET_MASK)[0], outputs, targets)
    g_ref = _grads(lambda o, t: _reconstruction_reference(o, t, TARGET_MASK), outputs, targets)
    for a, b in zip(g_got, g_ref, strict=True):
        assert_close(a, b)


def test_reconstruction_loss_permuted_targets_and_padding_regression():
    outputs = _randn(B, Q, D, seed=20)
    perm = torch.tensor([2, 0, 3])
    targets = outputs[:, perm].clone()
    loss, matched, _ = prototype_reconstruction_loss(outputs, targets, torch.ones(B, T, dtype=torch.bool))
    assert float(loss) == 0.0 and torch.equal(matched, targets)
    # Official bug 3: padded slots must not count. Huge padded targets leave the loss unchanged.
    targets = _randn(B, T, D, seed=21)
    base = prototype_reconstruction_loss(outputs, targets, TARGET_MASK)[0]
    t2 = targets.clone()
    t2[~TARGET_MASK] = 1e6
    assert_close(prototype_reconstruction_loss(outputs, t2, TARGET_MASK)[0], base)
    # Zeroed padded targets (what the official code fed in) also leave it unchanged, while counting them would not.
    t3 = targets.clone()
    t3[~TARGET_MASK] = 0.0
    assert_close(prototype_reconstruction_loss(outputs, t3, TARGET_MASK)[0], base)
    assert not torch.allclose(prototype_reconstruction_loss(outputs, t3, torch.ones(B, T, dtype=torch.bool))[0], base)


def test_reconstruction_loss_more_targets_than_queries():
    outputs, targets = _randn(1, 2, D, seed=22), _randn(1, 3, D, seed=23)
    loss, _, match_mask = prototype_reconstruction_loss(outputs, targets, torch.ones(1, 3, dtype=torch.bool))
    assert int(match_mask.sum()) == 2
    cost = (outputs[0][:, None] - targets[0][None]).abs().mean(-1)  # (2, 3)
    best = min(float(cost[0, a] + cost[1, b]) for a, b in itertools.permutations(range(3), 2))
    assert_close(loss, torch.tensor(best / 2, dtype=torch.float64))


def test_reconstruction_compares_each_target_with_its_own_output_not_the_official_bug_6():
    # Official bug 6: spg_loss indexes the outputs with the matching's target side (logit[inds[1]]), right only when
    # the assignment is its own inverse. Minimal case: output q equals target (q + 1) mod 3 (a 3-cycle).
    targets = torch.eye(3, dtype=torch.float64)[None]  # (1, 3, 3)
    outputs = targets[:, [1, 2, 0]].clone()
    loss, matched, _ = prototype_reconstruction_loss(outputs, targets, torch.ones(1, 3, dtype=torch.bool))
    assert float(loss) == 0.0 and torch.equal(matched, targets)  # the best matching costs 0, and so does the loss
    rows, cols = hungarian_match((outputs[0][:, None] - targets[0][None]).abs().mean(-1))
    assert cols.tolist() == [1, 2, 0] and rows.tolist() == [0, 1, 2]
    official = (outputs[0][cols] - targets[0]).abs().mean()  # what logit[inds[1]] compares with the targets
    assert float(official) == pytest.approx(2 / 3)


def _kl_reference(sentence_logits, output_logits, mask):
    total, count = sentence_logits.new_zeros(()), 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                p = torch.softmax(sentence_logits[b, t], 0)
                total = total + (p * (p.log() - torch.log_softmax(output_logits[b, t], 0))).sum()
                count += 1
    return total / count


def test_kl_loss_matches_reference_and_is_zero_for_equal_logits():
    sl, ol = _randn(B, T, NP, seed=24), _randn(B, T, NP, seed=25)
    assert_close(prototype_kl_loss(sl, ol, TARGET_MASK), _kl_reference(sl, ol, TARGET_MASK))
    assert float(prototype_kl_loss(sl, ol, TARGET_MASK)) > 0
    assert_close(prototype_kl_loss(sl, sl.clone(), TARGET_MASK), torch.tensor(0.0, dtype=torch.float64))
    g_got = _grads(lambda a, b: prototype_kl_loss(a, b, TARGET_MASK), sl, ol)
    g_ref = _grads(lambda a, b: _kl_reference(a, b, TARGET_MASK), sl, ol)
    for a, b in zip(g_got, g_ref, strict=True):
        assert_close(a, b)
    ol2 = ol.clone()
    ol2[~TARGET_MASK] = 1e4
    assert_close(prototype_kl_loss(sl, ol2, TARGET_MASK), prototype_kl_loss(sl, ol, TARGET_MASK))


def test_half_precision_runs():
    bank = SentencePrototypeBank(NP, D).eval()
    s = torch.randn(B, S, D).to(torch.bfloat16)
    q, loss, logits = bank(s, SENTENCE_MASK)
    assert q.dtype == torch.bfloat16 and torch.isfinite(loss) and loss.dtype == torch.float32
    loss_r, matched, _ = prototype_reconstruction_loss(s[:, :Q], s[:, :T], TARGET_MASK)
    assert matched.dtype == torch.bfloat16 and torch.isfinite(loss_r)
    assert torch.isfinite(prototype_kl_loss(logits[:, :T], logits[:, :T], TARGET_MASK))
