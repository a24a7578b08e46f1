"""The data loader's configuration (``loader.*`` keys of a run config); import-light for the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from radalign.errors import ConfigError


@dataclass
class DataConfig:
    """Everything that turns a manifest into batches. Every field is a config key (``data.<field>``).

    Attributes:
        manifest: The training manifest (.csv or .parquet; its train / val splits are used); pretrain's --data sets it.
        data_root: Every file the manifest names must lie under this folder (null = the manifest's folder).
        cache_dir: A `radalign prepare` cache of the manifest's images (null, or an image not in it: decoded from
            its file on every read).
        modality: Which records to train on: xray (2D radiographs) or ct (3D volumes); others are left out.
        tokenizer: The report tokenizer: a local folder, minilm (bundled), a hub name, or null (no text).
        max_length: Longest tokenised report, in tokens (special tokens included); longer reports are truncated.
        report_sections: Report sections whose sentences form the text (a report with none of them: its preamble).
        require_report: Treat a record whose report is missing or empty as bad (left out, or an error: on_error).
        image_size: 2D images: side of the square training and evaluation image, in pixels.
        preset: 2D training augmentation: convirt, prior or none (data/transforms.py).
        hflip: 2D training: random horizontal flip on (true) or off (false); null = the preset's default.
        volume_size: 3D volumes: size (X, Y, Z) in voxels of the crop after resampling (random in training, centred
            in evaluation; smaller volumes are padded with air).
        volume_spacing_mm: 3D volumes: voxel spacing (X, Y, Z) to resample to, in mm.
        hu_window: 3D volumes: the Hounsfield-unit window (low, high) mapped to [0, 1] (values outside are clipped).
        text_shuffle: Training: shuffle the report's sentences on every access (PRIOR).
        text_swap_p: Training: swap random sentence pairs, the number of swaps ~ Geometric(p), in [0, 1]; 0 = off
            (LoVT: 0.4).
        text_one_sentence: Training: use one random sentence of the report (ConVIRT).
        image_choice: Training, for a study with several images: first, or a random one on every access (evaluation
            always takes the first).
        batch_size: Training samples per batch, per process (under DDP each process loads its own batch).
        eval_batch_size: Validation and test samples per batch, per process (null = batch_size).
        num_workers: Data-loading worker processes (0 = load in the training process).
        on_error: A bad manifest row or unreadable record: skip it (counted; see max_skip_fraction) or fail (stop at
            the first).
        max_skip_fraction: Stop the run when more than this share (0-1) of an epoch's records is unreadable.
        seed: Seed of the data order and of the augmentation draws (the same seed gives the same batches).
        vocabulary: Finding names that form each sample's label vector, in order (empty = the manifest's label
            columns).
    """

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
