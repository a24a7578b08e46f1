"""Detection evaluation: fROC by hand, the mAP wrapper against torchmetrics, the detectors' wiring, the task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radalign.config import TaskSpec
from radalign.errors import ConfigError
from radalign.evaluation.detection import (
    build_detector,
    froc_curve,
    mean_average_precision,
    run_detection,
    sensitivity_at,
)
from radalign.models.image import TimmImageEncoder

FPS = [0.125, 0.25, 0.5, 1, 2, 4, 8]


def _det(boxes, scores, labels=None):
    labels = labels or [0] * len(boxes)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}  # fmt: skip


def _froc_example():
    """Two images, three true boxes of class 0; detections in score order:
    0.9 A exact on g1 (TP) | 0.85 B nowhere (FP) | 0.8 A on g1 again (duplicate, ignored) | 0.7 A nowhere (FP) |
    0.6 B IoU 0.68 with g3 (TP) | 0.3 A tiny box inside g2: IoU 0.04, centre inside (FP by IoU, TP by centre) |
    0.2 B nowhere (FP). A class-1 detection on g1 must not count for class 0."""
    preds = [
        _det([[0, 0, 10, 10], [1, 1, 11, 11], [40, 40, 50, 50], [24, 24, 26, 26], [0, 0, 10, 10]],
             [0.9, 0.8, 0.7, 0.3, 0.95], [0, 0, 0, 0, 1]),
        _det([[50, 50, 60, 60], [6, 6, 16, 16], [30, 40, 35, 45]], [0.85, 0.6, 0.2]),
    ]  # fmt: skip
    truth = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 0])},
        {"boxes": torch.tensor([[5.0, 5, 15, 15]]), "labels": torch.tensor([0])},
    ]
    return preds, truth


def test_froc_matches_a_hand_computed_example_under_both_hit_rules():
    preds, truth = _froc_example()
    fpi, sens = froc_curve(preds, truth, 0, hit="iou")
    # one operating point per score: 0.9, 0.85, 0.8, 0.7, 0.6, 0.3, 0.2 (FP counts over 2 images)
    assert fpi.tolist() == pytest.approx([0, 0, 0.5, 0.5, 1, 1, 1.5, 2])
    assert sens.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert sensitivity_at(fpi, sens, FPS).tolist() == pytest.approx([1 / 3] * 3 + [2 / 3] * 4)
    fpi, sens = froc_curve(preds, truth, 0, hit="center")
    assert fpi.tolist() == pytest.approx([0, 0, 0.5, 0.5, 1, 1, 1, 1.5])
    assert sens.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    assert sensitivity_at(fpi, sens, FPS).tolist() == pytest.approx([1 / 3] * 3 + [1] * 4)
    _, sens = froc_curve(preds, truth, 1)  # class 1 has no true box: sensitivity undefined
    assert np.isnan(sens).all()
    with pytest.raises(ConfigError, match="froc_hit"):
        froc_curve(preds, truth, 0, hit="inside")


def _random_detections(seed: int, n_images: int = 6, n_classes: int = 3):
    g = torch.Generator().manual_seed(seed)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 48
        return torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 12], dim=1)

    preds, truth = [], []
    for _ in range(n_images):
        m, d = int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(0, 6, (1,), generator=g))
        gt = boxes(m)
        jittered = torch.cat([gt + torch.randn(m, 4, generator=g), boxes(d)])
        truth.append({"boxes": gt, "labels": torch.randint(0, n_classes - 1, (m,), generator=g)})  # class 2: no truth
        preds.append({"boxes": jittered, "scores": torch.rand(m + d, generator=g),
                      "labels": torch.randint(0, n_classes, (m + d,), generator=g)})  # fmt: skip
    return preds, truth


def test_map_wrapper_equals_torchmetrics_and_a_perfect_prediction_scores_one():
    from torchmetrics.detection import MeanAveragePrecision

    thresholds = [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]
    preds, truth = _random_detections(0)
    value, per_class = mean_average_precision(preds, truth, thresholds, 3)
    reference = MeanAveragePrecision(iou_thresholds=thresholds, class_metrics=True)
    reference.update(preds, truth)
    expected = reference.compute()
    assert 0 < value < 1 and value == pytest.approx(float(expected["map"]))
    assert per_class[:2] == pytest.approx(expected["map_per_class"][:2].tolist()) and math.isnan(per_class[2])
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]} for t in truth]
    value, per_class = mean_average_precision(perfect, truth, thresholds, 3)
    assert value == pytest.approx(1.0) and per_class[:2] == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("detector", ["retinanet", "fasterrcnn"])
def test_detectors_see_the_images_unchanged_and_train_on_empty_and_full_targets(detector):
    torch.manual_seed(0)
    encoder = TimmImageEncoder("resnet18").eval()
    model = build_detector(encoder, detector, n_classes=2, size=64)
    assert not any(k.startswith("backbone.pyramid") for k in model.state_dict())  # frozen encoder stays outside
    images = [torch.randn(1, 64, 64), torch.randn(1, 64, 64)]
    batched, _ = model.transform(images)
    assert torch.equal(batched.tensors, torch.stack(images))  # no resizing, no renormalisation
    features = model.backbone(batched.tensors)
    strides = [64 // f.shape[-1] for f in features.values()]
    assert strides[:3] == [8, 16, 32] and len(features) == len(model.backbone.strides)  # conv3-conv5 (+ extras)
    targets = [{"boxes": torch.tensor([[10.0, 12, 20, 24]]), "labels": torch.tensor([1 + (detector != "retinanet")])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # fmt: skip
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and not encoder.training
    assert all(p.grad is None for p in encoder.parameters())
    model.eval()
    with torch.no_grad():
        (out, _) = model(images)
    assert out["boxes"].shape[1] == 4 and len(out["scores"]) == len(out["labels"])


def test_run_detection_on_simulated_data_reports_map_and_froc_and_leaves_the_model_alone(eval_context):
    ctx = eval_context
    ctx.protocol.seeds = [0]
    before = {k: v.clone() for k, v in ctx.method.state_dict().items()}
    spec = TaskSpec("detection", params={"findings": ["nodule", "mass"], "epochs": 2, "batch_size": 8})
    result = run_detection(ctx, spec)
    m = result.metrics
    assert 0 <= m["map"].value <= 1 and m["map"].n == 1
    assert {"map/nodule", "froc/mass", "sens@0.125fp", "sens@8fp"} <= set(m)
    # the fROC score is the mean sensitivity at the protocol's false-positive rates (averaged over findings)
    at = [m[key].value for key in m if key.startswith("sens@")]
    assert len(at) == 7 and m["froc"].value == pytest.approx(np.mean(at))
    assert m["sens@0.125fp"].value <= m["sens@8fp"].value  # sensitivity can only grow with more false positives
    assert len(result.figures) == 2 and all((ctx.out / f).stat().st_size > 0 for f in result.figures)
    after = ctx.method.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="unknown detector"):
        run_detection(ctx, TaskSpec("detection", params={"detector": "yolo"}))
