"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A method's -tiny config at test size: 64 px, batch 8, the whole MiniLM frozen, no progress bar.
SMALL: dict[str, Any] = {
    "loader.image_size": 64,
    "loader.batch_size": 8,
    "loader.max_length": 64,
    "model.text.freeze_layers": 6,
    "trainer.progress": False,
}


def tiny_config(name: str, manifest: Path | str | None = None, **overrides: Any) -> Any:
    """``configs/methods/<name>-tiny.yaml`` with SMALL, ``overrides`` on top, and the manifest when given."""
    from radalign.config import find_config, load_config

    settings = dict(SMALL, **overrides)
    if manifest is not None:
        settings["loader.manifest"] = str(manifest)
    return load_config(find_config(f"{name}-tiny"), settings)


def first_batch(config: Any) -> tuple[Any, dict[str, Any]]:
    """The data module of ``config.loader`` (set up for fitting) and its first training batch."""
    from radalign.data.datamodule import RadDataModule

    data = RadDataModule(config.loader)
    data.setup("fit")
    return data, next(iter(data.train_dataloader()))
