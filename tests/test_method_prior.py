"""PRIOR: shipped configs, the fixed official bugs (patch order, causal decoder, deterministic evaluation), every
named loss with gradients on a real simulated batch, and a short run through all three stages."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

import radalign.methods.prior  # noqa: F401  (registers "prior")
from radalign.config import find_config, load_config
from tests.helpers import first_batch, tiny_config

STAGE3 = ("image_reconstruction", "prototype_reconstruction", "prototype_kl", "generated_alignment")


def tiny_prior(manifest, **overrides):
    settings = {"trainer.checkpoint_every_n_steps": 1000, "trainer.log_every_n_steps": 1, "trainer.max_steps": 6}
    return tiny_config("prior", manifest, **{**settings, **overrides})


@pytest.fixture(scope="module")
def batch_and_method(simulated_manifest):
    from radalign.methods.registry import build_method

    config = tiny_prior(simulated_manifest)
    torch.manual_seed(0)
    data, batch = first_batch(config)
    return config, batch, build_method(config, tokenizer=data.tokenizer)


def test_paper_config_has_the_three_stages():
    config = load_config(find_config("prior"))
    assert config.method == "prior"
    stage1 = config.weights_at(0, 0)
    assert {k for k, v in stage1.items() if v} == {"global", "local_image", "local_text"}
    assert config.weights_at(0, 20)["spb"] == 10.0 and config.weights_at(0, 20)["image_reconstruction"] == 0.0
    stage3 = config.weights_at(0, 50)
    assert stage3["global"] == 10.0 and stage3["prototype_reconstruction"] == 10.0 and stage3["spb"] == 10.0
    assert all(stage3[k] > 0 for k in STAGE3)
    assert [s.reset_optimizer for s in config.stages] == [False, True, True]
    assert config.stages[2].lr == 5.0e-6 and config.optim.lr == 1.0e-5
    assert config.model.options["prototypes"] == 512 and config.model.embed_dim == 768


def test_tiny_stages_scale_with_the_step_budget():
    config = load_config(find_config("prior-tiny"))
    for max_steps in (30, 3000):
        config.trainer.max_steps = max_steps
        starts = [
            min(s for s in range(max_steps) if config.weights_at(s, 0)[name] > 0) for name in ("spb", "prototype_kl")
        ]
        assert 0 < starts[0] < starts[1] < max_steps
        # the bank no earlier than 40% of the budget: switched on before the alignment formed (13%, the paper's
        # share) it collapsed onto one prototype and the 250-step run never left chance (docs/methods/prior.md)
        assert starts[0] >= 0.4 * max_steps


def test_patch_order_is_preserved_from_grid_to_patches_and_back(batch_and_method, monkeypatch):
    """Official bug 1: a feature planted at grid cell (i, j) must come out at patch i * w + j, and go back there."""
    from radalign.models.outputs import locals_to_map

    _, batch, method = batch_and_method
    encoder = method.image_encoder
    h, w = 2, 3
    i, j = 1, 0  # off the diagonal: a transposed or channel-scrambled reshape lands elsewhere
    feature_map = torch.zeros(2, encoder.out_dim, h, w)
    planted = torch.randn(encoder.out_dim)
    feature_map[:, :, i, j] = planted
    monkeypatch.setattr(encoder.model, "forward_features", lambda x: feature_map)
    with torch.no_grad():
        out = encoder(batch["image"][:2])
        patches = method.patch_head(out.local)
        expected, empty = method.patch_head(planted), method.patch_head(torch.zeros(encoder.out_dim))
    assert out.grid_shape == (h, w)
    torch.testing.assert_close(patches[0, i * w + j], expected)
    for k in range(h * w):
        if k != i * w + j:
            torch.testing.assert_close(patches[0, k], empty)
    torch.testing.assert_close(locals_to_map(out.local, (h, w)), feature_map)  # the decoder's way back


def test_prototype_decoder_is_not_causal():
    """Official bug 2: the first query's output must change when a LATER query's input changes."""
    from radalign.models.decoders import QueryDecoder

    torch.manual_seed(0)
    decoder = QueryDecoder(16, queries=4, layers=2, heads=2).eval()
    memory = torch.randn(2, 5, 16)
    queries = torch.randn(2, 4, 16)
    changed = queries.clone()
    changed[:, 3] += 1.0
    with torch.no_grad():
        a, b = decoder(memory, queries=queries), decoder(memory, queries=changed)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
    assert a.shape == (2, 4, 16)


def test_every_loss_is_finite_and_reaches_its_modules(batch_and_method):
    _, batch, method = batch_and_method
    method.train()
    method.stage_weights = None  # outside the schedule: every objective is computed
    method.prototypes_active.fill_(True)
    method.zero_grad()
    losses = method.losses(batch)
    assert set(losses) == set(method.objective_names)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    assert all(float(losses[k].detach()) > 0 for k in ("spb", "image_reconstruction", "prototype_reconstruction"))
    sum(losses.values()).backward()

    def reached(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    for part in ("image_encoder", "image_pool", "patch_head", "token_head", "text_pool", "cross_attention",
                 "predictor", "bank", "image_decoder", "prototype_decoder"):  # fmt: skip
        assert reached(getattr(method, part)), part
    assert method.local_logit_scale.grad is not None
    method.prototypes_active.fill_(False)


def test_stage_one_skips_the_decoders_and_the_bank(batch_and_method):
    config, batch, method = batch_and_method
    method.train()
    method.stage_weights = config.weights_at(0, 0)
    try:
        losses = method.losses(batch)
    finally:
        method.stage_weights = None
    assert all(float(losses[k].detach()) == 0 for k in (*STAGE3, "spb"))
    assert not bool(method.prototypes_active)


def test_evaluation_is_deterministic_with_prototypes(batch_and_method):
    """Official bug 4: Gumbel noise at test time made zero-shot predictions random."""
    _, batch, method = batch_and_method
    method.eval()
    method.prototypes_active.fill_(True)
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "token_sentence", "token_word")}
    with torch.no_grad():
        first, second = method.encode_texts(text), method.encode_texts(text)
        local1 = method.local_similarity(batch["image"][:3], text)
        local2 = method.local_similarity(batch["image"][:3], text)
    method.prototypes_active.fill_(False)
    assert torch.equal(first, second) and torch.equal(local1, local2)
    assert local1.shape == (3, len(batch["image"]))
    assert ((local1 > 0) & (local1 < 1)).all()  # a mean of sigmoid weights


def test_reconstruction_has_the_image_shape(batch_and_method):
    _, batch, method = batch_and_method
    method.eval()
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "token_sentence", "token_word")}
    with torch.no_grad():
        with_text = method.reconstruct(batch["image"][:2], {k: v[:2] for k, v in text.items()})
        image_only = method.reconstruct(batch["image"][:2])
    assert with_text.shape == batch["image"][:2].shape == image_only.shape
    assert not torch.equal(with_text, image_only)  # the sentence context enters the decoder


def test_three_stages_on_a_short_run(simulated_manifest, eval_manifest, tmp_path, caplog):
    """Stage switching end to end: the log names each stage's start, the optimiser is re-created with the stage's
    learning rate, the decoders' losses appear in stage 3 only, and the exported model encodes with prototypes."""
    from radalign.inference import load
    from radalign.training.run import pretrain

    config = tiny_prior(simulated_manifest, **{"trainer.max_steps": 6})
    config.stages[1].start_fraction, config.stages[2].start_fraction = 2 / 6, 4 / 6
    with caplog.at_level(logging.INFO, logger="radalign"):
        result = pretrain(config, tmp_path / "run")
    assert result.steps == 6
    text = caplog.text
    assert "stage 2 (prototypes) begins at step 2" in text and "stage 3 (reconstruction) begins at step 4" in text
    assert "optimiser and schedule re-created" in text
    with open(next((tmp_path / "run" / "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    by_step: dict[int, dict[str, str]] = {}
    for row in rows:
        if row.get("train/loss"):
            by_step[int(row["step"])] = row
    assert float(by_step[1]["train/prototype_reconstruction"]) == 0.0
    assert float(by_step[5]["train/prototype_reconstruction"]) > 0.0
    assert float(by_step[5]["train/image_reconstruction"]) > 0.0
    # the bank's use is logged from stage 2 on, as an effective number of prototypes
    used = [float(row["train/prototype_perplexity"]) for s, row in by_step.items() if s >= 2]
    assert used and all(1.0 <= u <= config.model.options["prototypes"] for u in used)
    # stage 3 restarts warm-up at 5e-4 x (1 / warmup_steps) on its first step
    assert float(by_step[4]["train/lr"]) == pytest.approx(5.0e-4 / config.optim.warmup_steps)
    model = load(result.export)
    assert bool(model.method.prototypes_active)
    a = model.encode_texts(["Small left pleural effusion.", "Normal heart size."])
    b = model.encode_texts(["Small left pleural effusion.", "Normal heart size."])
    assert torch.equal(a, b) and a.shape == (2, 128)

    # PRIOR's local zero-shot score through the evaluation suite, at the protocol's image size (128 px, a 4x4
    # grid, while the model trained at 64 px on 2x2: the pool's positions are resized), against the scores rebuilt
    # by hand from the test images: global cosine + 0.5 x the local similarity, per side of each prompt pair
    from radalign.config import TaskSpec, load_protocol
    from radalign.data.manifest import load_manifest
    from radalign.evaluation.context import EvalContext
    from radalign.evaluation.zero_shot import run_zero_shot
    from tests.test_evaluation import _pairwise_auroc

    manifest = load_manifest(eval_manifest)  # 24 test images: enough for the local term to move the AUROC
    protocol = load_protocol("quick", {"bootstrap": 0})
    ctx = EvalContext(model, protocol, manifest.records, tmp_path / "eval", vocabulary=manifest.vocabulary)
    task = run_zero_shot(ctx, TaskSpec("zero_shot", params={"local_weight": 0.5}))
    items = [item for item in ctx.dataset("test")]
    images = torch.stack([item["image"] for item in items])
    labels = torch.stack([item["labels"] for item in items]).numpy()
    assert images.shape[-1] == 128
    compared = 0
    with torch.no_grad():
        image_emb = model.encode_images(images)
        for finding, sides in task.details["prompts"].items():
            side_scores = []
            for texts in (sides["positive"], sides["negative"]):
                tokens = {k: v for k, v in model.tokenize(texts).items() if k != "n_sentences"}
                local = model.method.local_similarity(images, tokens).mean(dim=1)
                glob = image_emb @ torch.nn.functional.normalize(model.encode_texts(texts).mean(0), dim=0)
                side_scores.append(glob + 0.5 * local)
            score = torch.sigmoid((side_scores[0] - side_scores[1]) / 0.07).numpy()
            expected = _pairwise_auroc(labels[:, ctx.vocabulary.index(finding)], score)  # the protocol's order
            if expected == expected:
                assert task.metrics[f"auroc/{finding}"].value == pytest.approx(expected, abs=1e-6), finding
                compared += 1
    assert compared >= 2
    without = run_zero_shot(ctx, TaskSpec("zero_shot"))
    assert without.metrics["auroc"].value != task.metrics["auroc"].value  # the local term is in the score


def test_clip_style_pool_resizes_its_positions_for_another_grid():
    from radalign.errors import ConfigError
    from radalign.models.pooling import AttentionPool

    torch.manual_seed(0)
    pool = AttentionPool(8, heads=2, query="mean", out_dim=4, grid=(2, 2))
    x = torch.randn(3, 4, 8)
    pooled, weights = pool(x, None, (2, 2))
    assert pooled.shape == (3, 4) and weights.shape == (3, 4)
    assert ((weights.sum(dim=1) > 0) & (weights.sum(dim=1) < 1)).all()  # the mean token takes its share
    torch.testing.assert_close(pool(x)[0], pooled)  # no grid given: the trained one
    bigger, big_weights = pool(torch.randn(3, 16, 8), None, (4, 4))
    assert bigger.shape == (3, 4) and big_weights.shape == (3, 16) and torch.isfinite(bigger).all()
    with pytest.raises(ConfigError, match="2x2 grid"):
        pool(torch.randn(3, 16, 8))


def test_probe_features_are_the_global_embedding_before_normalisation(batch_and_method):
    import torch.nn.functional as F

    _, batch, method = batch_and_method
    method.eval()
    images = batch["image"][:4]
    with torch.no_grad():
        features = method.global_image_features(images)
        torch.testing.assert_close(F.normalize(features, dim=-1), method.encode_images(images))
    assert features.shape == (4, method.config.model.embed_dim)
    method.train()
