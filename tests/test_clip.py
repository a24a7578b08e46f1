"""CLIP / ConVIRT end to end: configs, learning on simulated data, 3D volumes, export + load, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radalign.config import find_config, load_config
from tests.helpers import tiny_config


def tiny_clip(manifest, **overrides):
    settings = {
        "loader.batch_size": 16,
        "model.text.freeze_layers": 5,
        "trainer.checkpoint_every_n_steps": 1000,
        "trainer.log_every_n_steps": 1,
        "trainer.max_steps": 50,
    }
    return tiny_config("clip", manifest, **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(simulated_manifest, tmp_path_factory):
    """CLIP-tiny before and after 50 steps on the simulated pairs (shared by the tests below)."""
    import copy

    from radalign.data.datamodule import RadDataModule, build_transform
    from radalign.demo import evaluate
    from radalign.methods.registry import build_method
    from radalign.training.run import pretrain

    config = tiny_clip(simulated_manifest)
    torch.manual_seed(0)
    data = RadDataModule(config.loader)
    data.setup("fit")
    # the training pairs without augmentation: 50 steps on 32 pairs is memorisation-sized, the point is learning
    train = copy.copy(data.datasets["train"])
    train.image_transform = build_transform(config.loader, train=False)
    train.sentence_augment = None
    untrained = build_method(config, tokenizer=data.tokenizer)
    before = evaluate(untrained, data.tokenizer, train, config.loader.max_length)
    out = tmp_path_factory.mktemp("clip")
    result = pretrain(config, out)
    return {"config": config, "data": data, "train": train, "before": before, "result": result, "out": out}


def test_fifty_steps_lower_the_loss_and_beat_the_untrained_model(trained):
    import pandas as pd

    from radalign.demo import evaluate
    from radalign.inference import load

    metrics = pd.read_csv(trained["out"] / "logs" / "version_0" / "metrics.csv").dropna(subset=["train/loss"])
    losses = metrics["train/loss"].to_numpy()
    assert losses[-10:].mean() < 0.8 * losses[:5].mean()
    model = load(trained["result"].export)
    after = evaluate(model.method, model.tokenizer, trained["train"], 64)
    assert after.retrieval["i2t_R@1"] > trained["before"].retrieval["i2t_R@1"]
    assert after.retrieval["i2t_R@5"] > 0.4  # chance is 5 / 32
    assert after.mean_auroc > trained["before"].mean_auroc


def test_learnable_temperature_is_logged_and_stays_in_range(trained):
    import pandas as pd

    metrics = pd.read_csv(trained["out"] / "logs" / "version_0" / "metrics.csv")
    temperature = metrics["train/temperature"].dropna().to_numpy()
    assert len(temperature) > 10
    assert np.all((temperature >= 0.01 - 1e-6) & (temperature <= 1.0))
    assert not np.allclose(temperature, temperature[0])  # it is learned


def test_convirt_config_is_what_the_paper_says():
    from radalign.methods.builders import build_infonce

    config = load_config(find_config("convirt"))
    loss = build_infonce(config.objectives["global"])
    assert float(loss.temperature) == pytest.approx(0.1)
    assert tuple(loss.direction_weights) == (0.75, 0.25)
    assert not any(p.requires_grad for p in loss.parameters())
    assert config.loader.text_one_sentence and config.model.projection == "mlp"
    clip = build_infonce(load_config(find_config("clip")).objectives["global"])
    assert float(clip.temperature.detach()) == pytest.approx(0.07) and any(p.requires_grad for p in clip.parameters())


def test_clip_trains_on_ct_volume_report_pairs(tmp_path):
    from radalign.data.simulate.generate import SimulationConfig, simulate
    from radalign.training.run import pretrain

    manifest = simulate(
        SimulationConfig(n=8, seed=2, size=32, with_3d=True, volume_spacing_mm=8.0, workers=1), tmp_path / "sim",
        progress=False,
    )  # fmt: skip
    config = load_config(
        find_config("clip-tiny"),
        {
            "model.image.name": "resnet10_3d",
            "loader.manifest": str(manifest),
            "loader.modality": "ct",
            "loader.volume_size": [32, 32, 32],
            "loader.volume_spacing_mm": [8.0, 8.0, 8.0],
            "loader.batch_size": 4,
            "loader.max_length": 48,
            "model.text.freeze_layers": 6,
            "trainer.max_steps": 2,
            "trainer.progress": False,
        },
    )
    import lightning as L

    class Watch(L.Callback):
        def __init__(self):
            self.shapes = []

        def on_train_start(self, trainer, module):
            self.initial = {k: v.clone() for k, v in module.method.image_encoder.state_dict().items()}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.shapes.append((tuple(batch["image"].shape), batch["modality"]))

        def on_train_end(self, trainer, module):
            self.method = module.method

    watch = Watch()
    result = pretrain(config, tmp_path / "run", callbacks=[watch])
    assert result.steps == 2
    assert all(shape[1:] == (1, 32, 32, 32) and set(modality) == {"ct"} for shape, modality in watch.shapes)
    trained = watch.method.eval().image_encoder.state_dict()
    moved = [k for k, v in watch.initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert len(moved) > len(watch.initial) // 2  # the 3D encoder itself learned, not only the heads
    from radalign.inference import load

    model = load(result.export)
    volumes = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = watch.method.encode_images(volumes)
    torch.testing.assert_close(model.encode_images(volumes), expected, rtol=0, atol=1e-6)


def test_pretrain_cli_overrides_and_rejects_unknown_keys(simulated_manifest, tmp_path, capsys):
    from radalign.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--config", str(find_config("clip-tiny")), "--data", str(simulated_manifest),
              "--out", str(tmp_path / "x"), "--optim.lrr", "1"])  # fmt: skip
    assert exit_.value.code != 0 and "optim.lrr" in capsys.readouterr().err
    main(["pretrain", "--config", str(find_config("clip-tiny")), "--data", str(simulated_manifest),
          "--out", str(tmp_path / "run"), "--max_steps", "2", "--loader.image_size", "32", "--loader.batch_size", "4",
          "--model.text.freeze_layers", "6", "--trainer.progress", "false"])  # fmt: skip
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.loader.image_size == 32 and saved.trainer.max_steps == 2
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_tokenizer_train_cli_feeds_a_tiny_random_bert(simulated_manifest, tmp_path):
    from radalign.cli import main
    from radalign.data.tokenization import load_tokenizer

    main(["tokenizer", "train", "--data", str(simulated_manifest), "--out", str(tmp_path / "vocab"),
          "--vocab_size", "300"])  # fmt: skip
    tokenizer = load_tokenizer(str(tmp_path / "vocab"))
    assert 50 < len(tokenizer) <= 300
    assert tokenizer.tokenize("pneumothorax") != ["[UNK]"]  # a word of the simulated reports is in the vocabulary
    main(["pretrain", "--config", str(find_config("clip-tiny")), "--data", str(simulated_manifest),
          "--out", str(tmp_path / "run"), "--max-steps", "2", "--loader.image_size", "32", "--loader.batch_size", "4",
          "--model.text.name", "tiny", "--model.text.freeze_layers", "0", "--model.text.freeze_embeddings", "false",
          "--loader.tokenizer", str(tmp_path / "vocab"),
          "--trainer.progress", "false"])  # fmt: skip
    from radalign.inference import load

    model = load(tmp_path / "run" / "export")
    embed_dim = load_config(find_config("clip-tiny")).model.embed_dim
    assert model.encode_texts(["Small left pneumothorax."]).shape == (1, embed_dim)


def test_loading_an_export_needs_no_training_stack(tiny_export):
    import subprocess
    import sys

    code = (
        "import sys, torch, radalign\n"
        f"model = radalign.load({str(tiny_export)!r})\n"
        "assert model.encode_images(torch.rand(1, 1, 64, 64) * 4 - 2).shape[0] == 1\n"
        "print(sorted(m for m in ('lightning', 'lightning.pytorch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
