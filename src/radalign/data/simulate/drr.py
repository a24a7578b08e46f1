"""Digitally reconstructed radiographs: a posteroanterior projection of attenuation through a CT volume.

Parallel-beam model: HU -> linear attenuation mu = mu_water * (1 + HU / 1000) (clipped at 0), integrated
along the anterior-posterior axis; the line integral is the log-transformed radiograph (bright = dense), then
windowed to [0, 1]. Display convention of a PA chest film: the patient's head at the top, the patient's
right on the viewer's left.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from radalign.data.schema import Image, Modality
from radalign.errors import DataError

MU_WATER_PER_MM = 0.02  # about 70 keV; only the contrast between tissues matters after windowing
OUTSIDE_FOV_HU = -1500  # scanners pad outside the reconstruction circle with -2048 or -3024


def attenuation_line_integral(volume: Image) -> np.ndarray:
    """Sum of mu * path length along the A-P axis: (X, Z) array, unitless (log transmission)."""
    if volume.ndim != 3 or volume.orientation != "RAS" or volume.intensity != "hu":
        raise DataError(
            f"a radiograph is projected from a CT volume in HU and RAS orientation; got a {volume.ndim}D "
            f"'{volume.intensity}' image with orientation {volume.orientation!r} (read it with radalign.data.io)"
        )
    hu = np.where(volume.array < OUTSIDE_FOV_HU, -1000.0, volume.array)
    mu = np.clip(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0.0, None)
    return mu.sum(axis=1, dtype=np.float64).astype(np.float32) * float(volume.spacing[1])


def to_pa_display(projection_xz: np.ndarray) -> np.ndarray:
    """(X, Z) with X towards the patient's right and Z superior -> (rows, cols) as a PA film is viewed."""
    return np.ascontiguousarray(projection_xz[::-1, ::-1].T)


def window_unit(values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    low, high = np.percentile(values, [low_pct, high_pct])
    return np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def project_pa(volume: Image, size: int | None = None) -> Image:
    """A PA radiograph of ``volume`` with square pixels; ``size`` = long side in px (None keeps resolution)."""
    line = to_pa_display(attenuation_line_integral(volume))
    row_mm, col_mm = float(volume.spacing[2]), float(volume.spacing[0])
    height_mm, width_mm = line.shape[0] * row_mm, line.shape[1] * col_mm
    pixel_mm = max(height_mm, width_mm) / size if size else min(row_mm, col_mm)
    shape = (max(1, round(height_mm / pixel_mm)), max(1, round(width_mm / pixel_mm)))
    tensor = torch.from_numpy(line)[None, None]
    resized = F.interpolate(tensor, size=shape, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    return Image(window_unit(resized), (pixel_mm, pixel_mm), Modality.XRAY, intensity="unit")
