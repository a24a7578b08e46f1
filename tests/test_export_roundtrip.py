"""Every built-in method: ``radalign.load`` of its export embeds images and texts exactly as the trained model did,
in eval mode (a loaded model left in train mode would differ by dropout and batch statistics)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

CONFIGS = ["clip-tiny", "convirt-tiny", "gloria-tiny", "lovt-tiny", "mgca-tiny", "prior-tiny"]
TEXTS = ["Small left pleural effusion.", "No pneumothorax. Heart size is normal.", "Mild cardiomegaly."]


class _KeepTrained(L.Callback):
    method = None

    def on_train_end(self, trainer, module):
        self.method = module.method


@pytest.mark.parametrize("name", CONFIGS)
def test_a_loaded_export_embeds_like_the_trained_model(simulated_manifest, tmp_path, name):
    import radalign
    from radalign.config import find_config, load_config
    from radalign.training.run import pretrain

    overrides = {"loader.manifest": str(simulated_manifest), "loader.image_size": 64, "loader.batch_size": 4,
                 "loader.max_length": 48, "trainer.max_steps": 2, "trainer.progress": False}  # fmt: skip
    kept = _KeepTrained()
    result = pretrain(load_config(find_config(name), overrides), tmp_path / name, callbacks=[kept])
    trained = kept.method.eval()
    loaded = radalign.load(result.export)
    assert not loaded.method.training and not any(m.training for m in loaded.method.modules())

    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected_images = trained.encode_images(images)
        tokens = {k: v for k, v in loaded.tokenize(TEXTS).items() if k != "n_sentences"}
        expected_texts = trained.encode_texts(tokens)
    torch.testing.assert_close(loaded.encode_images(images), expected_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.encode_texts(TEXTS), expected_texts, rtol=0, atol=1e-6)


def test_load_error_paths_name_the_problem(tiny_export, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    import radalign
    from radalign.errors import ConfigError

    with pytest.raises(ConfigError, match=r"is not a radalign export: expected config\.json and model\.safetensors"):
        radalign.load(tmp_path)
    export = Path(shutil.copytree(tiny_export, tmp_path / "export"))
    state = load_file(tiny_export / "model.safetensors")
    save_file({**state, "stray.weight": torch.zeros(2)}, export / "model.safetensors")
    unexpected = r"weights do not match the config \(missing \[\], unexpected \['stray\.weight'\]"
    with pytest.raises(ConfigError, match=unexpected):
        radalign.load(export)
    dropped = next(k for k in state if k.endswith(".weight"))  # BatchNorm tolerates a missing step count
    save_file({k: v for k, v in state.items() if k != dropped}, export / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"missing \['{dropped}'\]"):
        radalign.load(export)
    # an EMA teacher is training state: an export without its copies still loads (the live weights embed)
    save_file(state, export / "model.safetensors")
    payload = json.loads((export / "config.json").read_text())
    payload["config"]["ema"]["modules"] = ["image_head"]
    (export / "config.json").write_text(json.dumps(payload))
    assert radalign.load(export).encode_images(torch.randn(1, 1, 64, 64)).shape[0] == 1


def test_encode_images_refuses_input_that_would_embed_wrongly_and_prepares_files(tiny_export, eval_manifest):
    import radalign
    from radalign.config import load_protocol
    from radalign.data.manifest import load_manifest
    from radalign.errors import ConfigError
    from radalign.evaluation.context import EvalContext

    model = radalign.load(tiny_export)
    wrong = {
        "not str; model.prepare_images": str(eval_manifest),
        r"values in \[0, 1\]: untransformed": torch.rand(2, 1, 64, 64),
        "got torch.uint8 pixels": torch.zeros(2, 1, 64, 64, dtype=torch.uint8),
        r"add the batch dimension, images\[None\]": torch.randn(1, 64, 64),
        r"got shape \(2, 3, 64, 64\)": torch.randn(2, 3, 64, 64),
        r"values in \[0, 255\]: raw pixel values": torch.arange(2 * 64 * 64.0).reshape(2, 1, 64, 64) % 256,
    }
    for message, images in wrong.items():
        with pytest.raises(ConfigError, match=message):
            model.encode_images(images)

    # files -> prepare_images -> the same embeddings as the evaluation suite's loader at the training size
    records = load_manifest(eval_manifest).records
    test = [r for r in records if r.split == "test"][:3]
    prepared = model.prepare_images([r.image_path for r in test])
    assert prepared.shape == (3, 1, 64, 64) and prepared.min() < 0
    protocol = load_protocol("quick", {"image_size": 64, "batch_size": 3})
    ctx = EvalContext(model, protocol, test, Path("unused"), vocabulary=load_manifest(eval_manifest).vocabulary)
    torch.testing.assert_close(model.encode_images(prepared), ctx.embedded("test", text=False).images)
