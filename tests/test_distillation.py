"""Momentum distillation targets and hard-negative mining (ALBEF; MLIP's divergence encoder and ITM)."""

from __future__ import annotations

import math

import pytest
import torch

from radalign.errors import ConfigError
from radalign.objectives.distillation import hard_negatives, momentum_targets, ramped_alpha


def test_momentum_targets_match_hand_computed_ones():
    sim = torch.tensor([[0.2, 0.1, -0.1], [0.0, 0.3, 0.1]])
    got = momentum_targets(sim, alpha=0.4, temperature=0.1, offset=1)  # rows 0-1 of this process = columns 1-2
    for i in range(2):
        z = sum(math.exp(float(s) / 0.1) for s in sim[i])
        for j in range(3):
            expected = 0.4 * math.exp(float(sim[i, j]) / 0.1) / z + 0.6 * (j == i + 1)
            assert float(got[i, j]) == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(2))
    assert torch.equal(momentum_targets(sim, 0.0, 0.1), torch.eye(2, 3))  # alpha 0: plain one-hot targets
    with pytest.raises(ConfigError, match="alpha must be in"):
        momentum_targets(sim, 1.5, 0.1)


def test_alpha_ramps_up_over_the_first_epoch():
    assert [ramped_alpha(0.4, s, 10) for s in (0, 5, 10, 30)] == [0.0, 0.2, 0.4, 0.4]


def test_hard_negatives_never_pick_the_positive_and_follow_the_seed():
    torch.manual_seed(0)
    sim = torch.randn(6, 6)
    for seed in range(50):
        texts, images = hard_negatives(sim, torch.Generator().manual_seed(seed))
        assert (texts != torch.arange(6)).all() and (images != torch.arange(6)).all()
    a = hard_negatives(sim, torch.Generator().manual_seed(3))
    b = hard_negatives(sim, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_hard_negatives_prefer_the_most_similar_other_item():
    sim = torch.full((3, 3), -5.0)
    sim[0, 2] = sim[1, 0] = sim[2, 1] = 5.0  # the hardest negative text of each image
    counts = torch.zeros(3, 3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        texts, _ = hard_negatives(sim, generator)
        counts[torch.arange(3), texts] += 1
    assert counts[0, 2] > 190 and counts[1, 0] > 190 and counts[2, 1] > 190
    with pytest.raises(ConfigError, match="batch of one"):
        hard_negatives(torch.zeros(1, 1), generator)
