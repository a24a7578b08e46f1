"""Loading never runs code shipped with a model and never downloads (issue 14, defect 3)."""

from __future__ import annotations

import builtins
import json
import socket
from pathlib import Path

import pytest

from radalign.errors import ConfigError


@pytest.fixture
def yes_to_every_prompt(monkeypatch):
    # transformers asks "run the custom code? [y/N]" when trust_remote_code is left unset: a user who answers y
    monkeypatch.setattr(builtins, "input", lambda *args, **kwargs: "y")


@pytest.fixture
def no_network(monkeypatch):
    attempts: list[object] = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _plant_code(folder: Path, module: str, marker: Path) -> None:
    (folder / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n"
        "from transformers import BertTokenizerFast as EvilTokenizer\n"
    )


def test_a_tokenizer_folder_with_its_own_code_is_refused(minilm_tokenizer, tmp_path, yes_to_every_prompt):
    from radalign.data.tokenization import load_tokenizer

    folder, marker = tmp_path / "tokenizer", tmp_path / "code-ran"
    minilm_tokenizer.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _plant_code(folder, "tokenization_evil", marker)
    with pytest.raises(ConfigError, match="never runs code"):
        load_tokenizer(folder)
    assert not marker.exists()


def test_a_text_model_folder_with_its_own_code_is_refused(tmp_path, yes_to_every_prompt):
    from radalign.models.text import load_text_model, tiny_bert

    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    tiny_bert(100, hidden=16, layers=1, heads=2).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil"
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    _plant_code(folder, "modeling_evil", marker)
    with pytest.raises(ConfigError, match="never runs code"):
        load_text_model(folder)
    assert not marker.exists()


def test_loading_an_export_never_downloads_its_text_model(tiny_export, tmp_path, no_network):
    import shutil

    import radalign

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    config = json.loads((export / "config.json").read_text())
    config["config"]["model"]["text"]["name"] = (
        "some-org/a-model-that-is-not-here"  # what a hub name in an export looks like
    )
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="never downloads"):
        radalign.load(export)
    assert no_network == []


# -- damaged exports and output folders (issue 14, defect 8) ------------------------------------------------------
def _copy_export(tiny_export: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_export, tmp_path / "export"))


def test_an_export_with_nan_weights_is_refused_at_load(tiny_export, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    import radalign

    export = _copy_export(tiny_export, tmp_path)
    state = load_file(export / "model.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    save_file(state, export / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"1 weight tensors hold NaN or infinite values \(e\.g\. {key}\)"):
        radalign.load(export)
    assert torch.isfinite(load_file(tiny_export / "model.safetensors")[key]).all()  # the original is untouched


def test_an_export_with_a_huge_embed_dim_is_a_config_error_not_an_allocation(tiny_export, tmp_path):
    import radalign

    export = _copy_export(tiny_export, tmp_path)
    payload = json.loads((export / "config.json").read_text())
    payload["config"]["model"]["embed_dim"] = 10**12
    (export / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match=r"model\.embed_dim = 1000000000000 is not a plausible"):
        radalign.load(export)


def test_an_export_with_a_wrong_shaped_tensor_is_a_config_error(tiny_export, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    import radalign

    export = _copy_export(tiny_export, tmp_path)
    state = load_file(export / "model.safetensors")
    key = next(k for k, v in state.items() if v.ndim == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, export / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"1 weight tensors have another shape.*{key}"):
        radalign.load(export)


def test_an_unwritable_output_folder_mid_run_is_one_clear_message(simulated_manifest, tmp_path, monkeypatch, capsys):
    """The tests run as root, for whom chmod does not stop writes: the save raises what a read-only folder does."""
    from radalign.cli import main
    from radalign.config import find_config
    from radalign.training import checkpoints

    def refused(written, final):
        raise PermissionError(13, "Permission denied", str(final))

    monkeypatch.setattr(checkpoints, "commit_checkpoint", refused)
    argv = [
        "pretrain",
        "--config",
        str(find_config("clip-tiny")),
        "--data",
        str(simulated_manifest),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--loader.image_size",
        "32",
        "--loader.batch_size",
        "4",
        "--trainer.checkpoint_every_n_steps",
        "1",
        "--trainer.progress",
        "false",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("Permission denied") == 1 and "Traceback" not in err
    assert "step-00000001.ckpt; check that the path exists, is writable" in err
