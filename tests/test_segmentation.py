"""Segmentation evaluation: Dice with empty masks, the MGCA loss, heads that learn, the encoder pyramid, the task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radalign.config import TaskSpec
from radalign.errors import ConfigError
from radalign.evaluation.dense import EncoderPyramid, fit, shuffled
from radalign.evaluation.segmentation import (
    Segmenter,
    dice_scores,
    focal_loss,
    run_segmentation,
    segmentation_loss,
    soft_dice,
)
from radalign.models.image import TimmImageEncoder


def test_dice_scores_match_a_loop_reference_including_empty_masks():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 3, 6, 6, generator=g) > 0.6
    target = torch.rand(5, 3, 6, 6, generator=g) > 0.5
    target[0, 0] = False  # empty truth, something predicted -> empty_correct 0
    target[1, 1], pred[1, 1] = False, False  # both empty -> empty_correct 1, no Dice
    pred[2, 2] = False  # truth present, nothing predicted -> Dice 0
    dice, empty = dice_scores(pred, target)
    for i in range(5):
        for k in range(3):
            p, t = pred[i, k].flatten().tolist(), target[i, k].flatten().tolist()
            inter = sum(a and b for a, b in zip(p, t, strict=True))
            if sum(t):
                assert dice[i, k].item() == pytest.approx(2 * inter / (sum(p) + sum(t)))
                assert math.isnan(empty[i, k].item())
            else:
                assert math.isnan(dice[i, k].item())
                assert empty[i, k].item() == (1.0 if sum(p) == 0 else 0.0)
    assert empty[0, 0] == 0 and empty[1, 1] == 1 and dice[2, 2] == 0


def test_mgca_loss_matches_a_plain_reference_and_has_finite_gradients():
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 2, 4, 4, generator=g)).requires_grad_()
    target = torch.rand(2, 2, 4, 4, generator=g) > 0.7
    focal_sum, inter, psum, tsum = 0.0, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    for b in range(2):
        for k in range(2):
            for y in range(4):
                for x in range(4):
                    p = 1 / (1 + math.exp(-logits[b, k, y, x].item()))
                    t = float(target[b, k, y, x])
                    pt = p if t else 1 - p
                    focal_sum += -((1 - pt) ** 2) * math.log(pt)
                    inter[k] += p * t
                    psum[k] += p
                    tsum[k] += t
    focal = focal_sum / logits.numel()
    dices = [(2 * inter[k] + 1) / (psum[k] + tsum[k] + 1) for k in range(2)]
    assert focal_loss(logits, target).item() == pytest.approx(focal, rel=1e-5)
    assert soft_dice(logits, target).tolist() == pytest.approx(dices, rel=1e-5)
    expected = 10 * focal - sum(math.log(d) for d in dices) / 2
    loss = segmentation_loss(logits, target, "mgca")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert segmentation_loss(logits, target, "dice").item() == pytest.approx(1 - sum(dices) / 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="unknown loss"):
        segmentation_loss(logits, target, "bce")


def _squares(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy images with one bright square each; the square is the mask."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(n, 1, size, size, generator=g) - 1
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):
        side = int(torch.randint(10, 20, (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        masks[i, 0, y : y + side, x : x + side] = True
    images[masks] += 2
    return images, masks


def test_unet_head_on_a_frozen_random_encoder_learns_bright_squares():
    torch.manual_seed(0)
    encoder = TimmImageEncoder("resnet18").eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images, masks = _squares(16, 64, seed=0)
    test_images, test_masks = _squares(16, 64, seed=1)
    model = Segmenter(EncoderPyramid(encoder, freeze=True), "unet", 1, 64)
    assert not any(k.startswith("pyramid") for k in model.state_dict())  # the frozen encoder is not the head's
    maps = model.pyramid(images)  # frozen: encode once, train the head on the maps (as the task does)
    assert not any(m.requires_grad for m in maps)

    def test_dice() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(test_images).sigmoid() > 0.5
        return dice_scores(pred, test_masks)[0].nanmean().item()

    untrained = test_dice()
    fit(
        model, lambda epoch: shuffled(16, 8, (0, epoch)),
        lambda idx: segmentation_loss(model.head([m[idx] for m in maps]), masks[idx]), None, epochs=15, lr=1e-3,
    )  # fmt: skip
    trained = test_dice()
    everything = dice_scores(torch.ones_like(test_masks), test_masks)[0].nanmean().item()  # prevalence baseline
    assert trained > 0.7 and trained > untrained + 0.3 and trained > everything + 0.3
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())


def test_pyramid_gives_fine_to_coarse_maps_with_their_strides():
    images = torch.randn(2, 1, 64, 64)
    cnn = TimmImageEncoder("resnet18").eval()
    assert cnn.pyramid_strides == [2, 4, 8, 16, 32] and cnn.pyramid_channels == [64, 64, 128, 256, 512]
    maps = cnn.pyramid(images)
    for m, c, s in zip(maps, cnn.pyramid_channels, cnn.pyramid_strides, strict=True):
        assert m.shape == (2, c, 64 // s, 64 // s)
    assert torch.allclose(maps[-1], cnn(images).grid(), atol=1e-5)
    # a ViT is single-scale: its last block's normed patch tokens on the patch grid, as forward() gives them
    vit = TimmImageEncoder("vit_tiny_patch16_224", image_size=64).eval()
    assert vit.pyramid_strides == [16] and vit.pyramid_channels == [192]
    (vit_map,) = vit.pyramid(images)
    assert vit_map.shape == (2, 192, 4, 4)
    assert torch.allclose(vit_map, vit(images).grid(), atol=1e-5)
    # the unet head upsamples a ViT's single map back to the image
    assert Segmenter(EncoderPyramid(vit), "unet", 3, 64)(images).shape == (2, 3, 64, 64)


def test_run_segmentation_on_simulated_data_reports_dice_and_leaves_the_model_alone(eval_context):
    ctx = eval_context
    ctx.protocol.seeds = [0]
    encoder = ctx.method.image_encoder
    encoder.train()  # the task must restore whatever mode it found
    before = {k: v.clone() for k, v in ctx.method.state_dict().items()}
    spec = TaskSpec("segmentation", params={"heads": ["linear", "unet"], "epochs": 1, "batch_size": 8})
    result = run_segmentation(ctx, spec)
    findings = result.details["findings"]
    assert "pleural_effusion" in findings and "nodule" in findings  # default: every finding with masks in train
    for head in ("linear", "unet"):
        per_finding = [result.metrics[f"{head}/dice/{f}"].value for f in findings]
        # the headline is the mean over findings of the per-finding Dice (findings without a test mask left out)
        assert result.metrics[f"{head}/dice"].value == pytest.approx(np.nanmean(per_finding))
        assert 0 <= result.metrics[f"{head}/empty_correct"].value <= 1
    assert result.metrics["linear/dice"].n == 1 and result.metrics["linear/dice"].method == "seeds"
    assert (ctx.out / result.figures[0]).stat().st_size > 0
    tuned = run_segmentation(
        ctx, TaskSpec("segmentation", params={"heads": ["linear"], "epochs": 1, "freeze_encoder": False,
                                              "findings": ["pleural_effusion"]}),
    )  # fmt: skip
    assert math.isfinite(tuned.metrics["linear/dice/pleural_effusion"].value)
    after = ctx.method.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()) and encoder.training
    with pytest.raises(ConfigError, match="unknown parameter 'epoch'"):
        run_segmentation(ctx, TaskSpec("segmentation", params={"epoch": 1}))
    with pytest.raises(ConfigError, match="'lung' is not in"):
        run_segmentation(ctx, TaskSpec("segmentation", params={"findings": ["lung"], "epochs": 1}))
