"""The evaluation core: protocols, the context's datasets and dense targets, metrics with uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radalign.errors import ConfigError
from radalign.evaluation.metrics import Metric, binary_auroc, bootstrap, over_seeds
from radalign.evaluation.protocol import load_protocol


def test_shipped_protocols_load_and_overrides_reach_task_params():
    protocol = load_protocol("quick", {"seeds": [3], "tasks.linear_probe.epochs": 2})
    assert protocol.name == "quick" and protocol.seeds == [3]
    assert protocol.task("linear_probe").params["epochs"] == 2
    with pytest.raises(ConfigError, match="imagesize"):
        load_protocol("quick", {"imagesize": 3})
    with pytest.raises(ConfigError, match="no task named 'probe'"):
        load_protocol("quick", {"tasks.probe.epochs": 2})


def test_bootstrap_interval_brackets_the_value_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)

    def interval(n):
        labels = rng.integers(0, 2, n).astype(float)
        scores = labels + rng.normal(0, 1.0, n)
        return bootstrap(binary_auroc, labels, scores, resamples=300)

    small, large = interval(60), interval(2000)
    for m in (small, large):
        assert m.method == "bootstrap" and m.low <= m.value <= m.high
    assert (large.high - large.low) < (small.high - small.low) / 2


def test_over_seeds_is_mean_and_sample_std():
    m = over_seeds([0.6, 0.8, float("nan")])
    assert m.value == pytest.approx(0.7) and m.std == pytest.approx(np.std([0.6, 0.8], ddof=1)) and m.n == 2
    assert Metric.from_dict(m.to_dict()) == m


def test_dense_targets_follow_the_image_through_pad_and_resize(eval_context):
    dataset = eval_context.dense_dataset("test")
    k = eval_context.vocabulary.index("cardiomegaly")
    found = False
    for i in range(len(dataset)):
        item = dataset[i]
        if item["masks"][k].any():
            found = True
            assert item["masks"].shape == (len(eval_context.vocabulary), 64, 64)
            rows, cols = torch.nonzero(item["masks"][k], as_tuple=True)
            box = item["boxes"][item["box_labels"] == k][0]
            # the mask lies inside (a pixel around) its box, both in the transformed image's grid
            assert cols.min() >= box[0] - 1.5 and cols.max() <= box[2] + 1.5
            assert rows.min() >= box[1] - 1.5 and rows.max() <= box[3] + 1.5
            break
    assert found, "the simulated test split should hold a cardiomegaly mask"


def test_features_and_embeddings_are_cached_per_split(eval_context):
    a = eval_context.features("train")
    assert a is eval_context.features("train")
    assert a.x.shape[0] == len(a.ids) == a.labels.shape[0]
    embedded = eval_context.embedded("test")
    assert embedded.texts is not None and torch.allclose(embedded.images.norm(dim=1), torch.ones(len(embedded.ids)))
