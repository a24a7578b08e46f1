"""radalign's configuration: the types of a pre-training run and of an evaluation protocol, and their loading.

Every layer reads configuration (data, models, methods, training, evaluation), so it sits below all of them and
imports none of them: ``from radalign.config import PretrainConfig, load_config`` works from anywhere.

- ``data.py``: ``DataConfig`` (the ``loader.*`` keys: manifest or sources, transforms, batches).
- ``pretrain.py``: ``PretrainConfig`` (model, objectives, stages, optim, ema, loader, trainer), ``load_config``.
- ``protocol.py``: ``Protocol`` and ``TaskSpec`` (the evaluation protocols), ``load_protocol``.
- ``loading.py``: strict dict -> dataclass conversion, option checks, shipped config files, config diffs.
"""

from radalign.config.data import DataConfig
from radalign.config.loading import (
    check_options,
    config_changes,
    find_config,
    from_dict,
    plain,
    shipped_config_dir,
)
from radalign.config.pretrain import (
    RESUMABLE_CHANGES,
    EMAConfig,
    ImageEncoderConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    StageConfig,
    TextEncoderConfig,
    TrainerConfig,
    load_config,
    stage_started,
)
from radalign.config.protocol import (
    TASK_KINDS,
    Protocol,
    TaskSpec,
    check_params,
    find_protocol,
    load_protocol,
    protocols_dir,
)

__all__ = [
    "RESUMABLE_CHANGES", "TASK_KINDS", "DataConfig", "EMAConfig", "ImageEncoderConfig", "ModelConfig",
    "OptimConfig", "PretrainConfig", "Protocol", "StageConfig", "TaskSpec", "TextEncoderConfig", "TrainerConfig",
    "check_options", "check_params", "config_changes", "find_config", "find_protocol", "from_dict", "load_config",
    "load_protocol", "plain", "protocols_dir", "shipped_config_dir", "stage_started",
]  # fmt: skip
