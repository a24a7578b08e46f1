"""The package's layers import only downward (docs/architecture.md): configuration below its readers, models
below methods, nothing below training importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import radalign

ORDER = [
    "__init__", "errors", "utils", "assets", "config", "data", "models", "objectives", "methods", "training",
    "inference", "evaluation", "demo", "cli",
]  # fmt: skip


def _imports() -> list[tuple[str, str, str]]:
    """(file, its layer, the radalign layer it imports) for every import inside the package."""
    root = Path(radalign.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        layer = path.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("radalign."):
                    found.append((str(path.relative_to(root)), layer, name.split(".")[1]))
    return found


def test_every_layer_imports_only_the_layers_below_it() -> None:
    found = _imports()
    assert any(target == "config" for _, _, target in found)  # the walk sees the imports at all
    upward = [
        f"{file} ({layer}) imports radalign.{target}"
        for file, layer, target in found
        if layer != "__init__" and layer != target and ORDER.index(target) > ORDER.index(layer)
    ]
    assert not upward, "\n".join(upward)


def test_configuration_imports_nothing_but_errors() -> None:
    targets = {target for _, layer, target in _imports() if layer == "config"} - {"config"}
    assert targets <= {"errors"}, targets
