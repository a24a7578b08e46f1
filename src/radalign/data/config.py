"""The data loader's configuration (``loader.*`` keys of a run config); import-light for the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from radalign.errors import ConfigError


@dataclass
class DataConfig:
    """Everything that turns a manifest into batches. Every field is a config key (``data.<field>``)."""

    manifest: Path | None = None
    data_root: Path | None = None  # every file the manifest names must lie under it (default: the manifest's folder)
    cache_dir: Path | None = None  # made by `radalign prepare`; decoded on the fly when absent
    modality: Literal["xray", "ct"] = "xray"  # records of other modalities are left out
    tokenizer: str | None = "minilm"  # a local folder, "minilm" (bundled), a hub name, or None (no text)
    max_length: int = 128
    report_sections: tuple[str, ...] = ("FINDINGS", "IMPRESSION")
    require_report: bool = True
    image_size: int = 224  # 2D: square side after augmentation
    preset: str = "convirt"  # 2D augmentation preset (see data/transforms.py)
    hflip: bool | None = None  # None = the preset's default
    volume_size: tuple[int, int, int] = (96, 96, 96)
    volume_spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    text_shuffle: bool = False  # PRIOR: shuffle sentences on every access
    text_swap_p: float = 0.0  # LoVT: sentence swaps ~ Geometric(p); 0 = off
    text_one_sentence: bool = False  # ConVIRT: one random sentence
    image_choice: Literal["first", "random"] = "random"
    batch_size: int = 32
    eval_batch_size: int | None = None
    num_workers: int = 0
    on_error: Literal["skip", "fail"] = "skip"
    max_skip_fraction: float = 0.05  # stop the run if more of an epoch than this is unreadable
    seed: int = 0
    vocabulary: tuple[str, ...] = field(default_factory=tuple)  # empty = the manifest's label columns

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"loader.batch_size must be positive, got {self.batch_size}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"loader.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
