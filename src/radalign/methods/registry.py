"""Method names -> classes. A new method registers itself with ``@register("name")`` and ships a config."""

from __future__ import annotations

from typing import Any

from radalign.config import PretrainConfig
from radalign.errors import ConfigError
from radalign.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(*names: str):
    def wrap(cls: type[Method]) -> type[Method]:
        for name in names:
            METHODS[name] = cls
        return cls

    return wrap


# modules under radalign.methods that register methods on import
BUILTIN_METHODS = ("clip", "gloria", "lovt", "mgca", "mlip", "prior", "umcl")


def build_method(config: PretrainConfig, tokenizer: Any = None, *, for_inference: bool = False) -> Method:
    """The method named by ``config.method``; ``for_inference`` skips loading pretrained backbone weights."""
    if config.method not in METHODS:
        import importlib

        for module in BUILTIN_METHODS:  # registers the built-in methods on first use
            importlib.import_module(f"radalign.methods.{module}")
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; available: {sorted(METHODS)}")
    return METHODS[config.method](config, tokenizer, for_inference=for_inference)
