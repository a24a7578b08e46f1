"""Several sources in one run: weighted batches (proportions, determinism, exact resume, DDP shares), 2D and 3D
in separate batches of one step, image-label samples beside image-report ones, and the start-up refusals."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from torch import nn

from radalign.config import PretrainConfig, from_dict
from radalign.data.dataset import Collate
from radalign.data.multisource import WeightedSourceSampler
from radalign.errors import ConfigError
from radalign.methods.base import Method
from radalign.methods.registry import METHODS, register


def _sampler(**kwargs) -> WeightedSourceSampler:
    settings = {"sizes": [50, 200], "weights": [3.0, 1.0], "groups": ["xray", "xray"], "batch_sizes": {"xray": 16},
                "seed": 4} | kwargs  # fmt: skip
    return WeightedSourceSampler(**settings)


def _source_of(index: int, sampler: WeightedSourceSampler) -> int:
    return max(i for i, start in enumerate(sampler.starts) if index >= start)


def test_sources_are_drawn_by_weight_within_binomial_tolerance():
    sampler = _sampler()
    batches = [b for epoch in range(8) for b in (sampler.set_epoch(epoch), list(sampler))[1]]
    counts = Counter(_source_of(i, sampler) for batch in batches for i in batch)
    n = sum(counts.values())
    assert n == 16 * len(batches) and len(batches) == 8 * len(sampler)
    share, expected = counts[0] / n, 0.75
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n), share


def test_no_item_of_a_source_repeats_before_the_source_is_used_up():
    sampler = _sampler()
    seen: dict[int, list[int]] = {0: [], 1: []}
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for i in batch:
                seen[_source_of(i, sampler)].append(i)
    for source, size in enumerate(sampler.sizes):
        for cycle in range(len(seen[source]) // size):
            chunk = seen[source][cycle * size : (cycle + 1) * size]
            assert sorted(chunk) == list(range(sampler.starts[source], sampler.starts[source] + size))


def test_no_batch_holds_an_item_twice_across_a_reshuffle():
    sampler = _sampler(sizes=[20, 200], weights=[9.0, 1.0], batch_sizes={"xray": 8})  # source 0 reshuffles often
    batches = [b for epoch in range(30) for b in (sampler.set_epoch(epoch), list(sampler))[1]]
    assert all(len(set(b)) == len(b) for b in batches)
    fresh = _sampler(sizes=[20, 200], weights=[9.0, 1.0], batch_sizes={"xray": 8})
    fresh.set_epoch(29)
    assert list(fresh) == batches[-len(fresh) :]  # each pass depends on the one before: still a function of seed


def test_the_stream_is_a_function_of_the_seed():
    assert list(_sampler()) == list(_sampler())
    assert list(_sampler()) != list(_sampler(seed=5))
    with_seeds = list(_sampler(per_item_seeds=True))
    assert [[i for i, _ in batch] for batch in with_seeds] == list(_sampler())
    assert len({s for batch in with_seeds for _, s in batch}) == sum(len(b) for b in with_seeds)


@pytest.mark.parametrize("fresh", [False, True])
def test_a_resume_in_the_middle_of_an_epoch_continues_the_stream_exactly(fresh):
    straight = _sampler()
    straight.set_epoch(2)
    expected = list(straight)
    resumed = _sampler() if fresh else straight  # a new process, or one that has iterated before
    resumed.resume(epoch=2, handed_out=3, batch_size=16, num_replicas=1)
    assert list(resumed) == expected[3:]


def test_processes_share_each_global_batch_without_overlap():
    one = list(_sampler(batch_sizes={"xray": 16}))
    ranks = [list(_sampler(batch_sizes={"xray": 8}, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for whole, first, second in zip(one, *ranks, strict=True):
        assert first + second == whole and not set(first) & set(second)


def test_two_modalities_give_each_step_both_or_alternate():
    settings = {"sizes": [30, 10], "weights": [1.0, 1.0], "groups": ["xray", "ct"],
                "batch_sizes": {"xray": 4, "ct": 2}}  # fmt: skip
    both = list(_sampler(**settings))
    assert all(sum(i < 30 for i in b) == 4 and sum(i >= 30 for i in b) == 2 for b in both)
    alternate = list(_sampler(**settings, mix="alternate"))
    kinds = [{"xray" if i < 30 else "ct" for i in b} for b in alternate]
    assert kinds[:4] == [{"xray"}, {"ct"}, {"xray"}, {"ct"}]
    assert [len(b) for b in alternate[:2]] == [4, 2]


def _item(modality: str, report: bool, dims: int = 2) -> dict:
    item = {"id": f"{modality}{report}", "image": torch.zeros((1,) + (4,) * dims),
            "labels": torch.tensor([1.0, math.nan]), "modality": modality, "view": "", "source": "s",
            "has_report": report}  # fmt: skip
    if report:
        item |= {"input_ids": torch.tensor([101, 7, 102]), "token_sentence": torch.tensor([-1, 0, -1]),
                 "token_word": torch.tensor([-1, 0, -1]), "sentences": ["x."]}  # fmt: skip
    return item


def test_a_batch_mixing_reports_and_labels_marks_which_is_which():
    batch = Collate(pad_token_id=0)([_item("xray", True), _item("xray", False)])
    assert batch["has_report"].tolist() == [True, False]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert batch["input_ids"][1].tolist() == [0, 0, 0] and batch["token_sentence"][1].tolist() == [-1, -1, -1]
    assert batch["label_mask"].tolist() == [[True, False], [True, False]]
    assert batch["batch_modality"] == "xray"


def test_a_batch_of_2d_and_3d_items_becomes_one_part_per_modality():
    batch = Collate()([_item("xray", True), _item("ct", True, dims=3), _item("xray", True)])
    assert batch["batch_size"] == 3 and [p["batch_modality"] for p in batch["parts"]] == ["xray", "ct"]
    assert batch["parts"][0]["image"].shape == (2, 1, 4, 4) and batch["parts"][1]["image"].shape == (1, 1, 4, 4, 4)


# -- whole runs on simulated data ------------------------------------------------------------------------------
class TwoDimToy(Method):
    """Pools 2D images and 3D volumes alike; records which kinds and how many report-less samples it saw."""

    name = "two_dim_toy"
    objective_names = ("fit",)
    label_only_samples = True
    seen: ClassVar[Counter] = Counter()

    def __init__(self, config, tokenizer=None, *, for_inference=False):
        super().__init__(config, tokenizer, for_inference=for_inference)
        self.head = nn.Linear(1, 4)

    def modalities(self):
        return {"xray", "ct"}

    def losses(self, batch):
        if self.training:  # validation batches do not count
            TwoDimToy.seen[batch["batch_modality"]] += batch["batch_size"]
            TwoDimToy.seen["without_report"] += int((~batch["has_report"]).sum())
        pooled = batch["image"].flatten(1).mean(dim=1, keepdim=True)
        target = torch.nan_to_num(batch["labels"][:, :4], nan=0.0)
        return {"fit": ((self.head(pooled) - target) ** 2).mean()}


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """A paired 2D + 3D simulated archive and an image-label one from another seed (as CheXpert to MIMIC-CXR)."""
    from radalign.data.simulate.generate import SimulationConfig, simulate

    out = tmp_path_factory.mktemp("sources")
    paired = simulate(SimulationConfig(n=10, seed=2, size=32, with_3d=True, volume_spacing_mm=8.0, workers=1),
                      out / "paired", progress=False)  # fmt: skip
    labels = simulate(SimulationConfig(n=10, seed=3, size=32, reports=False, workers=1), out / "labels",
                      progress=False)  # fmt: skip
    return paired, labels


@pytest.fixture
def toy_registered():
    register("two_dim_toy")(TwoDimToy)
    TwoDimToy.seen = Counter()
    yield
    METHODS.pop("two_dim_toy", None)


def _config(sources: list[dict], method: str = "two_dim_toy", steps: int = 6) -> PretrainConfig:
    return from_dict(PretrainConfig, {
        "method": method, "objectives": {"fit": {}} if method == "two_dim_toy" else {}, "optim": {"lr": 1e-2},
        "loader": {"sources": sources, "tokenizer": "minilm", "image_size": 32, "batch_size": 4, "preset": "none",
                   "volume_size": [8, 8, 8], "volume_spacing_mm": [8.0, 8.0, 8.0]},
        "trainer": {"max_steps": steps, "progress": False, "checkpoint_every_n_steps": 3, "log_every_n_steps": 1},
    })  # fmt: skip


def test_the_simulator_writes_an_image_label_source(two_sources):
    import pandas as pd

    frame = pd.read_csv(two_sources[1])
    assert "report" not in frame.columns and any(c.startswith("label_") for c in frame.columns)


def test_a_run_mixes_2d_3d_and_label_only_sources_and_resumes_exactly(two_sources, toy_registered, tmp_path):
    from safetensors.torch import load_file

    from radalign.training.run import pretrain

    paired, labels = two_sources
    sources = [{"manifest": str(paired), "name": "paired", "weight": 1.0},
               {"manifest": str(labels), "name": "labels", "weight": 1.0, "require_report": False},
               {"manifest": str(paired), "name": "ct", "modality": "ct", "batch_size": 2}]  # fmt: skip
    straight = pretrain(_config(sources), tmp_path / "straight")
    assert TwoDimToy.seen["xray"] == 6 * 4 and TwoDimToy.seen["ct"] == 6 * 2  # every step: one batch of each
    assert 0 < TwoDimToy.seen["without_report"] < 6 * 4

    class Killed(Exception):
        pass

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step == 3:
                raise Killed

    with pytest.raises(Killed):
        pretrain(_config(sources), tmp_path / "resumed", callbacks=[Kill()])
    resumed = pretrain(_config(sources), tmp_path / "resumed")
    a, b = (load_file(r.export / "model.safetensors") for r in (straight, resumed))
    assert resumed.steps == 6 and all(torch.equal(a[k], b[k]) for k in a)
    # samples seen per source are logged, and continue across the resume: 6 steps x (4 2D + 2 CT)
    seen = {k: v for k, v in resumed.metrics.items() if k.startswith("data/seen/")}
    assert seen.keys() == {"data/seen/paired", "data/seen/labels", "data/seen/ct"} and seen["data/seen/ct"] == 12
    assert seen["data/seen/paired"] + seen["data/seen/labels"] == 24


def test_a_method_that_needs_reports_refuses_a_label_only_source_by_name(two_sources, tmp_path):
    from radalign.training.run import pretrain

    paired, labels = two_sources
    sources = [{"manifest": str(paired), "name": "paired"},
               {"manifest": str(labels), "name": "chexpert-like", "require_report": False}]  # fmt: skip
    config = _config(sources, method="clip")
    config.model.text.name = "tiny"
    with pytest.raises(ConfigError, match=r"source 'chexpert-like' has \d+ training records without a report"):
        pretrain(config, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written: a corrected config may use the folder


def test_a_2d_method_refuses_a_ct_source_by_name(two_sources, tmp_path):
    from radalign.training.run import pretrain

    sources = [{"manifest": str(two_sources[0]), "name": "xr"},
               {"manifest": str(two_sources[0]), "name": "volumes", "modality": "ct"}]  # fmt: skip
    config = _config(sources, method="clip")
    with pytest.raises(ConfigError, match="source 'volumes' holds ct images"):
        pretrain(config, tmp_path / "run")


def test_source_settings_are_checked():
    with pytest.raises(ConfigError, match="weights must be > 0"):
        _config([{"manifest": "a.csv", "weight": 0}])
    with pytest.raises(ConfigError, match="two sources are named 'a'"):
        _config([{"manifest": "x/a.csv"}, {"manifest": "y/a.csv"}])
    with pytest.raises(ConfigError, match="both set"):
        from_dict(PretrainConfig, {"loader": {"manifest": "m.csv", "sources": [{"manifest": "a.csv"}]}})


def test_the_documented_source_configs_are_valid():
    import re

    import yaml

    from radalign.config import DataConfig

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("## Several sources in one run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        config = from_dict(DataConfig, yaml.safe_load(block)["loader"])
        assert len(config.source_list()) == 2 and config.source_list()[1].manifest != config.source_list()[0].manifest
