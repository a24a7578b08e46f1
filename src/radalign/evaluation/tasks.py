"""Task kind -> the function that runs it: ``run(ctx: EvalContext, spec: TaskSpec) -> TaskResult``.

Imported lazily by name so that evaluating zero-shot does not import the detection stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from radalign.errors import ConfigError

TASK_FUNCTIONS: dict[str, str] = {
    "zero_shot": "radalign.evaluation.zero_shot:run_zero_shot",
    "retrieval": "radalign.evaluation.retrieval:run_retrieval",
    "linear_probe": "radalign.evaluation.probe:run_linear_probe",
    "finetune": "radalign.evaluation.probe:run_finetune",
    "segmentation": "radalign.evaluation.segmentation:run_segmentation",
    "detection": "radalign.evaluation.detection:run_detection",
    "grounding": "radalign.evaluation.grounding:run_grounding",
}


# each task's parameters and their defaults, checked for every selected task before any of them runs
TASK_DEFAULTS: dict[str, str] = {
    "zero_shot": "radalign.evaluation.zero_shot:DEFAULTS",
    "retrieval": "radalign.evaluation.retrieval:DEFAULTS",
    "linear_probe": "radalign.evaluation.probe:PROBE_DEFAULTS",
    "finetune": "radalign.evaluation.probe:FINETUNE_DEFAULTS",
    "segmentation": "radalign.evaluation.segmentation:DEFAULTS",
    "detection": "radalign.evaluation.detection:DEFAULTS",
    "grounding": "radalign.evaluation.grounding:DEFAULTS",
}


def _resolve(table: dict[str, str], kind: str) -> Any:
    if kind not in table:
        raise ConfigError(f"unknown evaluation task {kind!r}; use one of {', '.join(TASK_FUNCTIONS)}")
    module, name = table[kind].split(":")
    return getattr(importlib.import_module(module), name)


def check_task_params(spec: Any) -> None:
    """A misspelled parameter of any selected task is an error before the protocol starts, not after an hour."""
    from radalign.config import check_params

    check_params(spec.name, spec.params, _resolve(TASK_DEFAULTS, spec.task))


def task_function(kind: str) -> Callable[..., Any]:
    return _resolve(TASK_FUNCTIONS, kind)
