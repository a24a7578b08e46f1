"""GLoRIA's local loss: the vectorised version against a loop reference in the style of the official code."""

from __future__ import annotations

import math

import pytest
import torch

from radalign.errors import ConfigError
from radalign.objectives.local.gloria import (
    GloriaLocalLoss,
    gloria_attention,
    gloria_global_loss,
    gloria_local_scores,
    resolve_chunking,
)

WORD_LENGTHS = [6, 3, 4, 1]  # variable report lengths, one report with a single word
REGION_LENGTHS = [5, 5, 3, 4]  # some images with padded regions
W, N, D = 6, 5, 8


def _lengths_to_mask(lengths: list[int], size: int) -> torch.Tensor:
    return torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]


def _batch(seed: int = 0, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(len(WORD_LENGTHS), W, D, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    regions = torch.randn(len(REGION_LENGTHS), N, D, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return words, _lengths_to_mask(WORD_LENGTHS, W), regions, _lengths_to_mask(REGION_LENGTHS, N)


def _reference_pair(word: torch.Tensor, region: torch.Tensor, temp1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``attention_fn`` on one (report, image) pair, already cut to its valid words / regions."""
    attn = torch.softmax(word @ region.T, dim=0)  # (n_words, n_regions): over words first
    attn = torch.softmax(attn * temp1, dim=1)  # then over regions
    return attn @ region, attn


def _reference_scores(words, word_mask, regions, region_mask, temp1=4.0, temp2=5.0, agg="sum") -> torch.Tensor:
    """Loops over images, reports and words, slicing by length instead of masking."""
    rows = []
    for i in range(regions.shape[0]):
        region = regions[i, region_mask[i]]
        row = []
        for j in range(words.shape[0]):
            word = words[j, word_mask[j]]
            context, _ = _reference_pair(word, region, temp1)
            sims = []
            for w in range(word.shape[0]):
                cos = torch.dot(word[w], context[w]) / (word[w].norm() * context[w].norm())
                sims.append(torch.exp(temp2 * cos))
            total = torch.stack(sims).sum()
            row.append(torch.log(total if agg == "sum" else total / len(sims)))
        rows.append(torch.stack(row))
    return torch.stack(rows)  # (B_img, B_txt)


def _reference_loss(words, word_mask, regions, region_mask, agg="sum", temp3=10.0) -> torch.Tensor:
    logits = temp3 * _reference_scores(words, word_mask, regions, region_mask, agg=agg)
    b = logits.shape[0]
    i2t = sum(-torch.log_softmax(logits[i], 0)[i] for i in range(b)) / b
    t2i = sum(-torch.log_softmax(logits[:, j], 0)[j] for j in range(b)) / b
    return (i2t + t2i) / 2


@pytest.mark.parametrize("agg", ["sum", "mean"])
def test_scores_loss_and_attention_match_the_loop_reference(agg):
    words, word_mask, regions, region_mask = _batch()
    scores = gloria_local_scores(words, word_mask, regions, region_mask, agg=agg)
    assert scores.shape == (4, 4)
    torch.testing.assert_close(scores, _reference_scores(words, word_mask, regions, region_mask, agg=agg))
    loss = GloriaLocalLoss(agg=agg)(regions, region_mask, words, word_mask)
    torch.testing.assert_close(loss, _reference_loss(words, word_mask, regions, region_mask, agg=agg))
    maps = GloriaLocalLoss(agg=agg).attention_maps(regions, region_mask, words, word_mask)
    for b in range(4):
        _, ref = _reference_pair(words[b, word_mask[b]], regions[b, region_mask[b]], 4.0)
        torch.testing.assert_close(maps[b, : WORD_LENGTHS[b], : REGION_LENGTHS[b]], ref)
        assert maps[b, :, REGION_LENGTHS[b] :].abs().sum() == 0  # padded regions get no attention


def test_gradients_match_the_loop_reference():
    words, word_mask, regions, region_mask = _batch(seed=1, requires_grad=True)
    loss = GloriaLocalLoss()(regions, region_mask, words, word_mask)
    grads = torch.autograd.grad(loss, (words, regions))
    ref_grads = torch.autograd.grad(_reference_loss(words, word_mask, regions, region_mask), (words, regions))
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref)
    assert grads[0][~word_mask].abs().sum() == 0 and grads[1][~region_mask].abs().sum() == 0


def test_each_word_attends_to_the_region_it_equals():
    b, w, n, d = 3, 4, 6, 16
    g = torch.Generator().manual_seed(2)
    regions = 3.0 * torch.linalg.qr(torch.randn(b, d, n, generator=g))[0].transpose(1, 2)  # (B, N, D) orthogonal
    targets = torch.stack([torch.randperm(n, generator=g)[:w] for _ in range(b)])  # (B, W): region of word k
    words = torch.stack([regions[i, targets[i]] for i in range(b)])  # (B, W, D)
    _, attention = gloria_attention(words, regions)
    assert attention.shape == (b, w, n)
    assert torch.equal(attention.argmax(dim=-1), targets)  # rows are words, columns regions of the same sample
    torch.testing.assert_close(attention.sum(-1), torch.ones(b, w))


def test_padded_words_and_regions_cannot_change_the_result():
    words, word_mask, regions, region_mask = _batch(seed=3)
    loss_fn = GloriaLocalLoss()
    before = (loss_fn.scores(regions, region_mask, words, word_mask), loss_fn(regions, region_mask, words, word_mask))
    words2, regions2 = words.clone(), regions.clone()
    words2[~word_mask] = 100.0 * torch.randn(int((~word_mask).sum()), D, dtype=torch.float64)
    regions2[~region_mask] = -50.0 * torch.randn(int((~region_mask).sum()), D, dtype=torch.float64)
    after = (
        loss_fn.scores(regions2, region_mask, words2, word_mask),
        loss_fn(regions2, region_mask, words2, word_mask),
    )
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(x, y)


def test_mean_aggregation_differs_from_sum_by_the_log_word_count():
    words, word_mask, regions, region_mask = _batch(seed=4)
    s_sum = gloria_local_scores(words, word_mask, regions, region_mask, agg="sum")
    s_mean = gloria_local_scores(words, word_mask, regions, region_mask, agg="mean")
    assert not torch.allclose(s_sum, s_mean)
    logn = torch.tensor(WORD_LENGTHS, dtype=torch.float64).log()
    torch.testing.assert_close(s_sum - s_mean, logn.expand(4, 4))  # log-mean-exp, as the official code
    loss_sum = GloriaLocalLoss(agg="sum")(regions, region_mask, words, word_mask)
    loss_mean = GloriaLocalLoss(agg="mean")(regions, region_mask, words, word_mask)
    assert not torch.isclose(loss_sum, loss_mean)  # report lengths differ, so the image->text rows change
    with pytest.raises(ConfigError):
        GloriaLocalLoss(agg="max")


def test_adam_on_features_lowers_the_loss_and_finds_the_pairs():
    torch.manual_seed(5)
    b, w, n, d = 6, 5, 9, 16
    words = torch.randn(b, w, d, requires_grad=True)
    regions = torch.randn(b, n, d, requires_grad=True)
    word_mask = _lengths_to_mask([5, 4, 3, 5, 2, 5], w)
    region_mask = _lengths_to_mask([9, 9, 7, 9, 8, 9], n)
    loss_fn = GloriaLocalLoss()
    opt = torch.optim.Adam([words, regions], lr=0.05)
    first = None
    for _ in range(60):
        loss = loss_fn(regions, region_mask, words, word_mask)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(loss_fn(regions, region_mask, words, word_mask))
        hits = (loss_fn.scores(regions, region_mask, words, word_mask).argmax(dim=1) == torch.arange(b)).sum()
    assert final < 0.5 * first
    assert int(hits) >= b - 1


def test_global_loss_is_symmetric_cosine_cross_entropy():
    g = torch.Generator().manual_seed(6)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    cos = torch.tensor([[float(torch.cosine_similarity(a, t, dim=0)) for t in txt] for a in img])
    expected = 0.5 * sum(
        -torch.log_softmax(10.0 * cos[i], 0)[i] - torch.log_softmax(10.0 * cos[:, i], 0)[i] for i in range(5)
    )
    torch.testing.assert_close(gloria_global_loss(img, txt), expected / 5)
    assert math.isfinite(float(gloria_global_loss(img, img)))


@pytest.mark.parametrize(("chunk", "recompute"), [(1, True), (3, True), (3, False), ("auto", True)])
def test_chunked_scores_equal_the_all_at_once_ones(chunk, recompute):
    """chunk_size blocks the reports (recomputed in backward for bounded memory, or stored) without changing
    anything; trailing padding is cut before the all-pairs attention."""
    words, word_mask, regions, region_mask = _batch()
    grads = []
    for size in (None, chunk):
        w, r = words.clone().requires_grad_(), regions.clone().requires_grad_()
        loss = GloriaLocalLoss(chunk_size=size, recompute=recompute)(r, region_mask, w, word_mask)
        loss.backward()
        grads.append((loss.detach(), w.grad, r.grad))
    for whole, chunked in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(chunked, whole)
    # A chunk of reports without any word (cut to one masked slot, not to none): finite and the same as at once.
    empty = word_mask.clone()
    empty[1] = False
    at_once = gloria_local_scores(words, empty, regions, region_mask, chunk_size=None)
    by_one = gloria_local_scores(words, empty, regions, region_mask, chunk_size=1, recompute=recompute)
    assert torch.isfinite(by_one).all() and torch.allclose(by_one, at_once)
    for bad in (0, "fast", 2.5):
        with pytest.raises(ConfigError, match="chunk_size"):
            gloria_local_scores(words, word_mask, regions, region_mask, chunk_size=bad)


def test_auto_chunking_is_blocks_of_8_on_the_cpu_and_all_pairs_on_a_gpu():
    assert resolve_chunking("auto", True, torch.device("cpu")) == (8, False)
    assert resolve_chunking("auto", True, torch.device("cuda")) == (None, False)
    assert resolve_chunking(4, True, torch.device("cuda")) == (4, True)  # an explicit size bounds the memory
    assert resolve_chunking(None, True, torch.device("cpu")) == (None, True)
