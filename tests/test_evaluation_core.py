"""The evaluation core: protocols, the context's datasets and dense targets, metrics with uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radalign.config import load_protocol
from radalign.errors import ConfigError
from radalign.evaluation.metrics import Metric, binary_auroc, bootstrap, over_seeds


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


def _pairs_auroc(labels, scores):
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_leaves_out_uncertain_and_missing_labels_and_macro_skips_undefined_columns():
    from radalign.evaluation.metrics import macro_auroc

    labels = np.array([[1, 0, 1], [0, 0, 1], [-1, 0, 0], [np.nan, 1, 0], [1, 0, 1], [0, -1, 1]], dtype=float)
    scores = np.array([[0.9, 0.1, 0.7], [0.2, 0.3, 0.2], [0.99, 0.5, 0.4], [0.0, 0.2, 0.9], [0.4, 0.8, 0.6],
                       [0.4, 0.6, 0.3]])  # fmt: skip
    keep = [
        0,
        1,
        4,
        5,
    ]  # column 0: rows labelled 0 or 1 only (the -1 and NaN rows score high and low: they must not count)
    assert binary_auroc(labels[:, 0], scores[:, 0]) == pytest.approx(_pairs_auroc(labels[keep, 0], scores[keep, 0]))
    assert binary_auroc(labels[:, 0], scores[:, 0]) == pytest.approx(0.875)  # a tie counts half: (1 + 1 + 1 + 0.5) / 4
    assert np.isnan(binary_auroc(np.array([1.0, 1.0, -1.0]), np.array([0.1, 0.2, 0.3])))  # one class: undefined
    expected = np.mean([_pairs_auroc(labels[keep, 0], scores[keep, 0]), _pairs_auroc(labels[:5, 1], scores[:5, 1]),
                        _pairs_auroc(labels[:, 2], scores[:, 2])])  # fmt: skip
    assert macro_auroc(labels, scores) == pytest.approx(expected)
    one_class = np.column_stack([labels[:, 0], np.ones(6)])
    assert macro_auroc(one_class, scores[:, :2]) == pytest.approx(binary_auroc(labels[:, 0], scores[:, 0]))
    assert np.isnan(macro_auroc(np.ones((3, 2)), np.zeros((3, 2))))


def test_bootstrap_is_a_point_without_resamples_and_an_exact_percentile_interval_with_them():
    values = np.arange(10, dtype=float)
    point = bootstrap(np.mean, values, resamples=0)
    assert (point.value, point.method, point.n, point.low) == (4.5, "point", 10, None)
    m = bootstrap(np.mean, values, resamples=50, seed=3, confidence=0.8)
    rng = np.random.default_rng(3)
    stats = [values[rng.integers(0, 10, 10)].mean() for _ in range(50)]
    assert (m.low, m.high) == pytest.approx(tuple(np.quantile(stats, [0.1, 0.9])))
    assert m.value == 4.5 and m.n == 10 and m.method == "bootstrap"
    assert str(m) == f"4.500 [{m.low:.3f}, {m.high:.3f}]" and str(over_seeds([0.5, 0.7])) == "0.600 ± 0.141"
    assert str(Metric(float("nan"))) == "n/a" and bootstrap(np.mean, np.array([1.0]), resamples=9).method == "point"


@pytest.mark.filterwarnings("ignore:Only one class is present")
def test_bootstrap_edges_one_run_two_rows_one_resample_and_refused_resamples():
    """The cases a mutation check found unguarded (docs/testing.md)."""
    from sklearn.metrics import roc_auc_score

    assert over_seeds([0.5]).std == 0.0 and over_seeds([0.5]).n == 1  # one run: no spread, not NaN
    assert str(over_seeds([0.5])) == "0.500 (1 seed)"  # and none printed: "± 0.000" would claim a measured zero
    assert over_seeds([float("nan")]).n == 0
    noisy = np.random.default_rng(4).normal(size=12)  # continuous: one resample more or less moves the quantiles
    assert bootstrap(np.mean, noisy) == bootstrap(np.mean, noisy, resamples=1000, seed=0)  # the documented defaults
    values = np.arange(10, dtype=float)
    assert bootstrap(np.mean, values[:2], resamples=5).method == "bootstrap"  # two rows can be resampled
    one = bootstrap(np.mean, values, resamples=1)
    assert one.method == "bootstrap" and one.low == one.high
    narrow = bootstrap(np.mean, values, resamples=40, confidence=0.4)
    rng = np.random.default_rng(0)
    stats = [values[rng.integers(0, 10, 10)].mean() for _ in range(40)]
    assert (narrow.low, narrow.high) == pytest.approx(tuple(np.quantile(stats, [0.3, 0.7])))
    # a one-class resample has no AUROC (NaN, or an error from some statistics): dropped, the others still count
    labels, scores = np.array([1.0, 0, 0, 0, 0, 1]), np.array([0.9, 0.1, 0.4, 0.3, 0.2, 0.6])
    m = bootstrap(roc_auc_score, labels, scores, resamples=30, seed=1)
    rng, kept = np.random.default_rng(1), []
    for _ in range(30):
        index = rng.integers(0, 6, 6)
        if 0 < labels[index].sum() < 6:
            kept.append(roc_auc_score(labels[index], scores[index]))
    assert len(kept) < 30 and (m.low, m.high) == pytest.approx(tuple(np.quantile(kept, [0.025, 0.975])))


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
