"""The data loader's configuration (``loader.*`` keys of a run config); import-light for the CLI.

A run reads one manifest (``loader.manifest``, the common case) or several weighted sources (``loader.sources``),
e.g. an image-report archive with an image-label one, or 2D radiographs with 3D CT (docs/training.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from radalign.errors import ConfigError

# the loader keys a source may set for itself; unset ones are the loader's
SOURCE_OVERRIDES = (
    "modality", "require_report", "report_sections", "image_size", "preset", "hflip", "volume_size",
    "volume_spacing_mm", "hu_window",
)  # fmt: skip


@dataclass
class SourceConfig:
    """One training source of a multi-source run: a manifest, its sampling weight and its own loader settings.

    Attributes:
        manifest: The source's manifest (.csv or .parquet; its train / val splits are used).
        name: The source's name in logs and checkpoints (default: the manifest's file name without suffix).
        weight: Sampling weight: the share of a batch drawn from this source is weight / (sum of the weights of the
            sources of the same modality).
        data_root: Every file the manifest names must lie under this folder (null = the manifest's folder).
        cache_dir: A `radalign prepare` cache of this source's images (null = decode from the files).
        batch_size: Samples per batch from this source's modality, per process (null = loader.batch_size; the
            sources of one modality must agree).
        modality: xray or ct (null = loader.modality).
        require_report: Leave out records without a report (null = loader.require_report); false for an
            image-label source (CheXpert-style rows with labels and no report).
        report_sections: Report sections whose sentences form the text (null = loader.report_sections).
        image_size: 2D: side of the square image (null = loader.image_size).
        preset: 2D augmentation preset (null = loader.preset).
        hflip: 2D random horizontal flip (null = loader.hflip).
        volume_size: 3D: crop size (X, Y, Z) in voxels (null = loader.volume_size).
        volume_spacing_mm: 3D: voxel spacing to resample to (null = loader.volume_spacing_mm).
        hu_window: 3D: the Hounsfield-unit window (null = loader.hu_window).
    """

    manifest: Path | None = None
    name: str = ""
    weight: float = 1.0
    data_root: Path | None = None
    cache_dir: Path | None = None
    batch_size: int | None = None
    modality: Literal["xray", "ct"] | None = None
    require_report: bool | None = None
    report_sections: tuple[str, ...] | None = None
    image_size: int | None = None
    preset: str | None = None
    hflip: bool | None = None
    volume_size: tuple[int, int, int] | None = None
    volume_spacing_mm: tuple[float, float, float] | None = None
    hu_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.manifest is None:
            raise ConfigError("loader.sources: every source needs a manifest (e.g. {manifest: data/chexpert.csv})")
        self.name = self.name or Path(self.manifest).stem
        if not self.weight > 0:
            raise ConfigError(f"loader.sources: source {self.name!r} has weight {self.weight}; weights must be > 0")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"loader.sources: source {self.name!r} has batch_size {self.batch_size}; use > 0")


@dataclass
class DataConfig:
    """Everything that turns a manifest into batches. Every field is a config key (``data.<field>``).

    Attributes:
        manifest: The training manifest (.csv or .parquet; its train / val splits are used); pretrain's --data sets it.
        sources: Several training sources instead of one manifest, each a manifest with a sampling weight and its
            own loader settings (SourceConfig); batches mix them by weight, 2D and 3D in separate batches.
        mix_modalities: With 2D and 3D sources: both (every optimiser step sees one 2D and one 3D batch) or
            alternate (the steps alternate between them).
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
    sources: list[SourceConfig] = field(default_factory=list)
    mix_modalities: Literal["both", "alternate"] = "both"
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
        if self.sources and self.manifest is not None:
            raise ConfigError(
                f"loader.manifest ({self.manifest}) and loader.sources are both set; list the manifest as one of the "
                "sources instead (pretrain --data sets loader.manifest)"
            )
        names = [source.name for source in self.sources]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(f"loader.sources: two sources are named {twice[0]!r}; give each a distinct name")

    def source_list(self) -> list[DataConfig]:
        """Each training source as a single-manifest DataConfig, its own settings over the loader's: one entry
        for a ``loader.manifest`` run. Raises when neither is set."""
        if not self.sources:
            if self.manifest is None:
                raise ConfigError(
                    "loader.manifest is not set; pass --data MANIFEST (a .csv or .parquet manifest), or list "
                    "loader.sources"
                )
            return [self]
        out = []
        for source in self.sources:
            values = {key: getattr(source, key) for key in SOURCE_OVERRIDES if getattr(source, key) is not None}
            values.update(manifest=source.manifest, data_root=source.data_root, cache_dir=source.cache_dir)
            if source.batch_size is not None:
                values["batch_size"] = source.batch_size
            out.append(dataclasses.replace(self, sources=[], **values))
        return out

    def source_names(self) -> list[str]:
        return [s.name for s in self.sources] if self.sources else [Path(self.manifest or "data").stem]
