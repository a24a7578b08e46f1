"""radalign: medical vision-language pre-training on one modular core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("radalign")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"


def load(path, device="cpu"):
    """Load an exported model for inference (``<run>/export``); see :func:`radalign.inference.load`."""
    from radalign.inference import load as _load

    return _load(path, device=device)


__all__ = ["__version__", "load"]
