"""One way to get matplotlib for radalign's figures: the non-interactive Agg backend (servers, CI, no display)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: figures are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    """Lay out, write and close a pyplot figure (closing frees it: figures made in a loop would pile up)."""
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def legend_title_save(
    fig: Any, path: Path, findings: Sequence[str], color: Callable[[int], Any], title: str, bottom: float
) -> None:
    """A one-colour-per-finding legend under the panels, a title, then write and close the figure."""
    plt = pyplot()
    handles = [plt.Line2D([], [], color=color(k % 10), label=f) for k, f in enumerate(findings)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(findings), 4), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path)
    plt.close(fig)
