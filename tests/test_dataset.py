"""Dataset, collate, data module, skipping of unreadable items, and the prepared image cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from radalign.data.cache import CacheSettings, PreparedCache, prepare_cache
from radalign.data.datamodule import DataConfig, RadDataModule, SkippedSamplesCallback
from radalign.data.dataset import Collate, RadDataset, Skipped
from radalign.data.manifest import load_manifest
from radalign.data.tokenization import NO_INDEX
from radalign.errors import ConfigError, DataError


def resize_to(size: int):
    def transform(tensor: torch.Tensor, spacing: tuple[float, ...]) -> torch.Tensor:
        return torch.nn.functional.interpolate(tensor[None], size=(size, size), mode="bilinear")[0]

    return transform


def test_items_carry_image_labels_and_token_indices(tiny_manifest, minilm_tokenizer):
    manifest = load_manifest(tiny_manifest)
    dataset = RadDataset(
        manifest.records, vocabulary=manifest.vocabulary, tokenizer=minilm_tokenizer, image_transform=resize_to(32)
    )
    item = dataset[2]
    assert item["id"] == "s2"
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert manifest.vocabulary == ("cardiomegaly", "pleural_effusion")
    assert item["labels"][0] == 1 and torch.isnan(item["labels"][1])
    # "Cardiomegaly. Mild pulmonary edema." + impression "Cardiomegaly. Edema." (list numbers removed)
    assert item["sentences"] == ["Cardiomegaly.", "Mild pulmonary edema.", "Cardiomegaly.", "Edema."]
    assert int(item["token_sentence"].max()) == 3


def test_collate_pads_and_sets_skipped_aside(tiny_manifest, minilm_tokenizer):
    manifest = load_manifest(tiny_manifest)
    dataset = RadDataset(manifest.records[:5], tokenizer=minilm_tokenizer, image_transform=resize_to(16))
    items = [dataset[i] for i in range(5)]
    assert isinstance(items[3], Skipped) and "3.png" in items[3].reason
    batch = Collate(pad_token_id=minilm_tokenizer.pad_token_id)(items)
    assert batch["batch_size"] == 4 and batch["id"] == ["s0", "s1", "s2", "s4"]
    assert batch["skipped"][0][0] == "s3"
    assert batch["image"].shape == (4, 1, 16, 16)
    lengths = batch["attention_mask"].sum(1)
    longest = int(lengths.max())
    assert batch["input_ids"].shape == (4, longest)
    for i, n in enumerate(lengths.tolist()):
        assert (batch["input_ids"][i, n:] == minilm_tokenizer.pad_token_id).all()
        assert (batch["token_sentence"][i, n:] == NO_INDEX).all()
    assert batch["n_sentences"].tolist() == [len(s) for s in batch["sentences"]]


def test_fail_mode_names_the_record(tiny_manifest):
    manifest = load_manifest(tiny_manifest)
    dataset = RadDataset(manifest.records, on_error="fail")
    with pytest.raises(DataError, match="record s3"):
        dataset[3]


def test_nan_pixels_are_a_counted_skip(tiny_manifest, monkeypatch):
    manifest = load_manifest(tiny_manifest)
    dataset = RadDataset(manifest.records)
    original = dataset.load_image

    def poisoned(record):
        image = original(record)
        image.array[0, 0] = np.nan
        return image

    monkeypatch.setattr(dataset, "load_image", poisoned)
    item = dataset[0]
    assert isinstance(item, Skipped) and "NaN" in item.reason


def test_require_report_skips_empty_reports(tmp_path):
    import pandas as pd

    from tests.conftest import write_png16

    write_png16(tmp_path / "a.png", 0)
    pd.DataFrame([{"id": "a", "image": "a.png", "modality": "xray", "report": "  "}]).to_csv(tmp_path / "m.csv")
    records = load_manifest(tmp_path / "m.csv").records
    item = RadDataset(records, require_report=True)[0]
    assert isinstance(item, Skipped) and "empty report" in item.reason


def test_datamodule_batches_are_reproducible_and_report_skips(tiny_manifest):
    config = DataConfig(manifest=tiny_manifest, image_size=32, batch_size=4, preset="convirt", seed=3)

    def first_epoch():
        torch.manual_seed(0)
        module = RadDataModule(config)
        module.setup("fit")
        return list(module.train_dataloader())

    one, two = first_epoch(), first_epoch()
    assert [b["id"] for b in one] == [b["id"] for b in two]
    assert torch.equal(one[0]["image"], two[0]["image"])
    assert one[0]["image"].shape[1:] == (1, 32, 32)
    skipped = [s for b in one for s in b["skipped"]]
    assert [s[0] for s in skipped] == ["s3"]


def test_skipped_callback_stops_a_run_that_skips_too_much():
    callback = SkippedSamplesCallback(max_fraction=0.2)

    class Module:
        def log(self, *args, **kwargs):
            self.logged = args

    class Trainer:
        current_epoch = 0

    callback.on_train_batch_start(Trainer(), Module(), {"skipped": [("a", "bad")], "batch_size": 9}, 0)
    callback.on_train_epoch_end(Trainer(), Module())  # 10% skipped: a warning, not an error
    assert callback.total_skipped == 1
    callback.on_train_batch_start(Trainer(), Module(), {"skipped": [("a", "x"), ("b", "y")], "batch_size": 2}, 0)
    with pytest.raises(DataError, match="max_skip_fraction"):
        callback.on_train_epoch_end(Trainer(), Module())


def test_datamodule_without_manifest_is_a_config_error():
    with pytest.raises(ConfigError, match="--data"):
        RadDataModule(DataConfig())


def test_a_cache_smaller_than_the_training_size_is_refused_not_upsampled(tiny_manifest, tmp_path):
    records = load_manifest(tiny_manifest).records
    prepare_cache(records, tmp_path / "cache", CacheSettings(size=24), workers=1, progress=False)
    config = DataConfig(manifest=tiny_manifest, cache_dir=tmp_path / "cache", image_size=32, tokenizer=None,
                        require_report=False, on_error="skip")  # fmt: skip
    with pytest.raises(ConfigError, match=r"resized to 24 px .* 32 px are asked for.*--size 32"):
        RadDataModule(config).setup("fit")
    RadDataModule(dataclasses.replace(config, image_size=24)).setup("fit")  # its own size is fine


def test_cache_is_reused_and_invalidated_when_the_source_changes(tiny_manifest, tmp_path):
    records = load_manifest(tiny_manifest).records
    cache_dir = tmp_path / "cache"
    first = prepare_cache(records, cache_dir, CacheSettings(size=24), workers=1, progress=False)
    assert first.written == 9 and list(first.failed) == ["s3#0"]
    second = prepare_cache(records, cache_dir, CacheSettings(size=24), workers=1, progress=False)
    assert second.written == 0 and second.reused == 9
    cache = PreparedCache(cache_dir)
    image = cache.get(records[0])
    assert image is not None and min(image.shape) == 24 and image.shape == (30, 24)  # aspect 80x64 kept
    from radalign.data.io import read_image

    original = read_image(records[0].image_path)
    assert image.spacing[0] == pytest.approx(original.spacing[0] * 80 / 30)
    # a source file changed after prepare: the stale entry is not served
    from tests.conftest import write_png16

    write_png16(records[0].image_path, seed=99)
    assert cache.get(records[0]) is None and cache.stale == 1


def test_dataset_reads_from_cache(tiny_manifest, tmp_path, monkeypatch):
    records = load_manifest(tiny_manifest).records
    prepare_cache(records, tmp_path / "c", CacheSettings(size=24), workers=1, progress=False)
    import radalign.data.io as io

    def no_decoding(path):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(io, "read_image", no_decoding)
    dataset = RadDataset(records, cache=PreparedCache(tmp_path / "c"))
    assert dataset[0]["image"].shape == (1, 30, 24)


def test_missing_cache_folder_is_explained(tmp_path: Path):
    with pytest.raises(DataError, match="radalign prepare"):
        PreparedCache(tmp_path)


def _records_with_ids(tiny_manifest: Path, ids: list[str]):
    """The first len(ids) records of the tiny manifest, renamed (each keeps its own image)."""
    from dataclasses import replace

    records = load_manifest(tiny_manifest).records
    return [replace(record, id=new_id) for record, new_id in zip(records, ids, strict=False)]


def test_cache_ids_that_sanitise_alike_keep_their_own_images(tiny_manifest, tmp_path):
    # MIMIC-style ids contain slashes; format 1 reduced all three to pat_1.0.npy and served one image to all
    records = _records_with_ids(tiny_manifest, ["pat/1", "pat_1", "pat 1"])
    report = prepare_cache(records, tmp_path / "c", CacheSettings(size=24), workers=1, progress=False)
    assert report.written == 3
    cache = PreparedCache(tmp_path / "c")
    assert len({entry["file"] for entry in cache.entries.values()}) == 3
    direct = [prepare_cache([r], tmp_path / f"alone{i}", CacheSettings(size=24), workers=1, progress=False)
              for i, r in enumerate(records)]  # fmt: skip
    assert all(d.written == 1 for d in direct)
    for i, record in enumerate(records):
        alone = PreparedCache(tmp_path / f"alone{i}").get(record)
        assert np.array_equal(cache.get(record).array, alone.array), record.id
    assert not np.array_equal(cache.get(records[0]).array, cache.get(records[1]).array)


def test_cache_serves_an_entry_only_to_its_record_and_never_damaged_pixels(tiny_manifest, tmp_path):
    import json

    records = _records_with_ids(tiny_manifest, ["a", "b"])
    prepare_cache(records, tmp_path / "c", CacheSettings(size=24), workers=1, progress=False)
    index = tmp_path / "c" / "index.json"
    payload = json.loads(index.read_text())
    # an index merged by hand: record a's entry now names b's file
    payload["entries"]["a#0"]["file"] = payload["entries"]["b#0"]["file"]
    index.write_text(json.dumps(payload))
    cache = PreparedCache(tmp_path / "c")
    assert cache.get(records[0]) is None and cache.damaged == 1
    assert cache.get(records[1]) is not None
    # one flipped byte in b's pixels: the checksum refuses the entry
    path = tmp_path / "c" / "images" / payload["entries"]["b#0"]["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cache.get(records[1]) is None and cache.damaged == 2
    # and the dataset decodes the source instead
    dataset = RadDataset(records, cache=cache)
    assert dataset[1]["image"].shape == (1, 80, 64)


def test_cache_of_an_older_format_is_rebuilt_and_its_files_removed(tiny_manifest, tmp_path):
    import json

    records = _records_with_ids(tiny_manifest, ["pat/1", "pat_1"])
    prepare_cache(records, tmp_path / "c", CacheSettings(size=24), workers=1, progress=False)
    index = tmp_path / "c" / "index.json"
    payload = json.loads(index.read_text())
    payload["version"] = 1
    index.write_text(json.dumps(payload))
    (tmp_path / "c" / "images" / "pat_1.0.npy").write_bytes(b"format 1")
    with pytest.raises(DataError, match="radalign prepare"):
        PreparedCache(tmp_path / "c")
    report = prepare_cache(records, tmp_path / "c", CacheSettings(size=24), workers=1, progress=False)
    assert report.written == 2 and report.reused == 0
    assert not (tmp_path / "c" / "images" / "pat_1.0.npy").exists()
    assert PreparedCache(tmp_path / "c").get(records[0]) is not None
