"""MGCA as a radalign Method: configs, the three losses on a real batch, ViT patch weights, the stage, export."""

from __future__ import annotations

import pytest
import torch

import radalign.methods.mgca  # registers "mgca"; also patched below
from radalign.config import find_config, load_config
from radalign.errors import ConfigError
from tests.helpers import first_batch, tiny_config


def tiny_mgca(manifest, **overrides):
    return tiny_config("mgca", manifest, **{"loader.max_length": 48, **overrides})


def test_configs_load_and_match_the_spec():
    from radalign.methods.builders import build_infonce

    paper, tiny = load_config(find_config("mgca")), load_config(find_config("mgca-tiny"))
    assert paper.model.image.name == "vit_base_patch16_224" and paper.loader.batch_size == 144
    assert float(build_infonce(paper.objectives["instance"]).temperature) == pytest.approx(0.07)
    assert paper.objectives["prototype"]["n_prototypes"] == 500 and tiny.objectives["prototype"]["n_prototypes"] == 64
    for config, stage in ((paper, {"start_epoch": 1}), (tiny, {"start_step": 100})):
        before = config.weights_at(0, 0)
        assert before == {"instance": 1.0, "token": 0.7, "prototype": 0.0}
        after = config.weights_at(stage.get("start_step", 0), stage.get("start_epoch", 0))
        assert after == {"instance": 1.0, "token": 0.7, "prototype": 0.5}


def test_paper_config_builds_a_vit_b16_with_mgca_heads():
    from radalign.methods.registry import build_method

    method = build_method(load_config(find_config("mgca")), for_inference=True)
    assert method.image_encoder.out_dim == 768 and method.prototype.prototypes.shape == (500, 128)
    assert method.image_head.net[1].num_features == 2048  # Linear(768, 2048) -> BN -> ReLU -> Linear -> BN


def test_losses_are_finite_and_reach_encoder_heads_and_prototypes(simulated_manifest):
    from radalign.methods.registry import build_method

    torch.manual_seed(0)
    config = tiny_mgca(simulated_manifest)
    data, batch = first_batch(config)
    method = build_method(config, tokenizer=data.tokenizer)
    losses = method.losses(batch)
    assert set(losses) == {"instance", "token", "prototype"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    heads = (method.image_head, method.text_head, method.image_local_head, method.text_local_head)
    for module in (method.image_encoder, *heads):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert method.prototype.prototypes.grad is not None and method.prototype.prototypes.grad.abs().sum() > 0
    method.eval()
    images = batch["image"][:3]
    globals_ = method.encode_images(images)
    local, grid = method.encode_image_locals(images)
    assert globals_.shape == (3, config.model.embed_dim) and local.shape == (3, grid[0] * grid[1], 128)
    torch.testing.assert_close(local.norm(dim=-1), torch.ones(local.shape[:2]))


def test_vit_patch_weights_are_its_cls_attention(simulated_manifest, monkeypatch):
    from radalign.methods.registry import build_method

    torch.manual_seed(0)
    config = tiny_mgca(simulated_manifest, **{"model.image.name": "vit_tiny_patch16_224", "loader.batch_size": 4})
    data, batch = first_batch(config)
    method = build_method(config, tokenizer=data.tokenizer)
    seen: dict[str, torch.Tensor | None] = {}
    original = radalign.methods.mgca.mgca_token_loss

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(radalign.methods.mgca, "mgca_token_loss", spy)
    losses = method.losses(batch)
    assert torch.isfinite(losses["token"])
    # MGCA's ViT branch: raw patch -> word contexts, clipped patch weights
    assert seen["normalize_patch_context"] is False and seen["clip_patch_weights"] is True
    weights = seen["patch_weights"]
    assert weights is not None and weights.shape == (4, 16)  # 64 px / 16 = a 4 x 4 grid
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 16))  # an attention map, not uniform
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    words = seen["word_weights"]  # the text [CLS] attention mass per word (tested in detail below)
    assert words is not None and words.shape[0] == 4 and not words.requires_grad


def test_stage_switches_the_prototype_loss_on_and_the_export_embeds(simulated_manifest, tmp_path):
    import pandas as pd

    from radalign.inference import load
    from radalign.training.module import PretrainModule
    from radalign.training.run import pretrain

    seen: dict[int, float] = {}
    original = PretrainModule.weighted_loss

    def record(self, losses):
        total, weights = original(self, losses)
        if self.trainer.training:  # validation and sanity-check batches also weigh their losses
            seen[self.global_step] = weights["prototype"]
        return total, weights

    config = tiny_mgca(
        simulated_manifest,
        **{"trainer.max_steps": 6, "trainer.log_every_n_steps": 1, "trainer.checkpoint_every_n_steps": 1000},
    )
    config.stages[0].start_step = 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PretrainModule, "weighted_loss", record)
        result = pretrain(config, tmp_path / "run")
    assert result.steps == 6
    assert seen == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5, 4: 0.5, 5: 0.5}
    metrics = pd.read_csv(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")
    assert metrics["train/prototype"].notna().sum() >= 6 and metrics["train/stage"].notna().any()
    model = load(result.export)
    images = model.encode_images(torch.rand(2, 1, 64, 64) * 4 - 2)
    texts = model.encode_texts(["Small left pleural effusion.", "No pneumothorax."])
    assert images.shape == texts.shape == (2, config.model.embed_dim)
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))


def _spy_token_loss(monkeypatch):
    seen: dict[str, torch.Tensor | None] = {}
    original = radalign.methods.mgca.mgca_token_loss

    def spy(*args, **kwargs):
        seen["word_weights"] = kwargs["word_weights"]
        seen["word_mask"] = args[3]
        return original(*args, **kwargs)

    monkeypatch.setattr(radalign.methods.mgca, "mgca_token_loss", spy)
    return seen


def test_word_weights_are_the_cls_attention_mass_of_each_word(simulated_manifest, monkeypatch):
    from radalign.methods.registry import build_method

    torch.manual_seed(0)
    config = tiny_mgca(simulated_manifest)
    assert config.model.options.get("word_weights") is None  # the default applies
    data, batch = first_batch(config)
    method = build_method(config, tokenizer=data.tokenizer).eval()  # eval: no dropout, so two passes agree
    seen = _spy_token_loss(monkeypatch)
    assert torch.isfinite(method.losses(batch)["token"])
    got, word_mask = seen["word_weights"], seen["word_mask"]
    text = batch
    with torch.no_grad():
        out = method.text_encoder(
            text["input_ids"], text["attention_mask"], token_word=text["token_word"], cls_attention=True
        )
    attention, token_word = out.cls_attention, text["token_word"]
    assert (token_word < 0).any() and (text["attention_mask"] == 0).any()  # premise: special tokens, padding
    b, w = word_mask.shape
    want = torch.zeros(b, w)
    for i in range(b):
        for j in range(w):
            want[i, j] = attention[i, token_word[i] == j].sum()  # all of the word's pieces
    assert got is not None and got.shape == (b, w) and not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.all(got[~word_mask] == 0) and torch.all(got[word_mask] > 0)
    assert torch.all(got.sum(dim=1) < 1)  # [CLS] / [SEP] mass belongs to no word
    pieces = (token_word[:, :, None] == torch.arange(w)[None, None]).sum(dim=1)  # (B, W) tokens per word
    assert (pieces > 1).any()  # premise: some word has several pieces, so sum and mean differ


def test_uniform_word_weights_option_changes_only_the_token_loss(simulated_manifest, monkeypatch):
    from radalign.errors import ConfigError
    from radalign.methods.registry import build_method

    torch.manual_seed(0)
    config = tiny_mgca(simulated_manifest)
    data, batch = first_batch(config)
    attended = build_method(config, tokenizer=data.tokenizer).eval()
    uniform_config = tiny_mgca(simulated_manifest, **{"model.options.word_weights": "uniform"})
    uniform = build_method(uniform_config, tokenizer=data.tokenizer).eval()
    uniform.load_state_dict(attended.state_dict())  # same weights: only the word weighting differs
    seen = _spy_token_loss(monkeypatch)
    with torch.no_grad():
        a = attended.losses(batch)
        assert seen["word_weights"] is not None
        u = uniform.losses(batch)
        assert seen["word_weights"] is None
    torch.testing.assert_close(a["instance"], u["instance"])
    assert abs(float(a["token"]) - float(u["token"])) > 1e-4
    with pytest.raises(ConfigError, match="word_weights"):
        build_method(tiny_mgca(simulated_manifest, **{"model.options.word_weights": "mean"}), data.tokenizer)
    with pytest.raises(ConfigError, match="word_weight"):
        build_method(tiny_mgca(simulated_manifest, **{"model.options.word_weight": "uniform"}), data.tokenizer)


def test_attention_weighted_losses_reach_every_trainable_part(simulated_manifest, monkeypatch):
    from radalign.methods.registry import build_method

    torch.manual_seed(0)
    config = tiny_mgca(simulated_manifest, **{"model.text.freeze_layers": 4})  # the tiny config's own freezing
    data, batch = first_batch(config)
    method = build_method(config, tokenizer=data.tokenizer)
    seen = _spy_token_loss(monkeypatch)
    losses = method.losses(batch)
    assert seen["word_weights"] is not None and not seen["word_weights"].requires_grad  # fixed weights
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    text_layers = [n for n, _ in trainable if n.startswith("text_encoder.")]
    assert text_layers and all(".layer.4." in n or ".layer.5." in n for n in text_layers)
    reached = {n for n, p in trainable if p.grad is not None and p.grad.abs().sum() > 0}
    # every trainable tensor of the text encoder, the four heads and the prototypes; in the random ResNet-18 only
    # the parts before each block's last BatchNorm get none (timm zero-initialises its gamma: zero_init_last)
    missing = [n for n, _ in trainable if n not in reached and not n.startswith("image_encoder.")]
    assert missing == [], missing
    image = [n for n, _ in trainable if n.startswith("image_encoder.")]
    assert all(n in reached for n in image if not n.split(".")[2].startswith("layer") or ".bn2." in n)


def test_token_loss_follows_mgca_code_per_encoder_family_and_options_override(simulated_manifest, monkeypatch):
    from radalign.methods.registry import build_method

    seen: dict[str, object] = {}
    original = radalign.methods.mgca.mgca_token_loss

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(radalign.methods.mgca, "mgca_token_loss", spy)
    config = tiny_mgca(simulated_manifest, **{"loader.batch_size": 4})
    data, batch = first_batch(config)
    method = build_method(config, tokenizer=data.tokenizer)  # ResNet-18: MGCA's CNN branch
    method.losses(batch)
    assert seen["normalize_patch_context"] is True and seen["patch_weights"] is None
    options = {"patch_context_norm": False, "clip_patch_weights": False, "patch_weights": "uniform"}
    vit = tiny_mgca(simulated_manifest, **{"model.image.name": "vit_tiny_patch16_224", "model.options": options})
    method = build_method(vit, tokenizer=data.tokenizer)
    method.losses(first_batch(vit)[1])
    assert seen["normalize_patch_context"] is False and seen["clip_patch_weights"] is False
    assert seen["patch_weights"] is None
    with pytest.raises(ConfigError, match="patch_context_norm"):
        build_method(tiny_mgca(simulated_manifest, **{"model.options": {"patch_context_norm": "yes"}}))


def test_instance_loss_is_mgcas_sum_of_both_directions():
    import torch.nn.functional as F

    from radalign.methods.builders import build_infonce

    for name in ("mgca", "mgca-tiny"):
        contrast = build_infonce(load_config(find_config(name)).objectives["instance"])
        g = torch.Generator().manual_seed(0)
        image, text = (
            F.normalize(torch.randn(6, 8, generator=g), dim=1),
            F.normalize(torch.randn(6, 8, generator=g), dim=1),
        )
        scores = image @ text.T / 0.07
        labels = torch.arange(6)
        official = F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)  # loss_ita, lambda_1 = 1
        torch.testing.assert_close(contrast(image, text), official)
