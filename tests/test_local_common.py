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
