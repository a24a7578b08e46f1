"""MLIP: the momentum-distillation loss, label-fixed prototype codes and the matching pairs against loop
references; the text views (masking, sentence shuffle, sentence swap) by their definitions and seeds; the
knowledge (refresh schedule, prototypes started at it, padding-proof fusion); the divergence encoder (no
gradient, EMA); the ablation configs; and a CLI run that exports, loads and evaluates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from radalign.config import config_changes, find_config, load_config
from radalign.errors import ConfigError
from radalign.methods.registry import build_method
from tests.helpers import first_batch, tiny_config


def tiny_mlip(manifest, **overrides):
    return tiny_config("mlip", manifest, **{"loader.max_length": 48, **overrides})


@pytest.fixture(scope="module")
def mlip_batch(simulated_manifest):
    config = tiny_mlip(simulated_manifest)
    data, batch = first_batch(config)
    return config, data.tokenizer, batch


def _build(config, tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_method(config, tokenizer=tokenizer)


# -- losses against loops -----------------------------------------------------------------------------------------
def _loop_distillation(image, text, image_m, text_m, alpha, tau):
    image, text, image_m, text_m = (F.normalize(x.double(), dim=-1) for x in (image, text, image_m, text_m))
    n = len(image)

    def direction(a, b, a_m, b_m):
        total = 0.0
        for i in range(n):
            logits = [float(a[i] @ b[j]) / tau for j in range(n)]
            m_logits = [float(a_m[i] @ b_m[j]) / tau for j in range(n)]
            log_z = math.log(sum(math.exp(x) for x in logits))
            m_z = sum(math.exp(x) for x in m_logits)
            for j in range(n):
                target = alpha * math.exp(m_logits[j]) / m_z + (1 - alpha) * (i == j)
                total -= target * (logits[j] - log_z)
        return total / n

    return (direction(image, text, image_m, text_m) + direction(text, image, text_m, image_m)) / 2


def test_momentum_distillation_loss_equals_the_loop_reference_in_value_and_gradient():
    from radalign.objectives.distillation import momentum_distillation_loss

    g = torch.Generator().manual_seed(0)
    image, text, image_m, text_m = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(4))
    image.requires_grad_(True)
    got = momentum_distillation_loss(image, text, image_m, text_m, alpha=0.4, temperature=0.1)
    assert float(got.detach()) == pytest.approx(_loop_distillation(image, text, image_m, text_m, 0.4, 0.1), rel=1e-9)
    got.backward()
    numeric = torch.zeros_like(image)
    for idx in [(0, 0), (2, 3), (4, 5)]:
        for sign in (1, -1):
            shifted = image.detach().clone()
            shifted[idx] += sign * 1e-6
            numeric[idx] += sign * _loop_distillation(shifted, text, image_m, text_m, 0.4, 0.1) / 2e-6
        assert float(image.grad[idx]) == pytest.approx(float(numeric[idx]), rel=1e-5, abs=1e-8)
    # alpha 0 is the plain InfoNCE of the online pair, whatever the momentum side says
    from radalign.objectives.contrastive import info_nce

    plain = info_nce(image, text, 0.1, direction_weights=(0.5, 0.5))
    torch.testing.assert_close(momentum_distillation_loss(image, text, image_m, text_m, 0.0, 0.1), plain)


def test_fixed_prototype_codes_replace_sinkhorn_for_their_rows_only():
    from radalign.objectives.prototype import PrototypeLoss, sinkhorn_knopp

    torch.manual_seed(0)
    loss = PrototypeLoss(4, n_prototypes=3, tau=0.2)
    image, text = torch.randn(4, 4), torch.randn(4, 4)
    codes = torch.full((4, 3), float("nan"))
    codes[1] = torch.tensor([0.0, 0.5, 0.5])
    got = loss(image, text, codes)
    protos = loss.prototypes.detach()
    s_img, s_txt = F.normalize(image, dim=-1) @ protos.T, F.normalize(text, dim=-1) @ protos.T
    q_img, q_txt = sinkhorn_knopp(s_img), sinkhorn_knopp(s_txt)
    q_img[1] = q_txt[1] = codes[1]
    total = 0.0
    for i in range(4):
        for k in range(3):
            total -= q_img[i, k] * torch.log_softmax(s_txt[i] / 0.2, 0)[k] + q_txt[i, k] * torch.log_softmax(
                s_img[i] / 0.2, 0)[k]  # fmt: skip
    assert float(got) == pytest.approx(float(total) / 8, rel=1e-5)
    with pytest.raises(ConfigError, match="codes"):
        loss(image, text, codes[:2])


def test_matching_pairs_are_one_positive_and_two_hard_negatives_per_sample():
    from radalign.models.fusion import matching_pairs
    from radalign.objectives.distillation import hard_negatives

    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    texts_for_images, images_for_texts = hard_negatives(sim, torch.Generator().manual_seed(3))
    images, texts, labels = matching_pairs(6, texts_for_images, images_for_texts)
    assert labels.tolist() == [1] * 6 + [0] * 12
    for image, text, label in zip(images.tolist(), texts.tolist(), labels.tolist(), strict=True):
        assert (image == text) == bool(label)  # a negative is never the pair itself
    assert sorted(images[6:12].tolist()) == list(range(6)) and sorted(texts[12:].tolist()) == list(range(6))


def test_fusion_blocks_ignore_padded_keys_and_words():
    from radalign.models.fusion import MatchingHead

    torch.manual_seed(0)
    head = MatchingHead(8, heads=2).eval()
    words, patches = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    word_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    patch_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    before = head(words, word_mask, patches, patch_mask)
    words[0, 3:] = 1e3  # padding words and padding patches hold anything
    patches[1, 4:] = -1e3
    torch.testing.assert_close(head(words, word_mask, patches, patch_mask), before)


# -- text views ---------------------------------------------------------------------------------------------------
def test_token_masking_touches_only_word_pieces_at_the_given_rate():
    from radalign.data.text_views import mask_tokens

    ids = torch.arange(10, 10 + 2 * 400).reshape(2, 400)
    token_word = torch.arange(400).repeat(2, 1)
    token_word[:, 0] = token_word[:, -1] = -1  # [CLS] / [SEP]
    token_word[1, 300:] = -1  # padding
    out = mask_tokens(ids, token_word, 3, 0.25, torch.Generator().manual_seed(0))
    assert (out[token_word < 0] == ids[token_word < 0]).all()
    rate = float((out == 3)[token_word >= 0].float().mean())
    assert 0.2 < rate < 0.3
    again = mask_tokens(ids, token_word, 3, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ConfigError, match="mask_ratio"):
        mask_tokens(ids, token_word, 3, 1.0, torch.Generator())


def test_sentence_shuffle_permutes_whole_sentences_and_keeps_special_tokens():
    from radalign.data.text_views import shuffle_sentences

    ids = torch.tensor([[101, 1, 2, 3, 4, 5, 6, 102, 0]])
    sentence = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1, -1]])
    seen = set()
    for seed in range(20):
        out = shuffle_sentences(ids, sentence, torch.Generator().manual_seed(seed))[0].tolist()
        assert out[0] == 101 and out[7:] == [102, 0]
        body = out[1:7]
        spans = {(1, 2), (3,), (4, 5, 6)}
        parsed, k = [], 0
        while k < len(body):
            span = next(s for s in spans if tuple(body[k : k + len(s)]) == s)
            parsed.append(span)
            k += len(span)
        assert sorted(parsed) == sorted(spans)
        seen.add(tuple(parsed))
    assert len(seen) > 1
    # a batch: each report is shuffled within itself, padding and specials untouched
    ids2 = torch.tensor([[101, 1, 2, 3, 4, 5, 6, 102, 0], [101, 7, 8, 9, 102, 0, 0, 0, 0]])
    sentence2 = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1, -1], [-1, 0, 1, 1, -1, -1, -1, -1, -1]])
    out2 = shuffle_sentences(ids2, sentence2, torch.Generator().manual_seed(5))
    assert out2[1].tolist() in ([101, 7, 8, 9, 102, 0, 0, 0, 0], [101, 8, 9, 7, 102, 0, 0, 0, 0])
    assert sorted(out2[0, 1:7].tolist()) == [1, 2, 3, 4, 5, 6] and out2[0, 7:].tolist() == [102, 0]


def test_sentence_swap_replaces_one_sentence_with_a_different_one_of_another_report():
    from radalign.data.text_views import swap_sentences

    reports = [["No pneumothorax.", "Heart size normal."], ["No pneumothorax."], ["Small effusion.", "Lungs clear."]]
    texts, done = swap_sentences(reports, torch.Generator().manual_seed(0))
    assert done == [True, True, True]
    pool = {s for r in reports for s in r}
    for i, (text, report) in enumerate(zip(texts, reports, strict=True)):
        kept = [s for s in report if s in text]
        assert len(kept) == len(report) - 1  # exactly one sentence replaced
        new = [s for s in pool - set(report) if s in text]
        assert len(new) == 1 and new[0] not in report and any(new[0] in reports[j] for j in range(3) if j != i)
    assert swap_sentences(reports, torch.Generator().manual_seed(0)) == (texts, done)
    # nothing different to swap in: no negative is made
    assert swap_sentences([["A."], ["A."]], torch.Generator())[1] == [False, False]


# -- the method ---------------------------------------------------------------------------------------------------
def test_configs_and_ablations_differ_from_mlip_only_where_they_say():
    paper = load_config(find_config("mlip"))
    assert paper.model.image.name == "vit_base_patch16_224" and paper.loader.batch_size == 144
    assert paper.ema.modules == ["text_encoder", "text_head"] and paper.ema.decay == 0.995
    assert paper.objectives["consistency"]["alpha"] == 0.4
    expected = {
        "no-divergence": {"objectives.divergent.weight", "objectives.consistency.weight", "ema.modules"},
        "no-knowledge": {"model.options.knowledge_attention"},
        "no-category": {"stages"},
        "no-itm": {"objectives.itm.weight"},
    }
    for name, keys in expected.items():
        ablation = load_config(find_config(f"mlip-ablation-{name}"))
        assert set(config_changes(paper.to_dict(), ablation.to_dict())) == keys, name


def test_every_objective_is_finite_and_trains_what_it_should(mlip_batch):
    config, tokenizer, batch = mlip_batch
    method = _build(config, tokenizer)
    method.stage_weights, method.step = config.weights_at(150, 0), 150
    losses = method.losses(batch)
    assert set(losses) == set(method.objective_names)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("image_encoder", "text_head", "image_local_head", "knowledge_attention", "matching", "prototype"):
        grads = [p.grad for p in getattr(method, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
    assert all(p.grad is None for p in method.ema.parameters())  # the divergence encoder learns by EMA only
    before = [p.clone() for p in method.ema["text_head"].parameters()]
    with torch.no_grad():
        for p in method.text_head.parameters():
            p.add_(1.0)
    method.ema.update(method)
    for old, new, online in zip(before, method.ema["text_head"].parameters(), method.text_head.parameters(),
                                strict=True):  # fmt: skip
        torch.testing.assert_close(new, 0.995 * old + 0.005 * online)


def test_off_objectives_are_skipped_and_never_on_ones_build_nothing(mlip_batch):
    config, tokenizer, batch = mlip_batch
    method = _build(config, tokenizer)
    method.stage_weights, method.step = config.weights_at(0, 0), 0  # the category level joins at step 100
    assert "prototype" not in method.losses(batch)
    off = {"objectives.itm.weight": 0.0, "stages": [], "objectives.divergent.weight": 0.0,
           "objectives.consistency.weight": 0.0, "ema.modules": []}  # fmt: skip
    ablated = load_config(find_config("mlip-tiny"), {**_small(config), **off})
    method = _build(ablated, tokenizer)
    assert method.matching is None and method.prototype is None and method.ema is None
    assert set(method.losses(batch)) == {"instance", "token"}


def _small(config):
    return {"loader.image_size": config.loader.image_size, "loader.batch_size": config.loader.batch_size,
            "loader.max_length": config.loader.max_length, "loader.manifest": config.loader.manifest,
            "model.text.freeze_layers": 6, "trainer.progress": False}  # fmt: skip


def test_prototypes_start_at_the_findings_knowledge_embeddings(mlip_batch):
    config, tokenizer, batch = mlip_batch
    method = _build(config, tokenizer)
    method.step, method.stage_weights = 100, config.weights_at(100, 0)
    assert not bool(method.prototypes_ready)
    method.losses(batch)
    with torch.no_grad():  # the head as the start saw it: eval mode, after this batch's statistics update
        method.text_head.eval()
        projected = F.normalize(method.text_head(method.knowledge_features), dim=-1)
        method.text_head.train()
    expected = torch.stack([projected[[k for k, o in enumerate(method.knowledge_owner) if o == c]].mean(0)
                            for c in range(len(method.knowledge.findings))])  # fmt: skip
    assert int(method.knowledge_step) == 100
    assert bool(method.prototypes_ready)
    assert method.prototype.prototypes.shape[0] == len(method.knowledge.findings) == 16
    # the loss renormalises the prototypes before use; the direction is the knowledge's
    torch.testing.assert_close(method.prototype.prototypes.detach(), F.normalize(expected, dim=-1), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_knowledge_is_reencoded_on_its_schedule_and_changes_the_token_level(mlip_batch):
    config, tokenizer, batch = mlip_batch
    method = _build(config, tokenizer)
    calls = []
    original = method.refresh_knowledge

    def counted():
        calls.append(method.step)
        original()

    method.refresh_knowledge = counted
    for step in (0, 1, 24, 25, 30, 50):
        method.step, method.stage_weights = step, {"instance": 1.0, "token": 0.7}
        method.knowledge_embeddings()
    assert calls == [0, 25, 50] and int(method.knowledge_step) == 50  # refresh every 25 (mlip-tiny)
    assert "knowledge_features" in method.state_dict() and "knowledge_step" in method.state_dict()
    torch.manual_seed(1)
    weights = {"instance": 0.0, "token": 1.0, "divergent": 0.0, "consistency": 0.0, "prototype": 0.0, "itm": 0.0}
    method.eval()
    method.stage_weights = weights
    with_knowledge = method.losses(batch)["token"]
    method.knowledge_features.mul_(-1.0)
    assert not torch.allclose(method.losses(batch)["token"], with_knowledge)


def test_without_knowledge_attention_the_token_level_is_mgcas(mlip_batch):
    config, tokenizer, batch = mlip_batch
    ablated = load_config(find_config("mlip-tiny"), {**_small(config), "model.options.knowledge_attention": False})
    method = _build(ablated, tokenizer).eval()
    assert method.knowledge_attention is None
    method.stage_weights = {"instance": 0.0, "token": 1.0, "divergent": 0.0, "consistency": 0.0, "itm": 0.0}
    image = method.image_encoder(batch["image"])
    text = method._text({k: batch[k] for k in ("input_ids", "attention_mask", "token_sentence", "token_word")},
                        cls_attention=True)  # fmt: skip
    torch.testing.assert_close(method.losses(batch)["token"], method.token_loss(image, text))


def test_divergent_views_follow_the_seed_and_step(mlip_batch):
    config, tokenizer, batch = mlip_batch
    method = _build(config, tokenizer).eval()
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "token_sentence", "token_word")}
    method.step = 7
    a, b = method.divergent_texts(text), method.divergent_texts(text)
    torch.testing.assert_close(a, b)
    method.step = 8
    assert not torch.allclose(method.divergent_texts(text), a)


def test_bad_settings_are_refused_with_the_fix(mlip_batch):
    config, tokenizer, _ = mlip_batch
    with pytest.raises(ConfigError, match=r"ema\.modules"):
        _build(load_config(find_config("mlip-tiny"), {**_small(config), "ema.modules": []}), tokenizer)
    with pytest.raises(ConfigError, match="n_prototypes is the number of knowledge entries"):
        _build(load_config(find_config("mlip-tiny"), {**_small(config), "objectives.prototype.n_prototypes": 9}),
               tokenizer)  # fmt: skip
    with pytest.raises(ConfigError, match="assign must be one of"):
        _build(load_config(find_config("mlip-tiny"), {**_small(config), "objectives.prototype.assign": "x"}),
               tokenizer)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown parameter 'knowlege'"):
        _build(load_config(find_config("mlip-tiny"), {**_small(config), "model.options.knowlege": "x"}), tokenizer)


def test_label_assignment_uses_the_findings_of_labelled_samples(mlip_batch):
    config, tokenizer, batch = mlip_batch
    method = _build(load_config(find_config("mlip-tiny"), {**_small(config), "objectives.prototype.assign": "labels"}),
                    tokenizer)  # fmt: skip
    codes = method.label_codes(batch, batch["image"])
    findings = method.knowledge.findings
    vocabulary = list(batch["vocabulary"])
    for i in range(codes.shape[0]):
        positive = [
            c for c, f in enumerate(findings) if f in vocabulary and batch["labels"][i, vocabulary.index(f)] == 1
        ]
        if positive:
            assert codes[i].sum() == pytest.approx(1.0) and set(codes[i].nonzero().squeeze(1).tolist()) == set(positive)
        else:
            assert codes[i].isnan().all()


def test_mlip_trains_from_the_cli_exports_loads_and_evaluates(simulated_manifest, tmp_path):
    import json

    import radalign
    from radalign.cli import main

    run = tmp_path / "run"
    main(["pretrain", "--config", "mlip-tiny", "--data", str(simulated_manifest), "--out", str(run),
          "--max_steps", "3", "--trainer.progress", "false", "--loader.image_size", "64", "--loader.batch_size", "8",
          "--loader.max_length", "48"])  # fmt: skip
    model = radalign.load(run / "export")
    assert model.encode_texts(["Small left pleural effusion."]).shape == (1, 128)
    main(["evaluate", "--model", str(run / "export"), "--data", str(simulated_manifest), "--out",
          str(tmp_path / "eval"), "--tasks", "zero_shot,retrieval",
          "--overrides", json.dumps({"bootstrap": 0, "image_size": 64})])  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {"zero_shot", "retrieval"} <= set(results["tasks"])
