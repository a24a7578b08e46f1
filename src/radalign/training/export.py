"""The export format: model.safetensors + config.json (+ tokenizer/), written at the end of every run.

Import-light on purpose (no Lightning): ``radalign.load`` reads exports through this module, so using a trained
model needs none of the training stack.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from radalign.config import PretrainConfig
from radalign.errors import ConfigError
from radalign.utils.files import publish_folder, share_file

EXPORT_FORMAT = 1


def export(method: torch.nn.Module, config: PretrainConfig, folder: Path, tokenizer: Any = None) -> Path:
    """Weights as safetensors + the config as JSON (+ the tokenizer): everything ``radalign.load`` needs.

    Written whole into a sibling folder and renamed into place, so a reader (or a kill) never meets half an export;
    files get the mode the umask asks for. Call it from one process (under DDP: global rank 0).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    staged = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    save_file(_dedupe_shared(state), staged / "model.safetensors", metadata={"format": str(EXPORT_FORMAT)})
    share_file(staged / "model.safetensors")
    payload = {"format": EXPORT_FORMAT, "config": config.to_dict()}
    (staged / "config.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(staged / "tokenizer")
    publish_folder(staged, folder)
    return folder


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): keep a private copy of each repeat."""
    seen: set[int] = set()
    result = {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return result


def config_from_export(folder: Path) -> PretrainConfig:
    from radalign.config import from_dict

    payload = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if payload.get("format") != EXPORT_FORMAT:
        found = payload.get("format")
        raise ConfigError(f"{folder} was exported in format {found}; this radalign reads format {EXPORT_FORMAT}")
    return from_dict(PretrainConfig, payload["config"])
