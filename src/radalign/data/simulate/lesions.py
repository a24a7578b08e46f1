"""Insert findings into the working CT volume, in anatomically valid places, with their ground-truth masks.

Each inserter edits the HU volume in place and returns the finding's mask (bool, same grid). Placement uses
the organ labels: a nodule lies inside its lobe (never crossing a fissure), an effusion fills the dependent
base of one pleural space with a meniscus rising laterally, a pneumothorax replaces the apical/lateral lung
with air behind a visible pleural line, cardiomegaly enlarges the heart about its centre, edema raises lung
density around the hila, and devices are radiopaque tubes along the airway, oesophagus or veins.

Densities (HU) are textbook values; the radiograph shows them through the projection in drr.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from radalign.data.simulate.anatomy import Anatomy
from radalign.data.simulate.findings import Finding

SOFT_TISSUE_HU = 40.0
FLUID_HU = 10.0
AIR_HU = -1000.0
DEVICE_HU = 2500.0  # radiopaque stripe of tubes and catheters

_SEVERITY = {"small": 0.0, "mild": 0.0, "moderate": 0.5, "large": 1.0, "severe": 1.0, None: 0.5}


def _grade(finding: Finding) -> float:
    """Severity as a number in [0, 1] (small/mild 0, moderate 0.5, large/severe 1)."""
    return _SEVERITY.get(finding.severity, 0.5)


@dataclass
class Workspace:
    """Per-process precomputed views of the anatomy (masks, distance maps, coordinates in mm)."""

    anatomy: Anatomy
    _cache: dict = field(default_factory=dict)

    @cached_property
    def coords_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open-grid voxel centre coordinates in mm along X, Y, Z (broadcastable)."""
        sx, sy, sz = self.anatomy.spacing
        nx, ny, nz = self.anatomy.shape
        return (
            (np.arange(nx) * sx)[:, None, None],
            (np.arange(ny) * sy)[None, :, None],
            (np.arange(nz) * sz)[None, None, :],
        )

    def lobe(self, name: str) -> np.ndarray:
        return self._memo(("lobe", name), lambda: self.anatomy.mask(name))

    def lungs(self, side: str | None = None) -> np.ndarray:
        return self._memo(("lungs", side), lambda: self.anatomy.lungs(side))

    def structure(self, name: str) -> np.ndarray:
        return self._memo(("structure", name), lambda: self.anatomy.mask(name))

    def depth_mm(self, lobe: str) -> np.ndarray:
        """Distance (mm) from each voxel inside the lobe to the lobe's boundary: where a sphere of radius r fits."""
        return self._memo(
            ("depth", lobe), lambda: ndimage.distance_transform_edt(self.lobe(lobe), sampling=self.anatomy.spacing)
        )

    def centre(self, name: str) -> np.ndarray:
        """Centre of mass (voxel coordinates) of a structure, a lobe, or 'lungs_left' / 'lungs_right'."""

        def build() -> np.ndarray:
            if name.startswith("lungs_"):
                return np.array(ndimage.center_of_mass(self.lungs(name.removeprefix("lungs_"))))
            return np.array(ndimage.center_of_mass(self.structure(name)))

        return self._memo(("centre", name), build)

    def _memo(self, key: tuple, build: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def _random_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    candidates = np.flatnonzero(mask)
    if candidates.size == 0:
        raise ValueError("no voxel satisfies the placement constraint")
    return np.array(np.unravel_index(rng.choice(candidates), mask.shape))


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, sigma_vox: float) -> np.ndarray:
    """Smooth random field with zero mean and unit std (computed coarse, then upsampled: cheap)."""
    factor = max(1, int(sigma_vox // 2))
    coarse = tuple(max(2, n // factor) for n in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma=max(sigma_vox / factor, 0.5))
    tensor = torch.from_numpy(noise.astype(np.float32))[None, None]
    field_ = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def insert_nodule(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """A lobulated soft-tissue sphere of diameter size_mm, entirely inside its lobe."""
    radius = float(finding.size_mm or 10.0) / 2.0
    depth = ws.depth_mm(finding.location)
    fits = depth >= radius + 1.0
    if not fits.any():  # the lobe is thinner than the lesion: put it where the lobe is deepest
        fits = depth >= depth.max() * 0.8
    centre = _random_voxel(fits, rng) * np.asarray(ws.anatomy.spacing)
    x, y, z = ws.coords_mm
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    # lobulated outline: the radius varies smoothly with direction
    phase = rng.uniform(0, 2 * np.pi, 3)
    wobble = 1.0 + 0.12 * np.sin(3 * np.arctan2(dy, dx) + phase[0]) * np.cos(2 * np.arctan2(dz, dx) + phase[1])
    mask = (dist <= radius * wobble) & ws.lobe(finding.location)
    hu[mask] = SOFT_TISSUE_HU + rng.normal(0, 15, int(mask.sum()))
    return mask


def insert_consolidation(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Airspace opacity filling a patchy part of one lobe (a quarter to most of it, by severity)."""
    lobe = ws.lobe(finding.location)
    fraction = 0.3 + 0.45 * _grade(finding)
    field_ = _smooth_field(lobe.shape, rng, sigma_vox=6.0)
    threshold = np.quantile(field_[lobe], 1.0 - fraction)
    mask = lobe & (field_ >= threshold)
    hu[mask] = np.maximum(hu[mask], 25.0 + rng.normal(0, 20, int(mask.sum())))
    return mask


def insert_atelectasis(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Plate-like (discoid) atelectasis: a thin, nearly horizontal band of collapsed lung in the lobe."""
    lobe = ws.lobe(finding.location)
    centre = _random_voxel(ws.depth_mm(finding.location) >= 8.0, rng) * np.asarray(ws.anatomy.spacing)
    normal = np.array([rng.normal(0, 0.15), rng.normal(0, 0.15), 1.0])
    normal /= np.linalg.norm(normal)
    thickness = 5.0 + 6.0 * _grade(finding)
    x, y, z = ws.coords_mm
    distance = (x - centre[0]) * normal[0] + (y - centre[1]) * normal[1] + (z - centre[2]) * normal[2]
    lateral = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
    mask = lobe & (np.abs(distance) <= thickness / 2) & (lateral <= 35.0 + 25.0 * _grade(finding))
    hu[mask] = SOFT_TISSUE_HU + rng.normal(0, 15, int(mask.sum()))
    return mask


def insert_effusion(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Dependent pleural fluid at the lung base(s), with a meniscus that rises towards the lateral chest wall.

    The fluid fraction falls off over a few millimetres above the meniscus, so the upper border is soft on the
    radiograph as in a real effusion (and shows no slice staircase).
    """
    sides = ("left", "right") if finding.side == "bilateral" else (finding.side,)
    sz = ws.anatomy.spacing[2]
    x, _, z = ws.coords_mm
    levels = {}
    for side in sides:
        zs = np.flatnonzero(ws.lungs(side).any(axis=(0, 1))) * sz
        levels[side] = zs.min() + np.ptp(zs) * (0.12 + 0.3 * _grade(finding) + rng.uniform(-0.02, 0.03))
    # only the slab below the highest meniscus can hold fluid: work there (much less than the whole volume)
    top = min(hu.shape[2], int(np.ceil((max(levels.values()) + 30.0 + 8.0) / sz)) + 1)
    fraction = np.zeros((*hu.shape[:2], top), dtype=np.float32)
    for side in sides:
        lung = ws.lungs(side)[:, :, :top]
        xs = np.flatnonzero(ws.lungs(side).any(axis=(1, 2))) * ws.anatomy.spacing[0]
        lateral_edge = xs.max() if side == "right" else xs.min()  # RAS: right = high X
        lateralness = 1.0 - np.abs(x - lateral_edge) / max(np.ptp(xs), 1.0)
        meniscus = levels[side] + 30.0 * np.clip(lateralness, 0, 1) ** 3
        fraction = np.maximum(fraction, lung * np.clip((meniscus - z[:, :, :top]) / 8.0 + 0.5, 0.0, 1.0))
    slab = hu[:, :, :top]
    touched = fraction > 0
    weight = fraction[touched]
    fluid = FLUID_HU + rng.normal(0, 8, weight.size).astype(np.float32)
    slab[touched] = slab[touched] * (1 - weight) + fluid * weight
    mask = np.zeros(hu.shape, dtype=bool)
    mask[:, :, :top] = fraction >= 0.5
    return mask


def insert_pneumothorax(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Air between the chest wall and a lung collapsed towards its hilum, behind a thin visceral pleural line.

    The collapsed lung is the lung shrunk about its hilum (laterally everywhere, downwards above the hilum), so
    the pleural line runs parallel to the chest wall and is curved like a real one, widest at the apex.
    """
    side = finding.side if finding.side in ("left", "right") else "right"
    lung = ws.lungs(side)
    grade = _grade(finding)
    centre = ws.centre(f"lungs_{side}")
    hilum_x = centre[0] + (-0.25 if side == "right" else 0.25) * np.ptp(np.flatnonzero(lung.any(axis=(1, 2))))
    hilum_z = centre[2]
    shrink_x = 1.0 - (0.12 + 0.22 * grade) * rng.uniform(0.85, 1.15)
    shrink_z = 1.0 - (0.15 + 0.25 * grade) * rng.uniform(0.85, 1.15)
    x = np.arange(lung.shape[0])
    z = np.arange(lung.shape[2])
    px = np.clip(np.rint(hilum_x + (x - hilum_x) / shrink_x), 0, lung.shape[0] - 1).astype(int)
    pz = np.where(z > hilum_z, hilum_z + (z - hilum_z) / shrink_z, z)
    pz = np.clip(np.rint(pz), 0, lung.shape[2] - 1).astype(int)
    collapsed = lung[np.ix_(px, np.arange(lung.shape[1]), pz)] & lung
    mask = lung & ~collapsed
    pleural_line = collapsed & ndimage.binary_dilation(mask, iterations=1)
    hu[mask] = AIR_HU  # no lung markings beyond the pleural line
    hu[pleural_line] = np.maximum(hu[pleural_line], -200.0)
    hu[collapsed] = hu[collapsed] + 60.0 * grade  # the collapsed lung is a little denser
    return mask


def insert_cardiomegaly(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Enlarge the heart about its centre (mostly transversely); the grown heart displaces lung, not bone."""
    heart = ws.structure("heart")
    factor = 1.2 + 0.25 * _grade(finding) + rng.uniform(0, 0.05)
    scale = np.array([factor, factor * 0.9, 1.0 + (factor - 1.0) * 0.4])
    centre = ws.centre("heart")
    x, y, z = (np.arange(n) for n in heart.shape)
    # inverse mapping: a voxel is heart after enlargement if its pre-image is heart
    px = np.clip(np.rint(centre[0] + (x - centre[0]) / scale[0]), 0, heart.shape[0] - 1).astype(int)
    py = np.clip(np.rint(centre[1] + (y - centre[1]) / scale[1]), 0, heart.shape[1] - 1).astype(int)
    pz = np.clip(np.rint(centre[2] + (z - centre[2]) / scale[2]), 0, heart.shape[2] - 1).astype(int)
    grown = heart[np.ix_(px, py, pz)] | heart  # the heart is not convex: scaling alone can uncover a notch
    replaceable = grown & (hu < 150.0)  # never paint over bone
    hu[replaceable & ~heart] = SOFT_TISSUE_HU + rng.normal(0, 10, int((replaceable & ~heart).sum()))
    return grown


def insert_edema(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar haze: lung density raised most near the hila, fading towards the periphery."""
    lungs = ws.lungs()
    hilum_z = ws.centre("heart")[2] * ws.anatomy.spacing[2] + 30.0
    x, y, z = ws.coords_mm
    weight = np.zeros(hu.shape, dtype=np.float32)
    for side in ("left", "right"):
        lung = ws.lungs(side)
        cx, cy, _ = ws.centre(f"lungs_{side}") * np.asarray(ws.anatomy.spacing)
        medial = cx + (-25.0 if side == "right" else 25.0)  # hilum sits medial to the lung's centre
        d = np.sqrt((x - medial) ** 2 + (y - cy) ** 2 + ((z - hilum_z) * 0.8) ** 2)
        weight = np.maximum(weight, np.exp(-d / 55.0) * lung)
    amplitude = 220.0 + 260.0 * _grade(finding)
    hu[lungs] = np.minimum(hu[lungs] + amplitude * weight[lungs] * (1 + 0.1 * rng.standard_normal()), -100.0)
    return lungs & (weight >= 0.35)


def _centreline(mask: np.ndarray, z_from: int, z_to: int) -> list[np.ndarray]:
    points = []
    for k in range(z_from, z_to - 1, -1) if z_from > z_to else range(z_from, z_to + 1):
        xs, ys = np.nonzero(mask[:, :, k])
        if xs.size:
            points.append(np.array([xs.mean(), ys.mean(), k], dtype=float))
    return points


def _draw_tube(hu: np.ndarray, points: list[np.ndarray], radius_vox: float = 1.0) -> np.ndarray:
    """Burn a tube of ``radius_vox`` (in the axial plane) along the polyline through ``points``."""
    path = np.asarray(points, dtype=float)  # (P, 3)
    lengths = np.linalg.norm(np.diff(path, axis=0), axis=1)
    position = np.concatenate([[0.0], np.cumsum(lengths)])
    samples = np.linspace(0.0, position[-1], max(2, int(np.ceil(position[-1] * 2))))  # every half voxel
    dense = np.stack([np.interp(samples, position, path[:, axis]) for axis in range(3)], axis=1)  # (N, 3)
    r = int(np.ceil(radius_vox))
    dx, dy = np.mgrid[-r : r + 1, -r : r + 1]
    disc = np.stack([dx.ravel(), dy.ravel(), np.zeros(dx.size)], axis=1)[(dx**2 + dy**2).ravel() <= radius_vox**2 + 0.5]
    voxels = np.rint(dense[:, None, :] + disc[None]).reshape(-1, 3).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(hu.shape)), axis=1)
    mask = np.zeros(hu.shape, dtype=bool)
    mask[tuple(voxels[inside].T)] = True
    hu[mask] = DEVICE_HU
    return mask


def insert_device(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """A tube or line along the airway, oesophagus or veins, ending where it should."""
    top = hu.shape[2] - 1
    sz = ws.anatomy.spacing[2]
    device = finding.device or "endotracheal tube"
    if device == "endotracheal tube":
        trachea = ws.structure("trachea")
        carina = int(np.flatnonzero(trachea.any(axis=(0, 1))).min())
        tip_mm = 10.0 * finding.tip_cm if finding.tip_cm else rng.uniform(30, 60)  # the report states the tip
        tip = carina + round(tip_mm / sz)
        points = _centreline(trachea, top, min(tip, top))
    elif device == "nasogastric tube":
        oesophagus = ws.structure("esophagus")
        bottom = int(np.flatnonzero(oesophagus.any(axis=(0, 1))).min())
        points = _centreline(oesophagus, top, bottom)
        stomach = ws.centre("stomach")
        points.append(stomach)
    else:  # central venous catheter: from the (right or left) subclavian region into the superior vena cava
        svc = ws.structure("superior_vena_cava")
        zs = np.flatnonzero(svc.any(axis=(0, 1)))
        tip = int(zs.min()) + round(rng.uniform(0, 15) / sz)
        path = _centreline(svc, int(zs.max()), tip)
        side = finding.side if finding.side in ("left", "right") else "right"
        lung = ws.lungs(side)
        xs = np.flatnonzero(lung.any(axis=(1, 2)))
        entry_x = np.percentile(xs, 85 if side == "right" else 15)
        entry = np.array([entry_x, path[0][1] - 10, min(top, int(zs.max()) + 8)])
        points = [entry, *path]
    return _draw_tube(hu, points, radius_vox=1.0)


INSERTERS: dict[str, Callable[[Workspace, np.ndarray, Finding, np.random.Generator], np.ndarray]] = {
    "nodule": insert_nodule,
    "mass": insert_nodule,
    "consolidation": insert_consolidation,
    "atelectasis": insert_atelectasis,
    "pleural_effusion": insert_effusion,
    "pneumothorax": insert_pneumothorax,
    "cardiomegaly": insert_cardiomegaly,
    "edema": insert_edema,
    "support_device": insert_device,
}


def insert(ws: Workspace, hu: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Insert one finding into ``hu`` (edited in place) and return its ground-truth mask."""
    if finding.kind not in INSERTERS:
        raise KeyError(f"no inserter for finding kind {finding.kind!r}; known: {sorted(INSERTERS)}")
    return INSERTERS[finding.kind](ws, hu, finding, rng)
