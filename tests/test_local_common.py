"""Shared pieces of the local-alignment objectives: masked softmax / mean and grid geometry."""

from __future__ import annotations

import math

import torch

from radalign.objectives.local.common import masked_mean, masked_softmax, normalised_grid_distances


def test_masked_softmax_ignores_masked_positions_and_never_gives_nan():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    weights = masked_softmax(logits, mask)
    expected = torch.softmax(torch.tensor([1.0, 3.0]), 0)
    assert torch.allclose(weights[0, [0, 2]], expected) and weights[0, 1] == 0
    assert torch.equal(weights[1], torch.zeros(3))  # an all-masked row: zeros, not NaN


def test_masked_softmax_masks_large_logits_exactly_and_passes_them_no_gradient():
    # Masked entries far larger than the valid ones: without the fill they would take all the weight.
    logits = torch.tensor([[1.0, 50.0, 3.0, -2.0], [1e4, 0.0, -1e4, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, True, False, True]])
    weights = masked_softmax(logits, mask)
    for row in range(2):
        valid = mask[row]
        assert torch.equal(weights[row][~valid], torch.zeros(int((~valid).sum())))
        torch.testing.assert_close(weights[row][valid], torch.softmax(logits[row][valid], 0))
    (weights * torch.arange(4.0)).sum().backward()
    assert torch.equal(logits.grad[~mask], torch.zeros(int((~mask).sum())))
    # broadcast masks (as the attention code passes them) and other dims
    scores = torch.randn(2, 3, 4)
    keys = torch.tensor([[True, True, False, True], [False, False, False, False]])
    out = masked_softmax(scores, keys[:, None, :], dim=-1)
    assert torch.equal(out[1], torch.zeros(3, 4)) and torch.allclose(out[0].sum(-1), torch.ones(3))
    over_rows = masked_softmax(scores, keys[:, None, :].transpose(1, 2)[:, :3], dim=1)  # (2, 3, 1) over dim 1
    assert torch.allclose(over_rows[0].sum(0), torch.ones(4))


def test_masked_mean_over_valid_positions():
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert torch.allclose(masked_mean(values, mask), torch.tensor([1.5, 0.0]))
    # a masked NaN / inf (a padded row's garbage) never reaches the mean; several dims at once
    values[0, 2], values[1, 0] = float("nan"), float("inf")
    assert torch.allclose(masked_mean(values, mask), torch.tensor([1.5, 0.0]))
    assert float(masked_mean(values, mask, dim=(0, 1))) == 1.5
    # nothing valid: 0, still connected to the graph (a loss of an all-padded batch can be backpropagated)
    leaf = torch.ones(2, 3, requires_grad=True)
    empty = masked_mean(leaf, torch.zeros(2, 3, dtype=torch.bool), dim=(0, 1))
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.equal(leaf.grad, torch.zeros(2, 3))


def test_grid_distances_are_row_major_and_normalised_by_the_diagonal():
    h, w = 3, 4
    d = normalised_grid_distances((h, w))
    for a in range(h * w):
        for b in range(h * w):
            (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
            assert math.isclose(float(d[a, b]), math.hypot(ya - yb, xa - xb) / math.hypot(h, w), rel_tol=1e-6)


def test_masked_fill_logits_keeps_valid_logits_and_makes_masked_ones_vanish_even_in_half_precision():
    from radalign.objectives.local.common import NEG, masked_fill_logits

    logits = torch.tensor([[3.0, -2.0, 40.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    filled = masked_fill_logits(logits, mask)
    assert torch.equal(filled[0, :2], logits[0, :2]) and (filled[~mask] == NEG).all()
    weights = filled.softmax(-1)
    assert weights[0, 2] < 1e-30 and torch.allclose(weights[0, :2], torch.softmax(logits[0, :2], 0))
    half = masked_fill_logits(logits.half(), mask).softmax(-1)  # an all-masked row stays finite (uniform), no NaN
    assert torch.isfinite(half).all() and torch.allclose(half[1].float(), torch.full((3,), 1 / 3), atol=1e-3)
    # a broadcast mask (True = keep), as the attention code passes one per key
    keys = torch.tensor([True, False, True])
    assert torch.equal(masked_fill_logits(logits, keys)[:, 1], torch.full((2,), NEG))


def test_masked_mean_defaults_to_the_last_dim_and_counts_a_single_valid_position_once():
    values = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[..., 1] = True  # exactly one valid position per row of the last dim
    torch.testing.assert_close(masked_mean(values, mask), values[..., 1])  # dim=-1 by default, not 1
