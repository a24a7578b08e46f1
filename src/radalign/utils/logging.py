"""One logger for radalign, printed through rich so it interleaves cleanly with progress bars."""

from __future__ import annotations

import logging

_LOGGER_NAME = "radalign"


def get_logger(name: str | None = None) -> logging.Logger:
    """The radalign logger (or a child of it); configured on first use with a rich console handler."""
    root = logging.getLogger(_LOGGER_NAME)
    if not root.handlers:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = True  # lets pytest's caplog see messages
    return root.getChild(name) if name else root
