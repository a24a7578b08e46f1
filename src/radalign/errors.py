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
