"""Linear probe and fine-tuning: learning, early stopping, label fractions, metrics, and the real context."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from radalign.config import TaskSpec
from radalign.errors import ConfigError, DataError
from radalign.evaluation.context import Features
from radalign.evaluation.probe import fit, loss_fn, predict, run_finetune, run_linear_probe, sample_subset, scores


class FakeContext:
    """The parts of EvalContext the linear probe reads, over given per-split features."""

    def __init__(self, splits: dict[str, Features], findings: list[str], out: Path, seeds=(0, 1)) -> None:
        self.splits, self.vocabulary, self.out = splits, tuple(findings), out
        self.protocol = SimpleNamespace(seeds=list(seeds), splits={r: r for r in ("train", "val", "test")})
        self.device, self.progress = torch.device("cpu"), False
        self.method = SimpleNamespace(global_feature_name="the fake method's own pooled vector")
        self.kinds: list[str] = []  # the feature kinds the probe asked for

    def features(self, role: str, kind: str = "global") -> Features:
        self.kinds.append(kind)
        return self.splits[role]

    def figure(self, task: str, filename: str) -> tuple[Path, str]:
        rel = f"figures/{task}/{filename}"
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        return self.out / rel, rel


def separable(n: int, seed: int, dim: int = 16, findings: int = 2, flip: bool = False) -> Features:
    """Features whose finding labels are signs of fixed linear directions (shared across splits)."""
    w = torch.randn(dim, findings, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    labels = ((x @ w) > 0).numpy().astype(np.float32)
    return Features(x, 1 - labels if flip else labels, [f"{seed}-{i}" for i in range(n)])


def probe_spec(**params) -> TaskSpec:
    return TaskSpec("linear_probe", params={"fractions": [1.0], "epochs": 20, "lr": 5e-2, "batch_size": 512, **params})


def test_probe_learns_separable_features_and_beats_shuffled_labels(tmp_path):
    splits = {"train": separable(300, 1), "val": separable(100, 2), "test": separable(200, 3)}
    result = run_linear_probe(FakeContext(splits, ["a", "b"], tmp_path), probe_spec())
    good = result.metrics["auroc@100%"]
    assert good.value > 0.9 and good.n == 2 and good.std is not None
    assert result.metrics["auroc@100%/a"].value > 0.9
    assert (tmp_path / result.figures[0]).is_file()

    shuffled = separable(300, 1)
    shuffled.labels = shuffled.labels[np.random.default_rng(0).permutation(300)]
    splits["train"] = shuffled
    noise = run_linear_probe(FakeContext(splits, ["a", "b"], tmp_path), probe_spec()).metrics["auroc@100%"]
    assert noise.value < 0.7 < good.value


def test_multiclass_probe_reports_accuracy_and_macro_f1(tmp_path):
    def one_hot(n: int, seed: int) -> Features:
        features = separable(n, seed, findings=3)
        scores = features.x @ torch.randn(16, 3, generator=torch.Generator().manual_seed(99))
        labels = np.eye(3, dtype=np.float32)[scores.argmax(1).numpy()]
        labels[:5] = 0  # rows without a positive: left out of a multi-class task
        return Features(features.x, labels, features.ids)

    splits = {"train": one_hot(300, 1), "val": one_hot(100, 2), "test": one_hot(200, 3)}
    result = run_linear_probe(FakeContext(splits, list("abc"), tmp_path), probe_spec(label_type="multiclass"))
    assert set(result.metrics) == {"accuracy@100%", "macro_f1@100%"}
    assert result.metrics["accuracy@100%"].value > 0.85 and result.metrics["macro_f1@100%"].value > 0.8
    assert result.details["runs"][0]["n_train"] == 295


def test_early_stopping_keeps_the_best_validation_epoch():
    train, val = separable(200, 1), separable(100, 2, flip=True)  # every training step hurts validation
    head = torch.nn.Linear(16, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    x, y = train.x, torch.from_numpy(train.labels)
    val_batches = lambda: [(val.x, torch.from_numpy(val.labels))]  # noqa: E731
    losses = []

    def tracked():
        losses.append(float(loss_fn(*predict(head, val_batches()), "multilabel")))
        return [(x, y)]

    best, ran = fit(head, optimizer, tracked, val_batches, "multilabel", epochs=40, patience=3)
    assert best < ran < 40 and ran == best + 3
    # the restored weights are the best epoch's: their validation loss is below what training went on to reach
    restored = float(loss_fn(*predict(head, val_batches()), "multilabel"))
    assert restored == pytest.approx(losses[best]) == pytest.approx(min(losses[1:]))  # losses[i]: after epoch i
    assert restored < losses[-1]


def test_fraction_subsets_have_the_documented_minimum_and_depend_on_the_seed():
    # each finding is positive in 3 rows of its own and negative elsewhere: the greedy cover is exactly
    # one positive per finding (3 rows, each negative for the other findings) plus one negative for the first
    labels = np.zeros((300, 3), dtype=np.float32)
    for k in range(3):
        labels[[k, 100 + k, 200 + k], k] = 1
    labels[50:60, 1] = np.nan
    labels[60:70, 2] = -1
    a, b = sample_subset(labels, 0.01, seed=0), sample_subset(labels, 0.01, seed=1)
    for rows in (a, b):
        assert len(rows) == 4 > round(0.01 * 300) and len(set(rows)) == 4
        assert ((labels[rows] == 1).any(axis=0) & (labels[rows] == 0).any(axis=0)).all()
    assert set(a) != set(b)
    assert np.array_equal(sample_subset(labels, 0.01, seed=0), a)
    assert len(sample_subset(labels, 0.1, seed=0)) == 30 and len(sample_subset(labels, 0.5, seed=0)) == 150
    assert np.array_equal(sample_subset(labels, 1.0, seed=3), np.arange(300))

    classes = np.eye(4, dtype=np.float32)[np.r_[np.zeros(300, int), np.ones(100, int), [2] * 5, [3]]]
    rows = sample_subset(classes, 0.01, seed=0, label_type="multiclass")
    assert np.bincount(classes[rows].argmax(1), minlength=4).tolist() == [2, 2, 2, 1]  # round(4.06) = 4 < 7
    assert set(rows) != set(sample_subset(classes, 0.01, seed=1, label_type="multiclass"))


def test_scores_match_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (60, 3)).astype(np.float32)
    labels[rng.random((60, 3)) < 0.15] = -1
    labels[rng.random((60, 3)) < 0.15] = np.nan
    logits = torch.from_numpy(rng.normal(size=(60, 3)).astype(np.float32)) + torch.from_numpy(labels).nan_to_num()
    result = scores(logits, torch.from_numpy(labels), "multilabel", ["a", "b", "c"])
    expected = []
    for k, name in enumerate("abc"):
        keep = np.isin(labels[:, k], (0, 1))
        expected.append(roc_auc_score(labels[keep, k], torch.sigmoid(logits[keep, k]).numpy()))
        assert result["per_finding"][name] == pytest.approx(expected[-1])
    assert result["auroc"] == pytest.approx(np.mean(expected))

    truth = rng.integers(0, 3, 50)
    onehot = np.eye(3, dtype=np.float32)[truth]
    logits = torch.from_numpy(rng.normal(size=(50, 3)).astype(np.float32) + onehot)
    result = scores(logits, torch.from_numpy(onehot), "multiclass", ["a", "b", "c"])
    pred = logits.argmax(1).numpy()
    assert result["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert result["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))


def test_masked_bce_ignores_uncertain_and_missing_labels_per_finding():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, float("nan")], [-1.0, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0]))
    assert float(loss_fn(logits, labels, "multilabel")) == pytest.approx(float(expected))


def test_clear_errors_for_unusable_labels_and_params(tmp_path):
    splits = {"train": separable(50, 1), "val": separable(20, 2), "test": separable(20, 3)}
    splits["train"].labels[:] = np.nan
    with pytest.raises(DataError, match="split 'train' has no 0/1 label"):
        run_linear_probe(FakeContext(splits, ["a", "b"], tmp_path), probe_spec())
    with pytest.raises(DataError, match="exactly one positive"):
        run_linear_probe(FakeContext(splits, ["a", "b"], tmp_path), probe_spec(label_type="multiclass"))
    with pytest.raises(ConfigError, match="encoder_lr_ratio"):
        run_linear_probe(FakeContext(splits, ["a", "b"], tmp_path), probe_spec(encoder_lr_ratio=0.1))
    with pytest.raises(ConfigError, match="lr must be a float"):
        run_linear_probe(FakeContext(splits, ["a", "b"], tmp_path), probe_spec(lr="5e-4"))
    with pytest.raises(ConfigError, match="fractions"):
        run_linear_probe(FakeContext(splits, ["a", "b"], tmp_path), probe_spec(fractions=[0.0, 1.0]))


def test_probe_and_finetune_on_the_evaluation_context(eval_context):
    params = {"fractions": [0.5, 1.0], "epochs": 2, "batch_size": 16, "patience": 2}
    encoder = eval_context.method.image_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    probe = run_linear_probe(eval_context, TaskSpec("linear_probe", params=params))
    tuned = run_finetune(eval_context, TaskSpec("finetune", params={**params, "batch_size": 48}))
    for result in (probe, tuned):
        assert {"auroc@50%", "auroc@100%", "auroc@100%/cardiomegaly"} <= set(result.metrics)
        for name in ("auroc@50%", "auroc@100%"):
            metric = result.metrics[name]
            assert np.isfinite(metric.value) and metric.n == 2 and np.isfinite(metric.std)
        assert (eval_context.out / result.figures[0]).is_file()
        runs = result.details["runs"]
        assert len(runs) == 4 and {r["seed"] for r in runs} == {0, 1}
        n_train = result.details["n_train_rows"]
        assert sorted({r["n_train"] for r in runs}) == [int(n_train / 2 + 0.5), n_train]  # 50% > the minimum
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_probe_reads_the_methods_own_global_features_by_default_and_records_which(tmp_path):
    splits = {role: separable(120, seed) for role, seed in (("train", 0), ("val", 1), ("test", 2))}
    ctx = FakeContext(splits, ["a", "b"], tmp_path, seeds=(0,))
    result = run_linear_probe(ctx, probe_spec())
    assert set(ctx.kinds) == {"global"} and result.details["features"] == "the fake method's own pooled vector"
    ctx.kinds.clear()
    result = run_linear_probe(ctx, probe_spec(features="backbone"))
    assert set(ctx.kinds) == {"backbone"} and result.details["features"] == "the image encoder's pooled output"
    with pytest.raises(ConfigError, match="features must be one of global, backbone"):
        run_linear_probe(ctx, probe_spec(features="pooled"))
