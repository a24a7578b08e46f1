"""A contact sheet of simulated samples: each radiograph with its findings outlined and its report beneath."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from radalign.data.manifest import load_manifest, load_regions

COLOURS = {
    "nodule": "#ffd400", "mass": "#ff8c00", "consolidation": "#00e5ff", "atelectasis": "#7cfc00",
    "pleural_effusion": "#1e90ff", "pneumothorax": "#ff1493", "cardiomegaly": "#ff4500", "edema": "#da70d6",
    "support_devices": "#adff2f",
}  # fmt: skip


def contact_sheet(data_dir: str | Path, out: str | Path | None = None, *, n: int = 12, columns: int = 4) -> Path:
    """Render the first ``n`` radiographs of a simulated dataset (outlines + reports) to a PNG."""
    from matplotlib.lines import Line2D

    from radalign.data.io import read_image
    from radalign.utils.plotting import pyplot

    plt = pyplot()

    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir / "manifest.csv", check_files=False)
    records = [r for r in manifest.records if r.modality.value == "xray"][:n]
    rows = int(np.ceil(len(records) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 6.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, record in zip(axes.ravel(), records, strict=False):
        ax.imshow(read_image(record.image_path).array, cmap="gray", vmin=0, vmax=1)
        kinds = []
        for region in load_regions(record.regions_path) if record.regions_path is not None else []:
            mask = read_image(Path(region.mask_path)).array > 0.5 if region.mask_path else None
            if mask is not None and mask.any():
                ax.contour(mask, levels=[0.5], colors=[COLOURS.get(region.finding, "white")], linewidths=1.2)
            kinds.append(region.finding)
        ax.set_title(f"{record.id}: {', '.join(kinds) or 'normal'}", fontsize=8)
        ax.text(
            0.0, -0.02, textwrap.fill(record.report or "", 62), transform=ax.transAxes, fontsize=6.5,
            va="top", ha="left", family="monospace",
        )  # fmt: skip
    handles = [Line2D([0], [0], color=c, lw=2, label=k) for k, c in COLOURS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(COLOURS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out) if out is not None else data_dir / "preview.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
