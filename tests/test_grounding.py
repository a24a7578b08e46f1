"""Phrase grounding: map and metric functions against plain references, orientation, CLIP's local embeddings,
the simulated regions' phrases, and the task end to end on the simulated evaluation data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radalign.config import TaskSpec
from radalign.errors import ConfigError
from radalign.evaluation.grounding import box_masks, cnr, iou_at, pointing_game, run_grounding, similarity_map


def blobs(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, size, size) bool rectangles at random places, none empty."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        y, x = rng.integers(0, size - 6, 2)
        h, w = rng.integers(3, 7, 2)
        masks[i, y : y + h, x : x + w] = True
    return masks


def test_metrics_match_plain_loop_references():
    torch.manual_seed(0)
    maps, targets = torch.randn(6, 12, 12), blobs(6, 12, seed=1)
    for p in range(6):
        m, t = maps[p].numpy(), targets[p].numpy()
        best = max(((y, x) for y in range(12) for x in range(12)), key=lambda yx: m[yx])
        assert pointing_game(maps, targets)[p] == float(t[best])
        inside = [m[y, x] for y in range(12) for x in range(12) if t[y, x]]
        outside = [m[y, x] for y in range(12) for x in range(12) if not t[y, x]]
        expected = abs(np.mean(inside) - np.mean(outside)) / np.sqrt(np.var(inside) + np.var(outside))
        assert float(cnr(maps, targets)[p]) == pytest.approx(expected, rel=1e-5)
        low, high = m.min(), m.max()
        predicted = [[(m[y, x] - low) / (high - low) >= 0.3 for x in range(12)] for y in range(12)]
        inter = sum(predicted[y][x] and t[y, x] for y in range(12) for x in range(12))
        union = sum(predicted[y][x] or t[y, x] for y in range(12) for x in range(12))
        assert float(iou_at(maps, targets, 0.3)[p]) == pytest.approx(inter / union)
    # CNR is invariant to a positive affine rescaling; the pointing game sees the maximum only
    assert torch.allclose(cnr(3 * maps + 1, targets), cnr(maps, targets), rtol=1e-4)
    flat = torch.zeros(1, 12, 12)
    assert torch.isnan(cnr(flat, targets[:1])).all() and iou_at(flat, targets[:1])[0] == 0


def test_box_masks_cover_pixels_whose_centre_is_inside():
    mask = box_masks(torch.tensor([[2.0, 1.0, 5.0, 3.0]]), 8)[0]  # x0 y0 x1 y1, pixel edges
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:3, 2:5] = True
    assert torch.equal(mask, expected)


def test_correct_maps_score_above_the_same_maps_with_other_images_masks():
    masks = blobs(40, 32, seed=2)
    smooth = F.avg_pool2d(masks[:, None].float(), 5, stride=1, padding=2)[:, 0]
    maps = smooth + 0.05 * torch.randn(masks.shape, generator=torch.Generator().manual_seed(3))
    shuffled = masks.roll(1, dims=0)
    for metric in (pointing_game, cnr, iou_at):
        right, wrong = metric(maps, masks).nanmean(), metric(maps, shuffled).nanmean()
        assert right > wrong + 0.2, metric.__name__
    assert pointing_game(maps, masks).mean() > 0.95


@pytest.mark.parametrize("cell", [(0, 0), (1, 3), (2, 4), (2, 1)])
def test_planted_cell_is_the_maximum_at_its_row_and_column(cell):
    h, w, d = 3, 5, 8
    phrase = F.normalize(torch.randn(d), dim=0)
    local = torch.randn(2, h * w, d)
    local -= (local @ phrase)[..., None] * phrase  # orthogonal: cosine 0 everywhere ...
    i, j = cell
    local[:, i * w + j] = 2 * phrase  # ... but at row i (y), column j (x), row-major
    maps = similarity_map(local, (h, w), phrase, (30, 50))
    assert maps.shape == (2, 30, 50)
    y, x = np.unravel_index(int(maps[0].argmax()), (30, 50))
    assert (y // 10, x // 10) == (i, j)
    # one phrase per image, or several: the same maps
    per_image = similarity_map(local, (h, w), phrase.expand(2, d), 30)
    several = similarity_map(local, (h, w), torch.stack([phrase, -phrase])[None].expand(2, 2, d), 30)
    assert per_image.shape == (2, 30, 30) and torch.allclose(several[:, 0], per_image)
    assert torch.allclose(several[:, 1], -per_image, atol=1e-6)
    with pytest.raises(ValueError, match="cells"):
        similarity_map(local, (4, 4), phrase, 30)


@pytest.fixture(scope="module")
def tiny_method(tiny_export):
    from radalign.inference import load

    return load(tiny_export).method


def test_clip_locals_are_normalised_and_average_to_the_global_embedding(tiny_method):
    from radalign.methods.base import Method

    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        local, grid = tiny_method.encode_image_locals(images)
        out = tiny_method.image_encoder(images)
        assert tiny_method.config.model.projection == "linear"
        # a CNN's global feature is the mean of its cells; a linear head commutes with that mean
        pooled = F.normalize(tiny_method.image_head(out.local).mean(dim=1), dim=-1)
        expected = tiny_method.encode_images(images)
    assert local.shape == (3, int(np.prod(grid)), tiny_method.config.model.embed_dim) and len(grid) == 2
    assert torch.allclose(local.norm(dim=-1), torch.ones(3, local.shape[1]), atol=1e-5)
    assert torch.allclose(pooled, expected, atol=1e-5)
    assert torch.allclose(local, F.normalize(tiny_method.image_head(out.local), dim=-1), atol=1e-6)
    with pytest.raises(NotImplementedError, match="clip"):
        Method.encode_image_locals(tiny_method, images)


def test_report_phrase_is_the_findings_sentence_that_asserts_the_finding():
    from radalign.data.simulate.findings import sample_findings
    from radalign.data.simulate.report import KIND_LABELS, finding_phrase, write_report

    checked = 0
    for seed in range(60):
        rng = np.random.default_rng([5, seed])
        findings = sample_findings(rng)
        report = write_report(findings, rng)
        for i, f in enumerate(findings):
            phrase = finding_phrase(report, i, f.kind)
            assert phrase is not None and phrase in report.text
            sentence = next(s for s in report.sentences if s.text == phrase and s.source == i)
            assert sentence.section == "FINDINGS"  # every finding has a FINDINGS sentence, so it is preferred
            assert any(k == KIND_LABELS[f.kind][0] and v in (1, -1) for k, v in sentence.mentions)
            checked += 1
    assert checked > 50


def test_simulated_regions_carry_their_report_phrase(eval_manifest):
    from radalign.data.manifest import load_manifest

    regions = 0
    for record in load_manifest(eval_manifest).records:
        for region in json.loads(record.regions_path.read_text())["regions"]:
            regions += 1
            assert region["phrase"] in record.report, (record.id, region["phrase"])
    assert regions > 40


def test_grounding_on_the_eval_context_gives_intervals_and_overlays(eval_context):
    spec = TaskSpec("grounding", params={"max_overlays": 3, "findings": ["pleural_effusion", "cardiomegaly"]})
    result = run_grounding(eval_context, spec)
    for name in ("pointing_game", "cnr", "miou"):
        m = result.metrics[name]
        assert np.isfinite(m.value) and m.method == "bootstrap" and m.low <= m.value <= m.high, name
        assert f"{name}/pleural_effusion" in result.metrics
    # the headline is the mean over all pairs: the per-finding means weighted by their pair counts, and the pointing
    # game a count of hits over the pairs
    pairs = {f: v["pairs"] for f, v in result.details["per_finding"].items()}
    assert sum(pairs.values()) == result.details["pairs"]
    for name in ("pointing_game", "miou"):
        weighted = sum(n * result.metrics[f"{name}/{f}"].value for f, n in pairs.items()) / result.details["pairs"]
        assert result.metrics[name].value == pytest.approx(weighted, abs=1e-12), name
    hits = result.metrics["pointing_game"].value * result.details["pairs"]
    assert hits == pytest.approx(round(hits), abs=1e-9)
    assert set(result.details["per_finding"]) <= {"pleural_effusion", "cardiomegaly"}
    assert result.details["phrase_sources"]["report"] == result.details["pairs"] > 0
    assert all(v["report"] == v["pairs"] and v["prompt"] == 0 for v in result.details["per_finding"].values())
    assert len(result.figures) == 3
    for relative in result.figures:
        assert (eval_context.out / relative).stat().st_size > 1000
    with pytest.raises(ConfigError, match="unknown parameter 'treshold'"):
        run_grounding(eval_context, TaskSpec("grounding", params={"treshold": 0.4}))
    with pytest.raises(ConfigError, match="not in the protocol"):
        run_grounding(eval_context, TaskSpec("grounding", params={"findings": ["fracture_x"]}))


def test_regions_without_phrase_fall_back_to_the_prompt(eval_context, monkeypatch):
    from radalign.evaluation import context

    original = context.DenseDataset._targets

    def without_phrases(self, record):
        targets = original(self, record)
        targets["phrases"] = []
        return targets

    monkeypatch.setattr(context.DenseDataset, "_targets", without_phrases)
    params = {"findings": ["cardiomegaly"], "max_overlays": 0, "prompt_template": "an enlarged {finding}"}
    result = run_grounding(eval_context, TaskSpec("grounding", params=params))
    assert result.details["phrase_sources"] == {"report": 0, "prompt": result.details["pairs"]}
    assert result.figures == [] and any("prompt template" in n for n in result.notes)
