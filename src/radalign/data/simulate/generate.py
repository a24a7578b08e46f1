"""Generate the simulated dataset: patient variant -> findings -> X-ray (and CT) -> masks, boxes -> report, labels.

Speed comes from one design choice: a patient variant's deformation acts in the coronal (X, Z) plane and is
constant along the anterior-posterior axis (plus an A-P thickness scale). Projection along A-P then commutes
with the deformation, so the radiograph is deformed in 2D after projecting the undeformed, edited volume, and
the 3D deformation (only needed when volumes are written) is the same field broadcast along Y: the X-ray, the
CT and all masks stay consistent while a 2D-only sample never resamples a volume.

Every sample draws from its own generator seeded by (seed, index), so results do not depend on the number of
worker processes or their scheduling.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from radalign.data.schema import Image, Modality
from radalign.data.simulate.anatomy import load_anatomy
from radalign.data.simulate.drr import attenuation_line_integral, to_pa_display
from radalign.data.simulate.findings import Finding, sample_findings, validate_prevalences
from radalign.data.simulate.lesions import Workspace, insert
from radalign.data.simulate.report import KIND_LABELS, finding_phrase, write_report
from radalign.errors import ConfigError

WORKING_SPACING = (2.0, 2.0, 2.5)  # mm: the source CT's slice spacing is 2.5 mm, finer X/Y buys nothing at 224 px


@dataclass(frozen=True)
class SimulationConfig:
    n: int = 200
    seed: int = 0
    size: int = 224  # radiograph side (px)
    with_3d: bool = False
    reports: bool = True  # False: an image-label dataset (labels, no report column), as CheXpert is to MIMIC-CXR
    volume_spacing_mm: float = 3.0  # isotropic spacing of the written CT volumes
    prevalences: Mapping[str, float] | None = None  # None = the defaults of simulate.findings
    normal_fraction: float = 0.3
    uncertain_fraction: float = 0.1
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    image_format: Literal["png", "dicom"] = "png"
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ConfigError(f"simulate: n must be a positive number of samples, got {self.n}")
        if self.size < 32:
            raise ConfigError(f"simulate: size must be at least 32 px, got {self.size}")
        if self.volume_spacing_mm <= 0:
            raise ConfigError(f"simulate: volume_spacing_mm must be positive, got {self.volume_spacing_mm}")
        for name in ("normal_fraction", "uncertain_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"simulate: {name} must be in [0, 1], got {value}")
        if len(self.splits) != 3 or any(s < 0 for s in self.splits) or not math.isclose(sum(self.splits), 1.0):
            raise ConfigError(f"simulate: splits must be 3 non-negative fractions summing to 1, got {self.splits}")
        if self.image_format not in ("png", "dicom"):
            raise ConfigError(f"simulate: image_format must be 'png' or 'dicom', got {self.image_format!r}")
        if self.prevalences is not None:
            validate_prevalences(self.prevalences)


@dataclass
class Variant:
    """One patient's deformation: a 2D field on the coronal plane plus an A-P thickness scale."""

    theta: np.ndarray  # (2, 3) affine in normalised coordinates, output -> input
    displacement: np.ndarray  # (2, h, w) smooth elastic offset in normalised coordinates, on a coarse grid
    ap_scale: float
    exposure: tuple[float, float, float]  # window low / high percentiles and gamma
    noise: float


def sample_variant(rng: np.random.Generator) -> Variant:
    angle = math.radians(rng.uniform(-4, 4))
    sx, sz = rng.uniform(0.9, 1.1), rng.uniform(0.92, 1.08)  # body habitus: width and height
    tx, tz = rng.uniform(-0.04, 0.04, 2)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = np.array([[cos / sx, -sin / sx, tx], [sin / sz, cos / sz, tz]], dtype=np.float32)
    displacement = rng.normal(0.0, 0.02, size=(2, 5, 5)).astype(np.float32)  # ~4 mm, smooth after upsampling
    exposure = (rng.uniform(0.2, 1.5), rng.uniform(99.0, 99.9), rng.uniform(0.8, 1.25))
    return Variant(theta, displacement, float(rng.uniform(0.88, 1.12)), exposure, float(rng.uniform(0.006, 0.02)))


def deform_points(variant: Variant, points: torch.Tensor) -> torch.Tensor:
    """Map output points to input points, both (..., 2) as (column, row) normalised over a square field of view."""
    theta = torch.from_numpy(variant.theta)
    mapped = points @ theta[:, :2].T + theta[:, 2]
    flat = points.reshape(1, 1, -1, 2)
    field_ = torch.from_numpy(variant.displacement)[None]  # (1, 2, 5, 5), smooth once interpolated
    elastic = F.grid_sample(field_, flat, mode="bicubic", padding_mode="border", align_corners=True)
    return mapped + elastic[0, :, 0].T.reshape(points.shape)


def _sampling_grid(variant: Variant, size: int, in_hw_mm: tuple[float, float]) -> torch.Tensor:
    """grid_sample grid for a square ``size`` x ``size`` output over the display image of extent ``in_hw_mm``."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    mapped = deform_points(variant, torch.stack([xs, ys], dim=-1))
    side_mm = max(in_hw_mm)  # the output is square, the input is not: both must span the same millimetres
    mapped[..., 0] *= side_mm / in_hw_mm[1]
    mapped[..., 1] *= side_mm / in_hw_mm[0]
    return mapped[None]  # (1, size, size, 2)


def _warp(image: np.ndarray, grid: torch.Tensor, mode: str = "bilinear") -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.grid_sample(tensor, grid, mode=mode, padding_mode="zeros", align_corners=False)[0, 0].numpy()


def render_radiograph(line: np.ndarray, variant: Variant, rng: np.random.Generator) -> np.ndarray:
    """Log-domain projection (display orientation, already warped) -> exposure, gamma, noise -> [0, 1]."""
    low, high = np.percentile(line, [variant.exposure[0], variant.exposure[1]])
    image = np.clip((line - low) / max(high - low, 1e-6), 0.0, 1.0) ** variant.exposure[2]
    image = image + rng.normal(0.0, variant.noise, image.shape) * np.sqrt(0.25 + image)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _box(mask: np.ndarray) -> list[int] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


@dataclass
class SampleResult:
    index: int
    rows: list[dict[str, Any]] = field(default_factory=list)


_WORKSPACE: Workspace | None = None


def _workspace() -> Workspace:
    global _WORKSPACE
    if _WORKSPACE is None:
        _WORKSPACE = Workspace(load_anatomy(WORKING_SPACING))
    return _WORKSPACE


def finding_names(findings: list[Finding]) -> list[str]:
    """Unique names per finding (a second nodule becomes 'nodule_2')."""
    names, counts = [], {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
        names.append(f.kind if counts[f.kind] == 1 else f"{f.kind}_{counts[f.kind]}")
    return names


def simulate_one(index: int, config: SimulationConfig, out: Path) -> SampleResult:
    """Make sample ``index``: write its files under ``out`` and return its manifest rows."""
    from radalign.data import io

    ws = _workspace()
    rng = np.random.default_rng([config.seed, index])
    findings = sample_findings(
        rng,
        prevalences=config.prevalences,
        normal_fraction=config.normal_fraction,
        uncertain_fraction=config.uncertain_fraction,
    )
    hu = ws.anatomy.hu.copy()
    masks3d = [insert(ws, hu, finding, rng) for finding in findings]
    names = finding_names(findings)
    variant = sample_variant(rng)
    volume = Image(hu, ws.anatomy.spacing, Modality.CT, intensity="hu", orientation="RAS")
    display = to_pa_display(attenuation_line_integral(volume)) * variant.ap_scale
    sx, _, sz = ws.anatomy.spacing
    in_mm = (display.shape[0] * sz, display.shape[1] * sx)
    grid = _sampling_grid(variant, config.size, in_mm)
    radiograph = render_radiograph(_warp(display, grid), variant, rng)
    sample_id = f"sim{config.seed}-{index:05d}"
    report = write_report(findings, rng)
    split = _split(rng, config.splits)
    phrases = [finding_phrase(report, i, f.kind) for i, f in enumerate(findings)]  # grounding's text per mask

    regions = []
    for name, finding, mask, phrase in zip(names, findings, masks3d, phrases, strict=True):
        projected = to_pa_display(mask.any(axis=1).astype(np.float32))
        mask2d = _warp(projected, grid) >= 0.5
        mask_file = f"masks/{sample_id}_{name}.png"
        io.write_png16(out / mask_file, mask2d.astype(np.float32))
        regions.append(
            {
                "finding": KIND_LABELS[finding.kind][0],  # the label key, as every region file uses
                "kind": finding.kind,
                "name": name,
                "box": _box(mask2d),
                "mask": f"../{mask_file}",  # relative to the regions file
                "side": finding.side,
                "location": finding.location,
                "size_mm": finding.size_mm,
                "severity": finding.severity,
                "certainty": finding.certainty,
                "phrase": phrase,
            }
        )
    pixel_mm = max(in_mm) / config.size
    image_file = f"images/{sample_id}.{'png' if config.image_format == 'png' else 'dcm'}"
    if config.image_format == "png":
        io.write_png16(out / image_file, radiograph)
    else:
        io.write_dicom_2d(out / image_file, radiograph, spacing=(pixel_mm, pixel_mm), view="PA")
    (out / "regions").mkdir(exist_ok=True)
    region_file = f"regions/{sample_id}.json"
    (out / region_file).write_text(json.dumps({"regions": regions}, indent=1), encoding="utf-8")
    base_row = {"split": split, "patient": sample_id, "pixel_mm": round(pixel_mm, 4)}
    if config.reports:
        base_row["report"] = report.text
    base_row.update({f"label_{k}": v for k, v in report.labels.items()})
    rows = [{"id": f"{sample_id}-cxr", "image": image_file, "modality": "xray", "view": "PA",
             "regions": region_file, **base_row}]  # fmt: skip
    if config.with_3d:
        rows.append(_write_volume(ws, hu, masks3d, findings, phrases, variant, config, out, sample_id, base_row))
    return SampleResult(index, rows)


def _split(rng: np.random.Generator, fractions: tuple[float, float, float]) -> str:
    u = rng.uniform()
    return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1] else "test")


def _write_volume(
    ws: Workspace,
    hu: np.ndarray,
    masks: list[np.ndarray],
    findings: list[Finding],
    phrases: list[str | None],
    variant: Variant,
    config: SimulationConfig,
    out: Path,
    sample_id: str,
    base_row: dict[str, Any],
) -> dict[str, Any]:
    """Deform the volume with the patient's coronal field (constant along Y) and write it with its masks."""
    from radalign.data import io

    spacing = ws.anatomy.spacing
    extent = [n * s for n, s in zip(hu.shape, spacing, strict=True)]
    shape = tuple(max(8, round(e / config.volume_spacing_mm)) for e in extent)
    side = max(extent[0], extent[2])  # the square field of view of the radiograph, in mm
    x_n = torch.linspace(-1, 1, shape[0])[:, None].expand(shape[0], shape[2])
    z_n = torch.linspace(-1, 1, shape[2])[None, :].expand(shape[0], shape[2])
    # display columns run against X (patient's right on the viewer's left) and rows against Z (head at the top)
    display = torch.stack([-x_n * extent[0] / side, -z_n * extent[2] / side], dim=-1)
    mapped = deform_points(variant, display)  # (X, Z, 2)
    source_x = -mapped[..., 0] * side / extent[0]
    source_z = -mapped[..., 1] * side / extent[2]
    y_n = torch.linspace(-1, 1, shape[1]) / variant.ap_scale  # a thicker patient samples a compressed source
    grid = torch.stack(  # grid_sample 3D takes (W, H, D) = (Z, Y, X) coordinates for an (X, Y, Z) volume
        [
            source_z[:, None, :].expand(*shape),
            y_n[None, :, None].expand(*shape),
            source_x[:, None, :].expand(*shape),
        ],
        dim=-1,
    )[None]
    volume = torch.from_numpy(hu)[None, None]
    deformed = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    out_spacing = tuple(e / n for e, n in zip(extent, shape, strict=True))
    (out / "volumes").mkdir(exist_ok=True)
    volume_file = f"volumes/{sample_id}.nii.gz"
    io.write_nifti(out / volume_file, Image(deformed.numpy(), out_spacing, Modality.CT, "hu", "RAS"))
    regions = []
    for name, finding, mask, phrase in zip(finding_names(findings), findings, masks, phrases, strict=True):
        warped = F.grid_sample(torch.from_numpy(mask.astype(np.float32))[None, None], grid, align_corners=False)
        mask_file = f"volumes/{sample_id}_{name}.nii.gz"
        io.write_nifti(
            out / mask_file,
            Image((warped[0, 0] >= 0.5).numpy().astype(np.float32), out_spacing, Modality.CT, "raw", "RAS"),
        )
        z = np.flatnonzero((warped[0, 0] >= 0.5).any(dim=0).any(dim=0).numpy())
        regions.append(
            {
                "finding": KIND_LABELS[finding.kind][0],  # the label key, as every region file uses
                "kind": finding.kind,
                "name": name,
                "mask": f"../{mask_file}",
                "side": finding.side,
                "location": finding.location,
                "slices": [int(z.min()), int(z.max())] if z.size else None,  # axial slice range in this volume
                "phrase": phrase,
            }
        )
    region_file = f"regions/{sample_id}-ct.json"
    (out / region_file).write_text(json.dumps({"regions": regions}, indent=1), encoding="utf-8")
    return {"id": f"{sample_id}-ct", "image": volume_file, "modality": "ct", "view": "AXIAL",
            "regions": region_file, **base_row}  # fmt: skip


def simulate(config: SimulationConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Generate ``config.n`` samples into ``out`` and write ``out/manifest.csv``; returns the manifest path."""
    import pandas as pd

    out = Path(out)
    for folder in ("images", "masks", "regions"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    load_anatomy(WORKING_SPACING)  # build the anatomy cache once, before workers race to it
    workers = config.workers if config.workers is not None else min(4, os.cpu_count() or 1)
    results: list[SampleResult] = []
    indices = range(config.n)
    if workers <= 1:
        iterator = (simulate_one(i, config, out) for i in indices)
        results = list(_track(iterator, config.n, progress))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = pool.map(simulate_one, indices, [config] * config.n, [out] * config.n, chunksize=4)
            results = list(_track(futures, config.n, progress))
    rows = [row for result in sorted(results, key=lambda r: r.index) for row in result.rows]
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    (out / "simulation.json").write_text(json.dumps(_config_json(config), indent=2), encoding="utf-8")
    return manifest


def _config_json(config: SimulationConfig) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(config)
    data["prevalences"] = dict(config.prevalences) if config.prevalences else None
    data.pop("workers")
    return data


def _track(iterator: Any, total: int, enabled: bool) -> Any:
    if not enabled:
        return iterator
    from rich.progress import track

    return track(iterator, total=total, description="simulating")
