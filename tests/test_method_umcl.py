"""UMCL: label-aware InfoNCE against loop references (positive sets, soft targets, a simulated 2-process gather),
its reduction to CLIP, the prompt learner (exact template start, gradients), labels -> text, and a two-source
run from the CLI to zero-shot with the learned prompts."""

from __future__ import annotations

import math

import pytest
import torch

from radalign.config import find_config, load_config
from radalign.errors import ConfigError
from radalign.methods.registry import build_method
from radalign.objectives.contrastive import label_positives, label_similarity_targets

NAN = float("nan")


@pytest.fixture(scope="module")
def umcl(minilm_tokenizer):
    config = load_config(find_config("umcl-tiny"))
    torch.manual_seed(0)
    return build_method(config, tokenizer=minilm_tokenizer).eval()


def _loop_loss(image, text, targets, tau, weights=(0.5, 0.5)):
    """-sum_k t_ik log softmax_k(s_ik / tau), averaged over rows, both directions: plain Python loops."""
    image = torch.nn.functional.normalize(image.double(), dim=-1)
    text = torch.nn.functional.normalize(text.double(), dim=-1)
    n = len(image)

    def direction(a, b):
        total = 0.0
        for i in range(n):
            logits = [float(a[i] @ b[j]) / tau for j in range(n)]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(x - top) for x in logits))
            total -= sum(float(targets[i][j]) * (logits[j] - log_z) for j in range(n))
        return total / n

    return weights[0] * direction(image, text) + weights[1] * direction(text, image)


def _row_targets(positive_sets):
    return [[(1.0 / len(p)) if j in p else 0.0 for j in range(len(positive_sets))] for p in positive_sets]


def test_label_set_positives_follow_their_definition():
    labels = torch.tensor([[1, 0, NAN], [1, 0, 0], [1, 1, 0], [NAN, NAN, NAN], [1, NAN, 1]])
    got = label_positives(labels, unknown="ignore")
    for i in range(5):
        for j in range(5):
            a, b = labels[i], labels[j]
            both = [k for k in range(3) if not (math.isnan(a[k]) or math.isnan(b[k]))]
            expected = bool(both) and all(a[k] == b[k] for k in both)
            assert bool(got[i, j]) == expected, (i, j)


def test_soft_targets_are_the_softmax_of_label_dot_products():
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [NAN, NAN, NAN]])
    got = label_similarity_targets(labels)
    for i in range(3):
        dots = [sum(float(labels[i, k]) * float(labels[j, k]) for k in range(3)) for j in range(3)]
        z = sum(math.exp(d) for d in dots)  # over the labelled columns
        for j in range(3):
            assert math.isclose(float(got[i, j]), math.exp(dots[j]) / z, rel_tol=1e-6)
        assert float(got[i, 3]) == 0.0  # a sample without labels is no one's target
    assert got[3].abs().sum() == 0  # ... and its own row falls back to itself (contrastive_targets)


def _batch(umcl, labels, vocabulary, texts=None):
    tokens = umcl.tokenize(texts or [f"report {i}." for i in range(len(labels))])
    torch.manual_seed(1)
    return {"image": torch.randn(len(labels), 1, 64, 64), "labels": torch.tensor(labels, dtype=torch.float32),
            "vocabulary": tuple(vocabulary), "has_report": torch.ones(len(labels), dtype=torch.bool),
            "sentences": [[t] for t in (texts or [f"report {i}." for i in range(len(labels))])], **tokens}  # fmt: skip


def test_umcl_loss_equals_the_loop_reference_with_label_positives(umcl):
    vocabulary = ["cardiomegaly", "pleural_effusion"]
    labels = [[1, 0], [1, 0], [0, 1], [0, 0], [1, -1], [NAN, NAN]]
    batch = _batch(umcl, labels, vocabulary)
    with torch.no_grad():
        loss = umcl.losses(batch)["global"]
        image, text = umcl.encode_images(batch["image"]), umcl.encode_texts({k: batch[k] for k in (
            "input_ids", "attention_mask", "token_sentence", "token_word")})  # fmt: skip
    # policies: uncertain ignore (-1 unknown), missing negative, no_finding derived; the last row is unlabelled
    # (its report "report 5." names nothing the labeler knows, so it stays so) and only its own positive
    sets = [{0, 1, 4}, {0, 1, 4}, {2}, {3}, {0, 1, 4}, {5}]
    tau = float(umcl.contrast.temperature)
    assert float(loss) == pytest.approx(_loop_loss(image, text, _row_targets(sets), tau), rel=1e-5)


def test_with_all_distinct_labels_umcl_is_clip_exactly(umcl):
    from radalign.objectives.contrastive import info_nce

    batch = _batch(umcl, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], ["cardiomegaly", "edema", "mass"])
    with torch.no_grad():
        loss = umcl.losses(batch)["global"]
        image, text = umcl.encode_images(batch["image"]), umcl.encode_texts(batch)
        plain = info_nce(image, text, umcl.contrast.temperature)
    assert torch.equal(loss, plain)


def test_labels_gathered_from_another_process_give_the_same_loss_as_one_process(umcl, monkeypatch):
    """Two simulated processes (rows 0-2 and 3-5): each sees its own rows against the gathered batch, with the
    labels gathered in the same order; their mean loss equals one process's loss over all six rows."""
    import radalign.methods.umcl as umcl_module
    import radalign.objectives.contrastive as contrastive

    labels = [[1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [1, 1]]
    batch = _batch(umcl, labels, ["cardiomegaly", "pleural_effusion"])
    with torch.no_grad():
        whole = float(umcl.losses(batch)["global"])
        full_labels = umcl.class_labels(batch)
        image_all = umcl.encode_images(batch["image"])
        text_all = umcl.encode_texts(batch)
    losses = []
    both_all = torch.cat([image_all, text_all], dim=1)
    for rank, rows in enumerate((slice(0, 3), slice(3, 6))):

        def fake_gather(x, with_grad=True, rank=rank):
            full = full_labels if x.shape[1] == full_labels.shape[1] else both_all
            return full, 3 * rank

        monkeypatch.setattr(umcl_module, "gather_rows", fake_gather)
        monkeypatch.setattr(contrastive, "gather_rows", fake_gather)
        part = {k: (v[rows] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
        with torch.no_grad():
            losses.append(float(umcl.losses(part)["global"]))
    assert sum(losses) / 2 == pytest.approx(whole, rel=1e-5)


def test_a_label_only_sample_gets_a_text_from_its_labels(umcl):
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    umcl_classes = umcl.classes
    vocabulary = ["cardiomegaly", "edema", "pleural_effusion", "no_finding"]
    full = torch.full((2, len(umcl_classes)), 0.0)
    for k, name in enumerate(vocabulary):
        full[:, umcl_classes.index(name)] = labels[:, k]
    texts, named = umcl.label_texts(full)
    assert texts == ["cardiomegaly, pleural effusion", "no acute abnormality"]
    assert named == [["cardiomegaly", "pleural_effusion"], ["no_finding"]]


def test_the_prompt_learner_starts_exactly_at_its_template(umcl):
    learned = umcl.encode_learned_prompts(["pleural effusion", "no pneumothorax"])
    written = umcl.encode_texts(umcl.tokenize(["findings consistent with pleural effusion",
                                                "findings consistent with no pneumothorax"]))  # fmt: skip
    assert torch.equal(learned, written)
    assert umcl.prompt_learner.n_ctx == 3  # the template's tokens


def test_gradients_reach_the_context_vectors_and_not_frozen_parts(minilm_tokenizer):
    config = load_config(find_config("umcl-tiny"))
    method = build_method(config, tokenizer=minilm_tokenizer)
    labels = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]])
    batch = {"image": torch.randn(4, 1, 64, 64), "labels": labels, "vocabulary": ("cardiomegaly", "edema"),
             "has_report": torch.zeros(4, dtype=torch.bool)}  # fmt: skip
    method.losses(batch)["global"].backward()
    assert method.prompt_learner.ctx.grad is not None and method.prompt_learner.ctx.grad.abs().sum() > 0
    embeddings = method.text_encoder.model.get_input_embeddings().weight
    assert not embeddings.requires_grad and embeddings.grad is None  # frozen in umcl-tiny
    assert all(p.grad is not None for p in method.image_head.parameters())


def test_class_specific_contexts_average_over_the_named_findings(minilm_tokenizer):
    from radalign.models.prompts import PromptLearner
    from radalign.models.text import load_text_model

    model = load_text_model("minilm")
    learner = PromptLearner(model.get_input_embeddings(), minilm_tokenizer, init=None, n_ctx=4,
                            classes=["a", "b", "no_finding"], class_specific=True)  # fmt: skip
    assert learner.ctx.shape == (3, 4, 384) and 0.01 < float(learner.ctx.std()) < 0.03
    ctx = learner.ctx
    assert torch.equal(learner.context_for(["a", "b"]), ctx[[0, 1]].mean(dim=0))
    assert torch.equal(learner.context_for([]), ctx[2])  # "no finding" has its own
    with pytest.raises(ConfigError, match="class list"):
        PromptLearner(model.get_input_embeddings(), minilm_tokenizer, class_specific=True)


def test_bad_options_are_refused(minilm_tokenizer):
    config = load_config(find_config("umcl-tiny"), {"model.options.positives": "labels"})
    with pytest.raises(ConfigError, match="positives must be one of"):
        build_method(config, tokenizer=minilm_tokenizer)
    config = load_config(find_config("umcl-tiny"), {"model.options.uncertain": {"edema": "ones"}})
    with pytest.raises(ConfigError, match="not one of"):
        build_method(config, tokenizer=minilm_tokenizer)


def test_a_two_source_run_from_the_cli_exports_and_zero_shots_with_learned_prompts(tmp_path):
    import json

    import yaml

    from radalign.cli import main
    from radalign.data.simulate.generate import SimulationConfig, simulate

    paired = simulate(SimulationConfig(n=12, seed=2, size=32, workers=1), tmp_path / "paired", progress=False)
    labels = simulate(SimulationConfig(n=12, seed=3, size=32, reports=False, workers=1), tmp_path / "labels",
                      progress=False)  # fmt: skip
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump({"loader": {"sources": [
        {"name": "paired", "manifest": str(paired), "weight": 1.0},
        {"name": "labels", "manifest": str(labels), "weight": 1.0, "require_report": False}],
        "image_size": 32, "batch_size": 6}}), encoding="utf-8")  # fmt: skip
    run = tmp_path / "run"
    main(["pretrain", "--config", "umcl-tiny", "--config", str(tmp_path / "sources.yaml"), "--out", str(run),
          "--max_steps", "3", "--trainer.progress", "false"])  # fmt: skip
    import radalign

    model = radalign.load(run / "export")
    assert model.encode_learned_prompts(["pleural effusion", "no pleural effusion"]).shape == (2, 128)
    main(["evaluate", "--model", str(run / "export"), "--data", str(paired), "--out", str(tmp_path / "eval"),
          "--tasks", "zero_shot", "--overrides", json.dumps({"tasks.zero_shot.prompts": "learned", "bootstrap": 0,
                                                            "image_size": 32})])  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    zero_shot = results["tasks"]["zero_shot"]
    assert zero_shot["details"]["prompts"]["pleural_effusion"] == {"positive": ["pleural effusion"],
                                                                   "negative": ["no pleural effusion"]}  # fmt: skip
    assert "auroc" in zero_shot["metrics"] and zero_shot["details"]["n_images"] > 0  # too few images for a value


def test_learned_prompts_are_refused_for_a_model_without_them(tiny_export):
    import radalign

    with pytest.raises(ConfigError, match="no learned prompts"):
        radalign.load(tiny_export).encode_learned_prompts(["pleural effusion"])
