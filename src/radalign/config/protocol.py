"""Named evaluation protocols: YAML files (configs/protocols/) that fix everything a downstream number depends on.

A protocol names its dataset, splits, image size, seeds, bootstrap size and a list of tasks, each with its own
parameters (head, optimiser, epochs, label fractions, metrics...). Two results are comparable only when they
come from the same protocol on the same data; ``radalign compare`` checks exactly that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from radalign.config.loading import check_options, from_dict, plain, shipped_config_dir
from radalign.errors import ConfigError

TASK_KINDS = (
    "zero_shot",
    "retrieval",
    "linear_probe",
    "finetune",
    "segmentation",
    "detection",
    "grounding",
)


@dataclass
class TaskSpec:
    """One task of a protocol. ``params`` are the task's own options (each task validates and documents them)."""

    task: str
    name: str = ""  # the key of this task's results; default: the task kind
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASK_KINDS:
            raise ConfigError(f"unknown evaluation task {self.task!r}; use one of {', '.join(TASK_KINDS)}")
        self.name = self.name or self.task


@dataclass
class Protocol:
    """Everything a downstream result depends on besides the model."""

    name: str
    description: str = ""
    data: Path | None = None  # the manifest; `radalign evaluate --data` overrides it
    data_root: Path | None = None  # files the manifest names must lie under it (default: the manifest's folder)
    modality: Literal["xray", "ct"] = "xray"
    image_size: int = 224  # 2D: square side after pad-to-square + resize (no augmentation)
    volume_size: tuple[int, int, int] = (96, 96, 96)
    volume_spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    cache_dir: Path | None = None  # a `radalign prepare` cache for the manifest, if there is one
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    findings: list[str] = field(default_factory=list)  # empty: every label column of the manifest
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    bootstrap: int = 1000  # resamples for confidence intervals of single-run metrics; 0 = none
    batch_size: int = 64
    tasks: list[TaskSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"protocol {self.name}: two tasks are named {duplicates[0]!r}; give each a 'name'")
        missing = {"train", "val", "test"} - set(self.splits)
        if missing:
            raise ConfigError(f"protocol {self.name}: splits must map train, val and test; missing {sorted(missing)}")

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def task(self, name: str) -> TaskSpec:
        for spec in self.tasks:
            if spec.name == name:
                return spec
        raise ConfigError(f"protocol {self.name} has no task {name!r}; it has {[t.name for t in self.tasks]}")


def protocols_dir() -> Path:
    return shipped_config_dir() / "protocols"


def find_protocol(name_or_path: str | Path) -> Path:
    """A protocol YAML path, or a shipped protocol's name (``quick`` -> configs/protocols/quick.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = protocols_dir() / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and len(path.parts) == 1 and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in protocols_dir().glob("*.yaml"))
    raise ConfigError(f"protocol {name_or_path} not found; give a YAML path or a shipped name: {', '.join(names)}")


def load_protocol(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Protocol:
    """Read a protocol, apply dotted overrides ({"seeds": [0], "tasks.linear_probe.epochs": 5}), validate."""
    import yaml

    path = find_protocol(name_or_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        _override(data, dotted, value)
    return from_dict(Protocol, data)


def _override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``tasks.NAME.key`` addresses a task's params by task name; anything else is a plain dotted path."""
    parts = dotted.split(".")
    if parts[0] == "tasks" and len(parts) >= 3:
        for spec in data.get("tasks", []):
            if spec.get("name", spec.get("task")) == parts[1]:
                node = spec.setdefault("params", {})
                for key in parts[2:-1]:
                    node = node.setdefault(key, {})
                node[parts[-1]] = value
                return
        raise ConfigError(f"override {dotted}: the protocol has no task named {parts[1]!r}")
    node = data
    for key in parts[:-1]:
        node = node.setdefault(key, {})
    node[parts[-1]] = value


def check_params(task: str, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``params``; a key the task does not know is an error that names it."""
    return check_options(f"task {task}", params, defaults)
