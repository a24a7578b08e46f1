"""Zero-shot and retrieval tasks against plain references; evaluate -> results.json + report; compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radalign.config import TaskSpec
from radalign.evaluation.retrieval import precision_at_k, ranks, recall_at_k
from radalign.evaluation.zero_shot import ensemble_prompts, prompt_set, score_images


def fake_encoder(dim=16):
    """Texts -> fixed random unit vectors (one per distinct text), so prompt maths can be checked by hand."""
    table = {}

    def encode(texts):
        rows = []
        for text in texts:
            if text not in table:
                g = torch.Generator().manual_seed(len(table) + 1)
                table[text] = F.normalize(torch.randn(dim, generator=g), dim=0)
            rows.append(table[text])
        return torch.stack(rows)

    return encode


def test_pair_scores_are_the_softmax_of_averaged_prompt_similarities():
    encode = fake_encoder()
    images = F.normalize(torch.randn(5, 16), dim=1)
    prompts = {"edema": (["a", "b"], ["c"]), "mass": (["d"], [])}
    scores = score_images(images, encode, prompts, temp=0.1)
    pos = F.normalize(encode(["a", "b"]).mean(0), dim=0)
    neg = encode(["c"])[0]
    for i in range(5):
        expected = torch.softmax(torch.stack([images[i] @ pos, images[i] @ neg]) / 0.1, dim=0)[0]
        assert scores[i, 0] == pytest.approx(float(expected), abs=1e-5)
        assert scores[i, 1] == pytest.approx(float(images[i] @ encode(["d"])[0]), abs=1e-5)  # no negatives: cosine


def test_prompt_sets():
    ensemble = ensemble_prompts("pleural_effusion", 5, seed=0)
    assert len(set(ensemble)) == 5 and ensemble == ensemble_prompts("pleural_effusion", 5, seed=0)
    assert all("effusion" in p for p in ensemble)
    single = prompt_set(["pleural_effusion"], {"prompts": "single", "template": "{name} is observed."})
    assert single["pleural_effusion"] == (["Pleural effusion is observed."], [])


def test_ranks_recall_and_precision_match_loops():
    torch.manual_seed(0)
    similarity = torch.randn(12, 12)
    rank = ranks(similarity)
    for i in range(12):
        assert rank[i] == sum(1 for j in range(12) if similarity[i, j] > similarity[i, i])
    images, texts = F.normalize(torch.randn(12, 8), dim=1), F.normalize(torch.randn(12, 8), dim=1)
    recall = recall_at_k(images, texts, ks=(1, 5))
    sim = images @ texts.T
    loop = np.mean([sum(1 for j in range(12) if sim[j, i] > sim[i, i]) < 5 for i in range(12)])
    assert recall["t2i_R@5"] == pytest.approx(loop)
    query_class, candidate_class = np.array([0, 1, 0]), np.array([0, 0, 1, 1, 0])
    sim = torch.randn(3, 5)
    precision = precision_at_k(sim, query_class, candidate_class, 2)
    for q in range(3):
        top = sorted(range(5), key=lambda c: -float(sim[q, c]))[:2]
        assert precision[q] == pytest.approx(np.mean([candidate_class[c] == query_class[q] for c in top]))


def test_zero_shot_multiclass_metrics_equal_scikit_learn(eval_context):
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    from radalign.evaluation.zero_shot import run_zero_shot

    findings = ["cardiomegaly", "pleural_effusion", "consolidation"]
    result = run_zero_shot(eval_context, TaskSpec("zero_shot", params={"mode": "multiclass", "findings": findings}))
    embedded = eval_context.embedded("test", text=False)
    labels = embedded.labels[:, [embedded.vocabulary.index(f) for f in findings]]
    prompts = prompt_set(findings, {"prompts": "pairs"})
    scores = score_images(embedded.images, eval_context.model.encode_texts, prompts, 0.07)
    keep = (labels == 1).sum(1) == 1
    y, predicted = np.argmax(labels[keep] == 1, axis=1), scores[keep].argmax(1)
    assert result.metrics["accuracy"].value == pytest.approx(accuracy_score(y, predicted))
    assert result.metrics["macro_f1"].value == pytest.approx(
        f1_score(y, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert result.metrics["kappa"].value == pytest.approx(cohen_kappa_score(y, predicted, labels=[0, 1, 2]))
    assert (eval_context.out / result.figures[0]).is_file()


def _pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the share of (positive, negative) pairs ranked right, ties half: the definition, by loops."""
    positives = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    negatives = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    if not positives or not negatives:
        return float("nan")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_zero_shot_auroc_equals_a_pairwise_count_on_hand_made_scores(eval_context):
    """The task's headline AUROC against the definition, with the scores rebuilt from the prompts by hand."""
    from radalign.evaluation.zero_shot import run_zero_shot

    result = run_zero_shot(eval_context, TaskSpec("zero_shot"))
    embedded = eval_context.embedded("test", text=False)
    per_finding = {}
    for finding, sides in result.details["prompts"].items():
        pos, neg = (
            F.normalize(eval_context.model.encode_texts(sides[k]).mean(0), dim=0) for k in ("positive", "negative")
        )
        score = torch.sigmoid((embedded.images @ pos - embedded.images @ neg) / 0.07).numpy()  # the pair softmax
        per_finding[finding] = _pairwise_auroc(embedded.labels[:, embedded.vocabulary.index(finding)], score)
        assert result.metrics[f"auroc/{finding}"].value == pytest.approx(per_finding[finding], abs=1e-9), finding
    defined = [v for v in per_finding.values() if not np.isnan(v)]
    assert len(defined) >= 3
    assert result.metrics["auroc"].value == pytest.approx(np.mean(defined), abs=1e-9)


def test_retrieval_recall_in_results_equals_a_loop_over_queries(eval_context):
    from radalign.evaluation.retrieval import run_retrieval

    result = run_retrieval(eval_context, TaskSpec("retrieval", params={"ks": [1, 2, 5]}))
    test = eval_context.embedded("test", text=True)
    sim = (test.images @ test.texts.T).numpy()
    n = len(sim)
    for k in (1, 2, 5):
        i2t = np.mean([sum(sim[i, j] > sim[i, i] for j in range(n)) < k for i in range(n)])
        t2i = np.mean([sum(sim[j, i] > sim[i, i] for j in range(n)) < k for i in range(n)])
        assert result.metrics[f"i2t_R@{k}"].value == pytest.approx(i2t), k
        assert result.metrics[f"t2i_R@{k}"].value == pytest.approx(t2i), k
    assert 0 < result.metrics["i2t_R@5"].value < 1  # a case where an off-by-one in the rank shows


def test_evaluate_writes_results_and_report_and_compare_flags_other_protocols(eval_manifest, tiny_export, tmp_path):
    from radalign.evaluation.report import compare_table
    from radalign.evaluation.run import evaluate, load_results

    overrides = {"image_size": 64, "bootstrap": 20}
    first = evaluate(tiny_export, "quick", tmp_path / "a", data=eval_manifest, overrides=overrides,
                     tasks=["zero_shot", "retrieval"], progress=False)  # fmt: skip
    saved = load_results(tmp_path / "a")
    assert saved["tasks"].keys() == {"zero_shot", "retrieval"} == first["tasks"].keys()
    auroc = saved["tasks"]["zero_shot"]["metrics"]["auroc"]
    assert auroc["method"] == "bootstrap" and auroc["low"] <= auroc["value"] <= auroc["high"]
    assert saved["data"]["sha256"] and saved["model"]["weights_sha256"] and saved["protocol"]["name"] == "quick"
    report = (tmp_path / "a" / "report.md").read_text()
    for figure in saved["tasks"]["zero_shot"]["figures"] + saved["tasks"]["retrieval"]["figures"]:
        assert f"]({figure})" in report and (tmp_path / "a" / figure).is_file()

    # same protocol and data: one table; a changed setting: a separate table and a warning
    table, warnings = compare_table([saved, saved])
    assert table.count("### protocol") == 1 and not warnings
    other = json.loads(json.dumps(saved))
    other["protocol"]["bootstrap"] = 999
    table, warnings = compare_table([saved, other])
    assert table.count("### protocol") == 2 and "NOT compared" in warnings[0]


def test_a_failing_task_is_recorded_and_the_others_still_run(eval_manifest, tiny_export, tmp_path):
    from radalign.evaluation.run import evaluate

    results = evaluate(
        tiny_export, "quick", tmp_path / "r", data=eval_manifest, progress=False,
        overrides={"image_size": 64, "bootstrap": 0, "tasks.zero_shot.findings": ["no_such_finding"]},
        tasks=["zero_shot", "retrieval"],
    )  # fmt: skip
    assert "no_such_finding" in results["tasks"]["zero_shot"]["error"]
    retrieval = results["tasks"]["retrieval"]
    assert "error" not in retrieval and {"i2t_R@1", "t2i_R@10"} <= retrieval["metrics"].keys()


def test_evaluate_cli_names_an_unknown_task(eval_manifest, tiny_export, tmp_path, capsys):
    from radalign.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", str(tiny_export), "--data", str(eval_manifest), "--out", str(tmp_path / "x"),
              "--tasks", "[zero_shot, segmentatio]"])  # fmt: skip
    assert exit_.value.code == 2 and "no task 'segmentatio' (did you mean 'segmentation'?)" in capsys.readouterr().err


def test_a_3d_model_is_evaluated_on_volumes(tmp_path):
    from radalign.config import find_config, load_config
    from radalign.data.simulate.generate import SimulationConfig, simulate
    from radalign.evaluation.run import evaluate
    from radalign.training.run import pretrain

    manifest = simulate(
        SimulationConfig(n=16, seed=5, size=32, with_3d=True, volume_spacing_mm=8.0, workers=1,
                         splits=(0.5, 0.2, 0.3)), tmp_path / "sim", progress=False,
    )  # fmt: skip
    volume = {"loader.volume_size": [32, 32, 32], "loader.volume_spacing_mm": [8.0, 8.0, 8.0]}
    config = load_config(find_config("clip-tiny"), {
        "model.image.name": "resnet10_3d", "loader.manifest": str(manifest), "loader.modality": "ct",
        "loader.batch_size": 4, "loader.max_length": 48, "model.text.freeze_layers": 6, "trainer.max_steps": 1,
        "trainer.progress": False, **volume,
    })  # fmt: skip
    export = pretrain(config, tmp_path / "run").export
    results = evaluate(
        export, "quick-3d", tmp_path / "eval", data=manifest, tasks=["zero_shot", "retrieval"], progress=False,
        overrides={"volume_size": [32, 32, 32], "volume_spacing_mm": [8.0, 8.0, 8.0], "bootstrap": 10},
    )  # fmt: skip
    from radalign.data.manifest import load_manifest

    ct_test = [r for r in load_manifest(manifest).records if r.split == "test" and r.modality.value == "ct"]
    assert results["protocol"]["modality"] == "ct" and results["data"]["records"]["test"] == len(ct_test) >= 4
    # every CT test volume was embedded and paired with its report (radiographs of the same patients left out)
    assert f"{len(ct_test)} test pairs" in results["tasks"]["retrieval"]["notes"][0]
    assert "error" not in results["tasks"]["zero_shot"] and "auroc" in results["tasks"]["zero_shot"]["metrics"]


def test_a_methods_local_score_is_added_to_the_global_one(eval_context, monkeypatch):
    from radalign.errors import ConfigError
    from radalign.evaluation.zero_shot import _local_scores

    findings = ["cardiomegaly", "edema"]
    prompts = prompt_set(findings, {"prompts": "pairs"})
    with pytest.raises(ConfigError, match="local_weight"):  # CLIP is global-only
        _local_scores(eval_context, prompts)

    def tokens_as_score(images, text):  # a "local score" that identifies each prompt: its token count
        return text["attention_mask"].sum(dim=1).float()[None].expand(len(images), -1)

    monkeypatch.setattr(eval_context.method, "local_similarity", tokens_as_score)
    local = _local_scores(eval_context, prompts)
    n_test = len(eval_context.embedded("test", text=False).ids)
    for finding, (positive, _) in prompts.items():
        count = eval_context.model.tokenize(list(positive))["attention_mask"].sum(dim=1).float().mean()
        assert local[finding][0].shape == (n_test,) and torch.allclose(local[finding][0], count.expand(n_test))
    images = eval_context.embedded("test", text=False).images
    plain = score_images(images, eval_context.model.encode_texts, prompts, 0.07)
    shifted = score_images(images, eval_context.model.encode_texts, prompts, 0.07, local=local, local_weight=0.01)
    # the pair softmax moves towards the side whose prompts got the larger local score
    for k, finding in enumerate(prompts):
        sign = np.sign(float(local[finding][0][0] - local[finding][1][0]))
        assert np.all(np.sign(shifted[:, k] - plain[:, k]) == sign)


def test_zero_shot_and_segmentation_fail_fast_without_labels_or_regions(eval_manifest, tiny_export, tmp_path):
    """No labels: zero-shot says so instead of printing n/a for every finding; no regions: segmentation says so
    instead of training a head on empty masks and reporting dice nan."""
    import pandas as pd

    from radalign.config import load_protocol
    from radalign.data.manifest import load_manifest
    from radalign.errors import DataError
    from radalign.evaluation.context import EvalContext
    from radalign.evaluation.segmentation import run_segmentation
    from radalign.evaluation.zero_shot import run_zero_shot
    from radalign.inference import load

    table = pd.read_csv(eval_manifest)
    bare = eval_manifest.with_name(f"bare-{tmp_path.name}.csv")  # beside the original: its paths are relative
    table.drop(columns=[c for c in table.columns if c.startswith("label_")] + ["regions"]).to_csv(bare, index=False)
    try:
        manifest = load_manifest(bare)
        protocol = load_protocol("quick", {"image_size": 64, "seeds": [0], "bootstrap": 0, "batch_size": 16})
        ctx = EvalContext(load(tiny_export), protocol, manifest.records, tmp_path, vocabulary=manifest.vocabulary)
        with pytest.raises(DataError, match=r"zero_shot: the test split has no 0/1 label for any of"):
            run_zero_shot(ctx, TaskSpec("zero_shot"))
        spec = TaskSpec("segmentation", params={"findings": ["pleural_effusion"], "epochs": 1})
        with pytest.raises(DataError, match=r"none of \['pleural_effusion'\] has a mask or box in the train split"):
            run_segmentation(ctx, spec)
    finally:
        bare.unlink()
