"""The pre-training configuration: one dataclass tree, read from YAML, every key overridable from the CLI.

A run is ``PretrainConfig``: which method, its model (encoders, projection), its objectives and their weights, a
stage schedule, the optimiser, optional EMA copies, the data loader and the Lightning trainer flags. The YAML
files in ``configs/methods/`` hold exactly these keys; ``radalign pretrain --config FILE --optim.lr 3e-4`` overrides
one value, and an unknown key anywhere is an error that names it (checked here for the Python API, by
jsonargparse for the CLI).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from radalign.config.data import DataConfig
from radalign.config.loading import from_dict, plain
from radalign.errors import ConfigError


@dataclass
class ImageEncoderConfig:
    """A timm 2D backbone (``resnet18``, ``vit_small_patch16_224``, any timm name) or a MONAI 3D ResNet.

    Attributes:
        name: A timm model name (ViT / DeiT / EVA names get img_size = loader.image_size), or a MONAI 3D ResNet with
            the suffix _3d for CT volumes (resnet10_3d ... resnet200_3d).
        pretrained: Initial weights: a local .safetensors / .pt file, or (timm only, needs network) 'timm',
            'timm:TAG' or 'hf-hub:ORG/NAME'; null = random initialisation.
        kwargs: Extra keyword arguments for the timm / MONAI constructor, e.g. {img_size: 128}; {spatial_dims: 3}
            selects the 3D ResNet.
    """

    name: str = "resnet18"
    pretrained: str | None = None  # a local weights file, or a hub name you ask for; never implicit
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the backbone (e.g. img_size for ViTs)


@dataclass
class TextEncoderConfig:
    """A BERT-family encoder: a local folder, ``minilm`` (bundled) or a hub name; ``tiny`` = random tiny BERT.

    Attributes:
        name: The text model: a local transformers folder, minilm (bundled, offline), tiny (a random tiny BERT
            sized by model.text.tiny) or a hub name (needs network).
        freeze_embeddings: Freeze the input embeddings (no gradients into them).
        freeze_layers: Freeze the first N transformer layers (0 = train all of them).
        pooling: The global text embedding: cls (the [CLS] token), mean (mean over the non-padding tokens) or
            attention (a learned attention pool over the tokens).
        tiny: Sizes of the tiny BERT when name is tiny: hidden, layers, heads, intermediate, max_position (the
            vocabulary size comes from the tokenizer).
        sum_last_layers: Token features are the sum of the last N hidden layers (1 = the last layer; GLoRIA: 4).
    """

    name: str = "minilm"
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze the first N transformer layers
    pooling: Literal["cls", "mean", "attention"] = "cls"
    tiny: dict[str, int] = field(default_factory=dict)  # name == "tiny": hidden, layers, heads, intermediate
    sum_last_layers: int = 1  # token features = sum of the last N hidden layers (GLoRIA: 4)


@dataclass
class ModelConfig:
    """Encoders, projection and embedding size.

    Attributes:
        image: A timm 2D backbone (``resnet18``, ``vit_small_patch16_224``, any timm name) or a MONAI 3D ResNet.
        text: A BERT-family encoder: a local folder, ``minilm`` (bundled) or a hub name; ``tiny`` = random tiny BERT.
        embed_dim: Size of the shared image-text embedding space (the projection heads' output dimension).
        projection: The projection heads: linear (one Linear) or mlp (Linear, ReLU, Linear).
        options: Method-specific model settings (docs/methods/<method>.md); an unknown key is an error.
    """

    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 512
    projection: Literal["linear", "mlp"] = "linear"
    options: dict[str, Any] = field(default_factory=dict)  # method-specific model settings, validated by the method


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (or constant) over the run's optimiser steps.

    Attributes:
        lr: Peak learning rate, reached at the end of the warm-up (scaled per sub-module by lr_multipliers).
        weight_decay: AdamW's decoupled weight decay; biases, norms and other 1-D parameters get none.
        betas: AdamW's (beta1, beta2) moment decay rates.
        warmup_steps: Optimiser steps of linear warm-up from lr / warmup_steps up to lr (0 = no warm-up).
        schedule: After the warm-up: cosine (decay to min_lr_ratio x lr by the last step) or constant (lr throughout).
        min_lr_ratio: The cosine schedule's final learning rate as a fraction of lr (0 = decay to zero).
        lr_multipliers: Parameter-name prefix -> lr factor, e.g. {text_encoder.: 0.1}; the last matching prefix wins.
        weight_decays: Parameter-name prefix -> weight decay for those parameters, e.g. {prompt_learner.: 0.0};
            the last matching prefix wins (others: weight_decay; 1-D parameters: none).
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # the cosine's floor as a fraction of lr
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # submodule name prefix -> factor
    weight_decays: dict[str, float] = field(default_factory=dict)  # submodule name prefix -> its weight decay


@dataclass
class StageConfig:
    """A training stage: the objective weights in force from a step, an epoch or a fraction of the run on.

    From ``start_step`` (or ``start_epoch``, or ``start_fraction`` of ``trainer.max_steps``) on, the objectives'
    weights are ``weights`` (missing = unchanged). A fraction keeps a schedule's proportions at any budget: the same
    config passes through every stage in a 20-step smoke run and in a 50,000-step one.

    Attributes:
        name: The stage's name, shown in the log line that announces its start.
        start_step: The optimiser step at which the stage begins.
        start_epoch: The epoch (counted from 0) at which the stage begins.
        start_fraction: The share of trainer.max_steps (0-1) after which the stage begins; needs trainer.max_steps.
        weights: Objective name -> weight from this stage on (0 turns the objective off; missing = unchanged).
        reset_optimizer: Recreate the optimiser and its schedule (fresh moments, a new warm-up) when the stage begins.
        lr: With reset_optimizer: this stage's peak learning rate (null = optim.lr).
        warmup_steps: With reset_optimizer: this stage's warm-up in optimiser steps (null = optim.warmup_steps).
    """

    name: str = "main"
    start_step: int | None = None
    start_epoch: int | None = None
    start_fraction: float | None = None
    weights: dict[str, float] = field(default_factory=dict)
    reset_optimizer: bool = False  # recreate the optimiser and schedule at this boundary (PRIOR)
    lr: float | None = None  # with reset_optimizer: this stage's peak learning rate (None = optim.lr)
    warmup_steps: int | None = None  # with reset_optimizer: this stage's warm-up (None = optim.warmup_steps)


@dataclass
class EMAConfig:
    """Exponential-moving-average copies of sub-modules (teachers for MLIP / UniMedI).

    Attributes:
        modules: Dotted names of the method's sub-modules to keep EMA copies of, e.g. [image_encoder]; [] = no EMA.
        decay: EMA decay per optimiser step, in [0, 1): copy = decay x copy + (1 - decay) x weights.
    """

    modules: list[str] = field(default_factory=list)
    decay: float = 0.999


@dataclass
class TrainerConfig:
    """Lightning Trainer flags: the same config runs on one CPU or on DDP across nodes by changing these.

    Attributes:
        max_steps: Optimiser steps to train for; -1 = no step limit (max_epochs decides).
        max_epochs: Epochs to train for; null = no epoch limit when max_steps is set, else one epoch.
        accelerator: Lightning accelerator: auto, cpu, gpu, cuda or mps.
        devices: Devices per node: a count, a list such as '0,1', -1 for all, or auto.
        num_nodes: Number of machines (nodes) for multi-node DDP.
        strategy: Lightning strategy: auto, ddp, ddp_spawn, ... (auto picks DDP for several devices).
        sync_batchnorm: BatchNorm statistics over all processes under DDP (GPUs only; PRIOR).
        precision: Lightning precision (32-true, bf16-mixed, 16-mixed, ...); auto = bf16-mixed on a GPU that
            supports it, else 32-true.
        accumulate_grad_batches: Batches whose gradients are summed into one optimiser step.
        gradient_clip_val: Clip the gradient norm to this value before each optimiser step; null = no clipping.
        log_every_n_steps: Log training metrics (CSV, TensorBoard) every N steps.
        val_check_interval: Validate every N training batches (int) or share of an epoch (float); null = every
            tenth of max_steps (each epoch when max_steps is not set).
        checkpoint_every_n_steps: Save a checkpoint in OUT/checkpoints/ every N optimiser steps (and at the end).
        seed: Random seed of the run (initial weights, dropout; process r of a DDP run uses seed + r).
        deterministic: Use deterministic algorithms only (reproducible on GPUs, slower; see torch's
            use_deterministic_algorithms).
        progress: Show the progress bar (steps, losses, throughput, time left).
    """

    max_steps: int = -1
    max_epochs: int | None = None
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    sync_batchnorm: bool = False  # BatchNorm statistics over all processes under DDP (PRIOR)
    precision: str = "auto"  # auto: bf16-mixed on a GPU that supports it, else 32-true
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    val_check_interval: int | float | None = None  # batches (int) or share of an epoch; None: a tenth of max_steps
    checkpoint_every_n_steps: int = 500
    seed: int = 0
    deterministic: bool = False
    progress: bool = True


@dataclass
class PretrainConfig:
    method: str = "clip"
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loader: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def weights_at(self, step: int, epoch: int) -> dict[str, float]:
        """Objective weights in force at (step, epoch): each objective's own weight, updated by every started stage."""
        weights = {name: float(spec.get("weight", 1.0)) for name, spec in self.objectives.items()}
        for stage in self.stages:
            if stage_started(stage, step, epoch, self.trainer.max_steps):
                weights.update(stage.weights)
        return weights

    def objective_ever_on(self, name: str) -> bool:
        """Whether objective ``name`` has a non-zero weight at some point of the run (its own weight, default 1, or
        a stage's): a method builds the modules of an objective that never counts not at all."""
        spec = self.objectives.get(name, {})
        if float(spec.get("weight", 1.0)) != 0:
            return True
        return any(float(stage.weights.get(name, 0.0)) != 0 for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


# Keys a resume may change: how long to train, how often to log or save, and how the data are read, none of which
# changes what a given step computes. The manifest's path may change (a moved archive) when its content has not.
RESUMABLE_CHANGES = frozenset({
    "trainer.max_steps", "trainer.max_epochs", "trainer.progress", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "loader.manifest", "loader.data_root", "loader.cache_dir",
    "loader.eval_batch_size",
})  # fmt: skip


def stage_started(stage: StageConfig, step: int, epoch: int, max_steps: int = -1) -> bool:
    if stage.start_step is not None and step >= stage.start_step:
        return True
    if stage.start_epoch is not None and epoch >= stage.start_epoch:
        return True
    if stage.start_fraction is not None:
        if max_steps is None or max_steps <= 0:
            raise ConfigError(
                f"stage {stage.name!r} starts at start_fraction={stage.start_fraction} of trainer.max_steps, but "
                "max_steps is not set; set trainer.max_steps (--max-steps N) or give the stage a start_step"
            )
        return step >= round(stage.start_fraction * max_steps)
    return stage.start_step is None and stage.start_epoch is None and stage.start_fraction is None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Read a YAML run config, apply dotted ``overrides`` ({"optim.lr": 3e-4}), and validate every key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped ones are in configs/methods/")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return from_dict(PretrainConfig, data)
