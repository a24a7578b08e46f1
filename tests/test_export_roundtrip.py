"""Every built-in method: ``radalign.load`` of its export embeds images and texts exactly as the trained model did,
in eval mode (a loaded model left in train mode would differ by dropout and batch statistics)."""

from __future__ import annotations

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
    from radalign.training.config import find_config, load_config
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
