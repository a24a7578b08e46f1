"""Reading configuration: dataclass trees from nested dicts (strictly: an unknown key is an error that names it),
option dictionaries checked against their defaults, the shipped config files, and diffs between two configs.

This module and the config types beside it sit below every reader: data, models, methods, training and
evaluation import them; they import none of those.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

from radalign.errors import ConfigError


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, strictly: an unknown key is a ConfigError that names it."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
    kwargs = {name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"config section '{where.rstrip('.') or 'root'}': {err}") from err


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, f"{where}.")
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        for arg in args:
            if arg is not type(None) and dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value, f"{where}.")
        return value
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return [from_dict(args[0], item, f"{where}[{i}].") for i, item in enumerate(value)]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin is Literal and value not in args:
        raise ConfigError(f"config key '{where}' must be one of {list(args)}, got {value!r}")
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value


def check_options(where: str, given: dict[str, Any], defaults: dict[str, Any], extra: tuple[str, ...] = ()) -> dict:
    """``defaults`` updated with ``given``; a key that is neither a default nor in ``extra`` is a ConfigError that
    names it and lists the valid ones. The one check behind method options and evaluation task parameters."""
    unknown = sorted(set(given) - set(defaults) - set(extra))
    if unknown:
        import difflib

        valid = ", ".join(sorted([*defaults, *extra]))
        close = difflib.get_close_matches(unknown[0], [*defaults, *extra], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown parameter {unknown[0]!r}{hint}; valid: {valid}")
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


def config_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (before, after) for every value that differs between two ``to_dict()`` trees."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(config_changes(old, new, f"{prefix}{key}."))
        elif plain(old) != plain(new):
            changes[f"{prefix}{key}"] = (old, new)
    return changes


def shipped_config_dir() -> Path:
    """The method configs that ship with radalign (also reachable as ``configs/`` in a source checkout)."""
    return Path(__file__).resolve().parents[1] / "configs"


def find_config(name_or_path: str | Path) -> Path:
    """A config file path, or a shipped config's name (``clip-tiny`` -> configs/methods/clip-tiny.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_config_dir() / "methods" / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and len(path.parts) <= 3 and shipped.is_file():
        return shipped
    import difflib

    names = sorted(p.stem for p in (shipped_config_dir() / "methods").glob("*.yaml"))
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"config {name_or_path} not found{hint}; give a YAML path or a shipped name: {', '.join(names)}")
