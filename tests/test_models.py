"""Encoders fill the output contract: shapes, masks, [CLS] attention, 1-channel weights, freezing, pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radalign.data.dataset import Collate
from radalign.data.tokenization import encode_report, load_tokenizer, train_wordpiece
from radalign.errors import ConfigError
from radalign.models import (
    AttentionPool,
    HFTextEncoder,
    ProjectionHead,
    TimmImageEncoder,
    build_image_encoder,
    build_text_encoder,
    segment_mean,
    tiny_bert,
)
from tests.conftest import REPORTS


def test_resnet18_output_contract():
    encoder = build_image_encoder({"name": "resnet18", "pretrained": None, "kwargs": {}}).eval()
    images = torch.randn(2, 1, 64, 64)
    out = encoder(images)
    assert encoder.out_dim == 512
    assert out.global_emb.shape == (2, 512) and out.local.shape == (2, 4, 512) and out.grid_shape == (2, 2)
    assert out.local_mask.dtype == torch.bool and out.local_mask.shape == (2, 4) and out.local_mask.all()
    assert out.attention is None
    feature_map = encoder.model.forward_features(images)  # (B, C, h, w)
    assert torch.allclose(out.grid(), feature_map, atol=1e-6)  # local is the map, row-major
    assert torch.allclose(out.global_emb, feature_map.mean(dim=(2, 3)), atol=1e-5)


def test_vit_tiny_output_contract_and_cls_attention():
    encoder = build_image_encoder({"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 64}}).eval()
    images = torch.randn(3, 1, 64, 64)
    out = encoder(images)
    assert encoder.out_dim == 192
    assert out.global_emb.shape == (3, 192) and out.local.shape == (3, 16, 192) and out.grid_shape == (4, 4)
    assert out.local_mask.all()
    tokens = encoder.model.forward_features(images)
    assert torch.allclose(out.global_emb, tokens[:, 0], atol=1e-6)  # [CLS]
    assert torch.allclose(out.local, tokens[:, 1:], atol=1e-6)
    assert out.attention.shape == (3, 16) and (out.attention >= 0).all()
    assert torch.allclose(out.attention.sum(-1), torch.ones(3), atol=1e-6)
    # timm's own attention matrix (unfused path) gives the same [CLS] row
    attn = encoder.model.blocks[-1].attn
    attn.fused_attn = False
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda m, args, output: captured.append(output))
    encoder(images)
    handle.remove()
    cls_row = captured[0][:, :, 0, 1:].mean(dim=1)  # (B, patches), averaged over heads
    assert torch.allclose(out.attention, cls_row / cls_row.sum(-1, keepdim=True), atol=1e-5)


@pytest.mark.parametrize(("name", "suffix"), [("resnet18", ".safetensors"), ("vit_tiny_patch16_224", ".pt")])
def test_rgb_weights_summed_to_one_channel_equal_grey_replicated(tmp_path, name, suffix):
    import timm
    from safetensors.torch import save_file

    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    rgb = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()  # has a classifier to drop
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": rgb.state_dict()}, path)
    grey_encoder = TimmImageEncoder(name, in_chans=1, pretrained=str(path), **kwargs).eval()
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = rgb.forward_features(grey.expand(-1, 3, -1, -1))
        got = grey_encoder(grey)
    expected_global = expected.mean(dim=(2, 3)) if expected.ndim == 4 else expected[:, 0]
    assert torch.allclose(got.global_emb, expected_global, atol=1e-4)
    random_init = TimmImageEncoder(name, in_chans=1, **kwargs).eval()
    assert not torch.allclose(random_init(grey).global_emb, expected_global, atol=1e-2)  # weights were loaded


def test_weights_for_another_architecture_are_refused(tmp_path):
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ConfigError, match=r"does not match|shape"):
        TimmImageEncoder("resnet34", pretrained=str(tmp_path / "r18.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        TimmImageEncoder("resnet18", pretrained=str(tmp_path / "missing.safetensors"))


def test_3d_encoder_grid_shape():
    encoder = build_image_encoder({"name": "resnet10_3d"}).eval()
    volumes = torch.randn(2, 1, 32, 48, 64)
    out = encoder(volumes)
    assert out.grid_shape == (2, 3, 4)  # MONAI's stem + max-pool + 3 strided stages: / 16
    assert out.local.shape == (2, 24, encoder.out_dim) and out.global_emb.shape == (2, encoder.out_dim)
    assert out.local_mask.shape == (2, 24) and out.local_mask.all()
    assert torch.allclose(out.global_emb, out.local.mean(dim=1))
    assert out.grid().shape == (2, encoder.out_dim, 2, 3, 4)
    with pytest.raises(ConfigError, match="volumes"):
        encoder(torch.randn(2, 1, 32, 32))


def _loop_segment_mean(values, index):
    b, _, d = values.shape
    n = int(index.max()) + 1
    out, mask = torch.zeros(b, n, d), torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        for s in range(n):
            members = index[i] == s
            if members.any():
                out[i, s] = values[i, members].mean(dim=0)
                mask[i, s] = True
    return out, mask


def _batch(tokenizer, reports):
    items = []
    for report in reports:
        enc = encode_report(tokenizer, report.split(". "), max_length=40)
        items.append(
            {
                "id": "x",
                "image": torch.zeros(1, 4, 4),
                "labels": torch.zeros(1),
                "modality": "xray",
                "view": "",
                "input_ids": torch.from_numpy(enc.input_ids),
                "token_sentence": torch.from_numpy(enc.token_sentence),
                "token_word": torch.from_numpy(enc.token_word),
            }
        )
    return Collate(pad_token_id=tokenizer.pad_token_id)(items)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    out = tmp_path_factory.mktemp("wordpiece")
    return train_wordpiece(REPORTS * 3, vocab_size=200, out_dir=out), out


def test_word_and_sentence_pooling_equal_a_loop(wordpiece):
    tokenizer, _ = wordpiece
    batch = _batch(tokenizer, REPORTS)
    assert batch["token_word"].max() > 5 and (batch["attention_mask"] == 0).any()  # premise: padding, words
    values = torch.randn(*batch["input_ids"].shape, 8)
    for key in ("token_word", "token_sentence"):
        got, mask = segment_mean(values, batch[key])
        want, want_mask = _loop_segment_mean(values, batch[key])
        assert torch.equal(mask, want_mask) and torch.allclose(got, want, atol=1e-6)
    encoder = build_text_encoder({"name": "tiny", "tiny": {"hidden": 32}}, vocab_size=len(tokenizer)).eval()
    out = encoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_sentence", "token_word")})
    words, word_mask = _loop_segment_mean(out.tokens.detach(), batch["token_word"])
    sentences, sentence_mask = _loop_segment_mean(out.tokens.detach(), batch["token_sentence"])
    assert torch.allclose(out.words, words, atol=1e-5) and torch.equal(out.word_mask, word_mask)
    assert torch.allclose(out.sentences, sentences, atol=1e-5) and torch.equal(out.sentence_mask, sentence_mask)
    assert torch.equal(out.n_sentences, batch["n_sentences"])
    assert torch.allclose(out.global_emb, out.tokens[:, 0]) and torch.equal(out.token_mask, batch["attention_mask"] > 0)


def test_wordpiece_training_and_tokenizer_roundtrip(wordpiece):
    from transformers import AutoTokenizer

    trained, folder = wordpiece
    loaded = load_tokenizer(folder)
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert loaded.is_fast and 40 < len(loaded) <= 200 and loaded.pad_token_id == 0
    text = "Small left pleural effusion. No pneumothorax."
    ids = trained(text)["input_ids"]
    assert ids == loaded(text)["input_ids"] == auto(text)["input_ids"]
    assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id
    assert loaded.unk_token_id not in ids  # seen words are in the vocabulary
    assert loaded.decode(ids, skip_special_tokens=True) == text.lower()
    enc = encode_report(loaded, ["Small left pleural effusion.", "No pneumothorax."], max_length=32)
    assert enc.n_sentences == 2 and enc.n_words == 8


def test_train_wordpiece_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    train_wordpiece(REPORTS * 50, vocab_size=300, out_dir=tmp_path)
    assert time.perf_counter() - start < 1.0


def test_freezing_embeddings_and_first_layers():
    encoder = HFTextEncoder(tiny_bert(100, hidden=16, layers=3, heads=2), freeze_embeddings=True, freeze_layers=2)
    layers = encoder.model.encoder.layer
    assert all(not p.requires_grad for p in encoder.model.embeddings.parameters())
    assert all(not p.requires_grad for layer in layers[:2] for p in layer.parameters())
    assert all(p.requires_grad for p in layers[2].parameters())
    ids = torch.randint(5, 100, (2, 7))
    encoder(ids).global_emb.sum().backward()
    assert all(p.grad is None for p in layers[0].parameters())
    assert all(p.grad is not None for p in layers[2].parameters())
    with pytest.raises(ConfigError, match="freeze_layers"):
        HFTextEncoder(tiny_bert(100, hidden=16, layers=2, heads=2), freeze_layers=3)


def test_minilm_loads_from_the_shipped_package(minilm_tokenizer):
    encoder = HFTextEncoder("minilm", pooling="mean")
    # training mode like any fresh module (transformers loads in eval mode; Lightning would keep dropout off)
    assert all(m.training for m in encoder.modules())
    encoder.eval()
    assert encoder.out_dim == 384 and encoder.model.pooler is None
    sentences = ["The heart is normal in size.", "Heart size is normal.", "Large right pneumothorax."]
    batch = minilm_tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder(batch["input_ids"], batch["attention_mask"])
    assert out.global_emb.shape == (3, 384) and out.words.shape == (3, 0, 384)  # no indices given: no words
    emb = F.normalize(out.global_emb, dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # pretrained, not random: paraphrases are closer


def test_attention_pool_masks_and_weights():
    torch.manual_seed(0)
    pool = AttentionPool(8, heads=2)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pooled, weights = pool(x, mask)
    assert pooled.shape == (3, 8) and weights.shape == (3, 5)
    assert torch.allclose(weights[:2].sum(-1), torch.ones(2)) and (weights[~mask] == 0).all()
    assert torch.isfinite(pooled).all() and (weights[2] == 0).all()  # an empty row: zeros, not NaN
    x_changed = x.clone()
    x_changed[0, 3:] = 100.0  # masked inputs cannot change the result
    assert torch.allclose(pool(x_changed, mask)[0][0], pooled[0], atol=1e-6)
    mean_pool = AttentionPool(8, query="mean")
    assert mean_pool(x, mask)[1].shape == (3, 5)


def test_projection_heads():
    linear = ProjectionHead(16, 8)
    mlp = ProjectionHead(16, 8, kind="mlp", hidden_dim=32, norm="batch")
    x = torch.randn(4, 16)
    assert linear(x).shape == (4, 8) and mlp(x).shape == (4, 8)
    assert mlp(torch.randn(4, 5, 16)).shape == (4, 5, 8)  # locals: BatchNorm over every position
    assert torch.allclose(linear(x), linear.net[1](x))
    with pytest.raises(ConfigError):
        ProjectionHead(16, 8, kind="conv")


def _eager_cls_attention(model, input_ids, attention_mask):
    """The reference: transformers' own eager attention probabilities, last layer, [CLS] row, mean over heads."""
    import copy

    eager = copy.deepcopy(model).eval()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    return out.attentions[-1][:, :, 0].mean(dim=1)


@pytest.mark.parametrize("sum_last_layers", [1, 2])
def test_text_cls_attention_equals_eager_attention(wordpiece, minilm_tokenizer, sum_last_layers):
    tokenizer, _ = wordpiece
    batch = _batch(tokenizer, REPORTS)
    assert (batch["attention_mask"] == 0).any()  # premise: padding
    tiny = {"name": "tiny", "tiny": {"hidden": 32, "layers": 3, "heads": 4}, "sum_last_layers": sum_last_layers}
    minilm = HFTextEncoder("minilm", sum_last_layers=sum_last_layers).eval()
    reports = ["Small left pleural effusion.", "No pneumothorax or focal consolidation is seen today."]
    mini = minilm_tokenizer(reports, padding=True, return_tensors="pt")
    assert (mini["attention_mask"] == 0).any()
    cases = [
        (build_text_encoder(tiny, vocab_size=len(tokenizer)).eval(), batch["input_ids"], batch["attention_mask"]),
        (minilm, mini["input_ids"], mini["attention_mask"]),
    ]
    for encoder, ids, mask in cases:
        want = _eager_cls_attention(encoder.model, ids, mask)
        with torch.no_grad():
            out = encoder(ids, mask, cls_attention=True)
            plain = encoder(ids, mask)
        assert plain.cls_attention is None  # only filled when asked
        torch.testing.assert_close(out.tokens, plain.tokens)  # asking changes nothing else
        assert out.cls_attention.shape == ids.shape and out.cls_attention.dtype == torch.float32
        torch.testing.assert_close(out.cls_attention, want, atol=1e-6, rtol=1e-5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            low = encoder(ids, mask, cls_attention=True).cls_attention
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, want, atol=1e-2, rtol=0)


def test_text_cls_attention_rows_sum_to_one_over_real_tokens(wordpiece):
    tokenizer, _ = wordpiece
    batch = _batch(tokenizer, REPORTS)
    encoder = build_text_encoder({"name": "tiny", "tiny": {"hidden": 32}}, vocab_size=len(tokenizer))
    out = encoder(batch["input_ids"], batch["attention_mask"], cls_attention=True)  # training mode: dropout on
    weights, real = out.cls_attention, batch["attention_mask"].bool()
    assert (~real).any() and torch.all(weights[~real] == 0)
    assert torch.all(weights[real] > 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(weights)))
    weights[:, 1].sum().backward()  # differentiable: callers that want fixed weights detach
    grad = encoder.model.encoder.layer[-1].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
