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


def task_function(kind: str) -> Callable[..., Any]:
    if kind not in TASK_FUNCTIONS:
        raise ConfigError(f"unknown evaluation task {kind!r}; use one of {', '.join(TASK_FUNCTIONS)}")
    module, name = TASK_FUNCTIONS[kind].split(":")
    return getattr(importlib.import_module(module), name)
