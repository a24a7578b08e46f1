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
