"""Exceptions radalign raises for bad input. Every message names the input, the offending value and the fix."""

from __future__ import annotations


class RadalignError(Exception):
    """Base class: an error the user can act on (as opposed to a bug in radalign)."""


class DataError(RadalignError):
    """A file, record or value in the user's data cannot be used as it is."""


class ConfigError(RadalignError):
    """A configuration value or command-line option is invalid."""


class MissingAssetError(RadalignError):
    """A data-only package that radalign reads files from is not installed."""


def refused_model_code(err: Exception, name_or_path: object) -> str | None:
    """The message for a model or tokenizer folder that asks to run its own code (transformers' ``auto_map``),
    which radalign refuses; None when ``err`` is another error."""
    if "custom code" not in str(err) and "trust_remote_code" not in str(err):
        return None
    return (
        f"refused to load {name_or_path}: it asks to run Python code shipped with it (an `auto_map` naming its own "
        "classes), and radalign never runs code from a model, tokenizer or export folder. Use a folder whose "
        "classes transformers has built in (e.g. tokenizer_class: BertTokenizer)"
    )
