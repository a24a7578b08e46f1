"""GLoRIA as a method: configs, losses on real simulated batches, training, export, locals and local scores."""

from __future__ import annotations

import pytest
import torch

import radalign.methods.gloria  # noqa: F401  (registers "gloria")
from radalign.config import find_config, load_config
from radalign.errors import ConfigError
from tests.helpers import first_batch, tiny_config


def tiny_gloria(manifest=None, **overrides):
    return tiny_config("gloria", manifest, **overrides)


def grad_sum(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def batch_and_method(simulated_manifest):
    from radalign.methods.registry import build_method

    config = tiny_gloria(simulated_manifest)
    torch.manual_seed(0)  # before the batch: its augmentation draws from the global generator
    data, batch = first_batch(config)
    return batch, build_method(config, tokenizer=data.tokenizer)


@pytest.fixture(scope="module")
def exported(simulated_manifest, tmp_path_factory):
    from radalign.training.run import pretrain

    config = tiny_gloria(simulated_manifest, **{"trainer.max_steps": 6, "trainer.log_every_n_steps": 1})
    return config, pretrain(config, tmp_path_factory.mktemp("gloria"))


def test_shipped_configs_load_and_build():
    from radalign.methods.registry import build_method

    paper = load_config(find_config("gloria"))
    assert paper.model.image.name == "resnet50" and paper.model.text.sum_last_layers == 4
    assert paper.optim.lr == pytest.approx(5e-5) and paper.loader.batch_size == 48 and paper.trainer.max_epochs == 50
    # 2 x radalign's mean of the two directions = the official sum, so gradient clipping at 0.25 acts the same
    for config in (paper, load_config(find_config("gloria-tiny"))):
        assert config.weights_at(0, 0) == {"global": 2.0, "local": 2.0}
        assert config.model.options.get("cls_word", True) is True
    method = build_method(tiny_gloria(), for_inference=True)
    assert type(method).__name__ == "GLoRIA" and method.objective_names == ("global", "local")
    assert method.image_encoder.pyramid_strides[method.local_level] == 16
    assert (method.local_loss.temp1, method.local_loss.temp2, method.local_loss.temp3) == (4.0, 5.0, 10.0)
    assert method.local_loss.agg == "sum" and method.global_temp3 == 10.0


def test_losses_are_finite_and_reach_image_encoder_and_word_projection(batch_and_method):
    batch, method = batch_and_method
    method.train()
    losses = method.losses(batch)
    assert set(losses) == {"global", "local"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    method.zero_grad()
    losses["local"].backward(retain_graph=True)
    # the local loss alone trains the stride-16 stage (conv4 = layer3) and the word projection, not layer4; timm
    # zero-initialises each block's last BN scale, so the block's own convs start with zero gradient: check BNs
    encoder = method.image_encoder.model
    conv4 = encoder.layer3[-1].bn2.weight.grad
    assert conv4 is not None and conv4.abs().sum() > 0 and encoder.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.layer4.parameters())
    assert method.word_head.weight.grad is not None and method.word_head.weight.grad.abs().sum() > 0
    assert grad_sum(method.image_head) == 0
    losses["global"].backward()
    assert encoder.layer4[-1].bn2.weight.grad.abs().sum() > 0 and grad_sum(method.image_head) > 0


def test_local_similarity_matches_the_local_loss_scores(batch_and_method):
    from radalign.methods.base import TEXT_KEYS
    from radalign.objectives.local.gloria import gloria_local_scores

    batch, method = batch_and_method
    method.eval()
    text = {k: batch[k] for k in TEXT_KEYS}
    method.eval()  # no dropout: the two encodings below must be the same
    with torch.no_grad():
        scores = method.local_similarity(batch["image"], text)
        _, regions, grid = method._image(batch["image"])
        _, words, word_mask = method._text(text)
        expected = gloria_local_scores(words, word_mask, regions, None, 4.0, 5.0, "sum")
    assert scores.shape == (8, 8) and grid == (4, 4)
    torch.testing.assert_close(scores, expected)


def test_pretrain_exports_a_model_with_embeddings_locals_and_local_scores(exported):
    from radalign.inference import load

    config, result = exported
    assert result.steps == 6 and (result.export / "model.safetensors").is_file()
    model = load(result.export)
    images = torch.rand(3, 1, 64, 64) * 4 - 2  # the range of normalised radiographs
    emb = model.encode_images(images)
    assert emb.shape == (3, config.model.embed_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    texts = model.encode_texts(["Small left pleural effusion.", "No pneumothorax."])
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))
    with torch.no_grad():
        local, grid = model.method.encode_image_locals(images)
        tokens = {k: v for k, v in model.tokenize(["Cardiomegaly.", "Left effusion.", "Clear lungs."]).items()}
        scores = model.method.local_similarity(images, tokens)
    assert grid == (4, 4) and local.shape == (3, 16, config.model.embed_dim)
    torch.testing.assert_close(local.norm(dim=-1), torch.ones(3, 16))
    assert scores.shape == (3, 3) and torch.isfinite(scores).all()


def test_unknown_options_are_config_errors_that_name_them():
    from radalign.methods.registry import build_method

    for key, name in (("objectives.local.temp4", "temp4"), ("objectives.global.tau", "tau"),
                      ("model.options.local_strid", "local_strid")):  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            build_method(tiny_gloria(**{key: 1.0}), for_inference=True)
    with pytest.raises(ConfigError, match="local_stride=12"):
        build_method(tiny_gloria(**{"model.options.local_stride": 12}), for_inference=True)


def test_word_sequence_starts_with_cls_as_the_official_code(batch_and_method):
    # GLoRIA's caption length counts [CLS]: its local loss slices [CLS] + the words (not [SEP]).
    from radalign.methods.base import TEXT_KEYS

    batch, method = batch_and_method
    text = {k: batch[k] for k in TEXT_KEYS}
    method.eval()  # no dropout: the two encodings below must be the same
    with torch.no_grad():
        out = method.text_encoder(text["input_ids"], text["attention_mask"], token_word=text["token_word"])
        _, words, mask = method._text(text)
        assert method.cls_word and words.shape[1] == out.words.shape[1] + 1
        torch.testing.assert_close(words[:, 0], method.word_head(out.tokens[:, 0]))
        torch.testing.assert_close(words[:, 1:][out.word_mask], method.word_head(out.words)[out.word_mask])
        assert mask[:, 0].all() and torch.equal(mask[:, 1:], out.word_mask)
        method.cls_word = False
        try:
            assert method._text(text)[1].shape[1] == out.words.shape[1]
        finally:
            method.cls_word = True
            method.train()
