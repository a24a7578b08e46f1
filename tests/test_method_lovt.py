"""LoVT: shipped configs, named losses with gradients on real simulated batches, the ablation switches, and a short
pretrain -> export -> load round trip with local embeddings for grounding."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import radalign.methods.lovt  # noqa: F401  (registers "lovt")
from radalign.config import find_config, load_config
from tests.helpers import first_batch, tiny_config

CONFIGS = (
    "lovt",
    "lovt-tiny",
    *(f"lovt-ablation-{n}" for n in ("no-global", "no-local", "no-weighting", "no-smoothing")),
)


def tiny_lovt(manifest, **overrides):
    settings = {"trainer.checkpoint_every_n_steps": 1000, "trainer.log_every_n_steps": 1, "trainer.max_steps": 5}
    return tiny_config("lovt", manifest, **{**settings, **overrides})


@pytest.fixture(scope="module")
def batch_and_method(simulated_manifest):
    from radalign.methods.registry import build_method

    config = tiny_lovt(simulated_manifest)
    torch.manual_seed(0)
    data, batch = first_batch(config)
    return config, data.tokenizer, batch, build_method(config, tokenizer=data.tokenizer)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load_with_the_paper_weights(name):
    config = load_config(find_config(name))
    assert config.method == "lovt"
    weights = config.weights_at(0, 0)
    expected = {"global": 1.0, "local_image": 0.375, "local_text": 0.375}
    if name.endswith("no-global"):
        expected["global"] = 0.0
    if name.endswith("no-local"):
        expected["local_image"] = expected["local_text"] = 0.0
    assert weights == expected
    assert config.objectives["global"]["direction_weights"] == [0.75, 0.25]
    assert (
        config.objectives["global"]["temperature"] == 0.1 and not config.objectives["global"]["learnable_temperature"]
    )
    assert config.loader.text_swap_p == 0.4
    assert config.objectives["local_image"]["spatial_smoothing"] is (not name.endswith("no-smoothing"))
    assert config.objectives["local_text"]["weighting"] is (not name.endswith("no-weighting"))
    # the official cross-attention initialisation (PyTorch's default is only an option: docs/methods/lovt.md)
    assert config.model.options.get("cross_attention_init", "official") == "official"


def test_tiny_config_builds_and_rejects_unknown_options(simulated_manifest):
    from radalign.errors import ConfigError
    from radalign.methods.registry import build_method

    method = build_method(tiny_lovt(simulated_manifest))
    assert type(method).__name__ == "LoVT" and method.cross_attention.dim == 128
    with pytest.raises(ConfigError, match="sentence_pool"):
        build_method(tiny_lovt(simulated_manifest, **{"model.options": {"sentence_pool": "max"}}))
    with pytest.raises(ConfigError, match="smoothing"):
        build_method(tiny_lovt(simulated_manifest, **{"objectives.local_image.smoothing": False}))


def test_losses_are_finite_and_reach_every_trainable_part(batch_and_method):
    config, _, batch, method = batch_and_method
    method.train()
    method.zero_grad()
    losses = method.losses(batch)
    assert set(losses) == {"global", "local_image", "local_text"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    weights = config.weights_at(0, 0)
    sum(weights[k] * v for k, v in losses.items()).backward()

    def reached(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    # (the text encoder is fully frozen here: freeze_layers 6 keeps the test fast)
    for part in ("image_encoder", "image_pool", "text_pool", "image_head", "text_head",
                 "image_local_head", "text_local_head", "cross_attention"):  # fmt: skip
        assert reached(getattr(method, part)), part
    assert method.cross_attention.key.weight.grad.abs().sum() > 0  # the shared key projection learns


def test_pool_weights_never_receive_gradient_through_the_local_losses(batch_and_method):
    _, _, batch, method = batch_and_method
    method.train()
    method.zero_grad()
    losses = method.losses(batch)
    (losses["local_image"] + losses["local_text"]).backward()
    # the pools' query/key projections only shape the weights, which the local losses detach
    for pool in (method.image_pool, method.text_pool):
        assert pool.q_proj.weight.grad is None or pool.q_proj.weight.grad.abs().sum() == 0


def test_ablation_switches_change_the_local_loss(batch_and_method):
    config, _, batch, method = batch_and_method

    def local_losses(**objectives) -> dict[str, float]:
        other = copy.deepcopy(method)  # a copy, not a rebuild: loading MiniLM three times is most of the time
        other.config = tiny_lovt(config.loader.manifest, **objectives)
        with torch.no_grad():  # sharpen the pools: at init their weights are nearly uniform, hiding the weighting
            for pool in (other.image_pool, other.text_pool):
                pool.k_proj.weight.mul_(30.0)
        other.train()  # batch statistics spread the regions apart; eval-mode BN at init leaves them nearly equal
        torch.manual_seed(0)  # the same dropout masks for every variant
        with torch.no_grad():
            out = other.losses(batch)
        return {k: float(v) for k, v in out.items()}

    # Every variant runs the same deterministic computation but for the switch, so any difference is the switch's
    # (float noise between identical runs is 0); untrained features keep the per-local losses close, hence 1e-5.
    base = local_losses()
    smooth_off = local_losses(**{"objectives.local_image.spatial_smoothing": False})
    weight_off = local_losses(**{"objectives.local_image.weighting": False, "objectives.local_text.weighting": False})
    assert abs(smooth_off["local_image"] - base["local_image"]) > 1e-5
    assert smooth_off["local_text"] == pytest.approx(base["local_text"])
    assert abs(weight_off["local_image"] - base["local_image"]) > 1e-5
    assert abs(weight_off["local_text"] - base["local_text"]) > 1e-5
    assert weight_off["global"] == pytest.approx(base["global"])


def test_local_losses_on_a_2x2_grid_equal_the_loop_reference_with_hand_written_positives(batch_and_method):
    """The method's two local terms on its own real batch, against the loop reference of test_local_lovt with the
    2x2 grid's positives written out: side neighbours at d = 1 / sqrt(8), the diagonal one at exactly d = 0.5 (the
    inclusive threshold keeps it), each row exp(-d) normalised."""
    from tests.test_local_lovt import _reference_loss

    _, _, batch, method = batch_and_method
    # float64: untrained regions are nearly alike, so a wrong positive set moves the loss by about 1e-6 only
    method = copy.deepcopy(method).double().eval()
    side, diagonal = 1 / math.sqrt(8), 0.5
    d = torch.tensor(
        [[0, side, side, diagonal], [side, 0, diagonal, side], [side, diagonal, 0, side], [diagonal, side, side, 0]],
        dtype=torch.float64,
    )
    positives = torch.exp(-d) / torch.exp(-d).sum(dim=1, keepdim=True)
    batch = {**batch, "image": batch["image"].double()}
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "token_sentence")}
    with torch.no_grad():
        losses = method.losses(batch)
        _, regions, region_mask, region_w, grid = method._images(batch["image"])
        _, sentences, sentence_mask, sentence_w = method._texts(text)
        sent2region, region2sent = method.cross_attention(regions, region_mask, sentences, sentence_mask)
    assert grid == (2, 2) and regions.shape == (len(batch["image"]), 4, 128) and regions.dtype == torch.float64
    region_valid = region_mask & sentence_mask.any(dim=1, keepdim=True)
    expected_image = sum(_reference_loss(regions, sent2region, region_valid, positives, region_w, 0.3))
    expected_text = sum(_reference_loss(sentences, region2sent, sentence_mask, None, sentence_w, 0.3))
    torch.testing.assert_close(losses["local_image"], expected_image, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses["local_text"], expected_text, rtol=1e-10, atol=1e-12)
    # the diagonal neighbour left out (a strict threshold) is a different number, far outside that tolerance
    strict = positives * (d < 0.5)
    without_diagonal = sum(_reference_loss(regions, sent2region, region_valid, strict, region_w, 0.3))
    assert abs(float(without_diagonal) - float(expected_image)) > 1e-8


def test_short_pretrain_exports_a_loadable_model_with_locals(simulated_manifest, tmp_path):
    from radalign.inference import load
    from radalign.training.run import pretrain

    config = tiny_lovt(simulated_manifest)
    result = pretrain(config, tmp_path / "run")
    assert result.steps == 5
    model = load(result.export)
    images = torch.rand(3, 1, 64, 64) * 4 - 2  # the range of normalised radiographs
    emb = model.encode_images(images)
    assert emb.shape == (3, 128)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    texts = model.encode_texts(["Small left pleural effusion.", "No pneumothorax. Heart size is normal."])
    assert texts.shape == (2, 128) and torch.isfinite(texts).all()
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))
    with torch.no_grad():
        locals_, grid = model.method.encode_image_locals(images)
    assert grid == (2, 2) and locals_.shape == (3, 4, 128)
    torch.testing.assert_close(locals_.norm(dim=-1), torch.ones(3, 4))


def test_probe_features_are_what_the_global_head_projects(batch_and_method):
    # The linear probe reads LoVT's own global image representation: its attention pool, before image_head.
    import torch.nn.functional as F

    _, _, batch, method = batch_and_method
    method.eval()
    images = batch["image"][:4]
    with torch.no_grad():
        features = method.global_image_features(images)
        torch.testing.assert_close(F.normalize(method.image_head(features), dim=-1), method.encode_images(images))
        backbone = method.image_encoder(images).global_emb  # the average pool: a different vector
    assert features.shape == backbone.shape and not torch.allclose(features, backbone)
    method.train()


def test_ablation_switches_hand_the_loss_exactly_the_ablated_inputs(batch_and_method, monkeypatch):
    """Not only *that* a switch changes the loss: smoothing off passes the identity as the regions' positives (and
    on, the thresholded exponentials of the grid's distances); weighting off passes no weights at all."""
    import radalign.methods.lovt as lovt_module
    from radalign.objectives.local.lovt import spatial_positives

    config, _, batch, method = batch_and_method
    real = lovt_module.local_intra_sample_loss
    calls: list[dict] = []

    def recording(z, z_att, mask, positives=None, weights=None, tau=0.3):
        calls.append({"positives": positives, "weights": weights, "tau": tau})
        return real(z, z_att, mask, positives=positives, weights=weights, tau=tau)

    monkeypatch.setattr(lovt_module, "local_intra_sample_loss", recording)

    def handed(**objectives):
        calls.clear()
        other = copy.deepcopy(method)
        other.config = tiny_lovt(config.loader.manifest, **objectives)
        with torch.no_grad():
            other.losses(batch)
        return calls[0], calls[1]  # the region loss, then the sentence loss

    region, sentence = handed()
    with torch.no_grad():
        grid = copy.deepcopy(method).eval().encode_image_locals(batch["image"][:1])[1]
    assert torch.equal(region["positives"], spatial_positives(grid, threshold=0.5))
    assert sentence["positives"] is None and region["weights"] is not None and sentence["weights"] is not None
    region, _ = handed(**{"objectives.local_image.spatial_smoothing": False})
    assert torch.equal(region["positives"], torch.eye(math.prod(grid)))
    region, sentence = handed(**{"objectives.local_image.weighting": False, "objectives.local_text.weighting": False})
    assert region["weights"] is None and sentence["weights"] is None
    assert torch.equal(region["positives"], spatial_positives(grid, threshold=0.5))  # smoothing untouched
