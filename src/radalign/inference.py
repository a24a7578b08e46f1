"""Use a trained model without any training code: ``model = radalign.load("runs/clip/export")``.

``load`` rebuilds the method from the exported config.json, loads model.safetensors and the saved tokenizer,
and returns an ``Encoder`` that embeds images and report texts into the shared space (L2-normalised), and scores
texts against images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from radalign.errors import ConfigError


class Encoder:
    """A frozen pre-trained model: images and texts in, normalised embeddings out."""

    def __init__(self, method: Any, tokenizer: Any, max_length: int) -> None:
        self.method = method.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    def to(self, device: str | torch.device) -> Encoder:
        self.method.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 1, H, W) radiographs (or (N, 1, D, H, W) volumes), already transformed -> (N, D) on the CPU."""
        chunks = [
            self.method.encode_images(images[i : i + batch_size].to(self.device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise free texts the way training tokenised reports (each text's sentences, with indices)."""
        from radalign.data.dataset import Collate
        from radalign.data.reports import split_sentences
        from radalign.data.tokenization import encode_report

        items = []
        for text in texts:
            encoded = encode_report(self.tokenizer, split_sentences(text) or [text], self.max_length)
            items.append(
                {
                    "input_ids": torch.from_numpy(encoded.input_ids),
                    "token_sentence": torch.from_numpy(encoded.token_sentence),
                    "token_word": torch.from_numpy(encoded.token_word),
                }
            )
        batch: dict[str, Any] = {}
        Collate(pad_token_id=getattr(self.tokenizer, "pad_token_id", 0) or 0)._pad_text(items, batch)
        return batch

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        chunks = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[i : i + batch_size])
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k != "n_sentences"}
            chunks.append(self.method.encode_texts(tokens).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0)


def load(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Load an export folder (``<run>/export``) or a run folder that contains one."""
    from safetensors.torch import load_file

    from radalign.data.tokenization import load_tokenizer
    from radalign.methods.registry import build_method
    from radalign.training.export import config_from_export

    folder = Path(path)
    if (folder / "export" / "config.json").is_file():
        folder = folder / "export"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"{path} is not a radalign export: expected config.json and model.safetensors (a run writes them to "
            "<run>/export at the end of training)"
        )
    config = config_from_export(folder)
    tokenizer = load_tokenizer(folder / "tokenizer", local_only=True) if (folder / "tokenizer").is_dir() else None
    config.model.image.pretrained = None  # the exported weights replace any initialisation
    method = build_method(config, tokenizer=tokenizer, for_inference=True)
    state = load_file(folder / "model.safetensors")
    missing, unexpected = method.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("ema.")]:
        raise ConfigError(
            f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return Encoder(method.to(device), tokenizer, config.loader.max_length)
