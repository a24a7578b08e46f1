"""The simulated dataset: anatomy, finding insertion, radiograph geometry, files, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from radalign.data.manifest import load_manifest, load_regions
from radalign.data.simulate.anatomy import LOBES, load_anatomy
from radalign.data.simulate.findings import Finding
from radalign.data.simulate.generate import WORKING_SPACING, SimulationConfig, simulate
from radalign.data.simulate.lesions import Workspace, insert
from radalign.errors import ConfigError


@pytest.fixture(scope="module")
def workspace() -> Workspace:
    return Workspace(load_anatomy(WORKING_SPACING))


def test_anatomy_is_a_chest_in_ras(workspace):
    anatomy = workspace.anatomy
    assert anatomy.spacing == pytest.approx(WORKING_SPACING, rel=0.05)
    for lobe in LOBES:
        assert workspace.lobe(lobe).sum() > 1000, lobe
    heart_x = np.argwhere(workspace.structure("heart"))[:, 0].mean()
    right_x = np.argwhere(workspace.lungs("right"))[:, 0].mean()
    left_x = np.argwhere(workspace.lungs("left"))[:, 0].mean()
    assert right_x > heart_x > left_x  # RAS: X grows towards the patient's right; the heart sits left of centre
    assert anatomy.hu[workspace.lungs()].mean() < -600  # aerated lung
    assert anatomy.hu.min() >= -1025  # padding outside the scan circle is air, not -2048


@pytest.mark.parametrize("lobe", LOBES)
def test_nodule_lies_inside_its_lobe(workspace, lobe):
    rng = np.random.default_rng(1)
    hu = workspace.anatomy.hu.copy()
    finding = Finding(kind="nodule", side=lobe.split("_")[0], location=lobe, size_mm=14.0, certainty="definite")
    mask = insert(workspace, hu, finding, rng)
    assert mask.sum() > 50
    assert (mask & ~workspace.lobe(lobe)).sum() == 0
    assert hu[mask].mean() > -100  # soft tissue replaced aerated lung


def test_effusion_is_dependent_and_on_its_side(workspace):
    rng = np.random.default_rng(2)
    hu = workspace.anatomy.hu.copy()
    finding = Finding(kind="pleural_effusion", side="left", location="basal", severity="moderate", certainty="definite")
    mask = insert(workspace, hu, finding, rng)
    assert (mask & ~workspace.lungs("left")).sum() == 0
    lung_z = np.argwhere(workspace.lungs("left"))[:, 2]
    assert np.argwhere(mask)[:, 2].mean() < np.percentile(lung_z, 35)  # at the base


def test_cardiomegaly_enlarges_the_heart(workspace):
    rng = np.random.default_rng(3)
    hu = workspace.anatomy.hu.copy()
    finding = Finding(kind="cardiomegaly", side=None, location="heart", severity="moderate", certainty="definite")
    mask = insert(workspace, hu, finding, rng)
    heart = workspace.structure("heart")
    width = lambda m: np.ptp(np.argwhere(m)[:, 0])  # noqa: E731
    assert width(mask) > 1.15 * width(heart)
    assert (heart & ~mask).sum() < 0.01 * heart.sum()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    config = SimulationConfig(n=12, seed=7, size=96, with_3d=True, volume_spacing_mm=6.0, workers=1)
    simulate(config, out, progress=False)
    return out


def test_dataset_is_a_valid_manifest_with_regions(small_dataset):
    manifest = load_manifest(small_dataset / "manifest.csv", decode=True, require_report=True)
    assert not manifest.problems
    xray = [r for r in manifest.records if r.modality.value == "xray"]
    ct = [r for r in manifest.records if r.modality.value == "ct"]
    assert len(xray) == len(ct) == 12
    assert {"train"} <= {r.split for r in manifest.records}
    for record in xray:
        regions = load_regions(record.regions_path)
        positives = {k for k, v in record.labels.items() if v == 1}
        for region in regions:
            assert Path(region.mask_path).is_file()
        assert record.labels.get("no_finding") in (0, 1)
        if not regions:
            assert not positives - {"no_finding"}


def test_same_seed_gives_identical_files(small_dataset, tmp_path):
    config = SimulationConfig(n=12, seed=7, size=96, with_3d=True, volume_spacing_mm=6.0, workers=2)
    simulate(config, tmp_path, progress=False)

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "preview.png"
        }

    assert digests(tmp_path) == digests(small_dataset)


def test_left_right_convention_in_the_radiograph(tmp_path):
    """A left-sided effusion appears on the viewer's right of a PA film (the patient's left)."""
    prevalences = {k: 0.0 for k in ("nodule", "mass", "consolidation", "pneumothorax", "cardiomegaly",
                                    "atelectasis", "edema", "support_device")}  # fmt: skip
    prevalences["pleural_effusion"] = 1.0
    simulate(SimulationConfig(n=6, seed=3, size=96, prevalences=prevalences, normal_fraction=0.0, workers=1),
             tmp_path, progress=False)  # fmt: skip
    manifest = load_manifest(tmp_path / "manifest.csv")
    checked = 0
    for record in manifest.records:
        from radalign.data.io import read_image

        regions = {r.finding: r for r in load_regions(record.regions_path)}
        meta = json.loads(record.regions_path.read_text())["regions"]
        side = next(m["side"] for m in meta if m["finding"] == "pleural_effusion")
        mask = read_image(Path(regions["pleural_effusion"].mask_path)).array > 0.5
        centre_col = np.argwhere(mask)[:, 1].mean() / mask.shape[1]
        if side == "left":
            assert centre_col > 0.5 and "left" in record.report.lower()
            checked += 1
        elif side == "right":
            assert centre_col < 0.5 and "right" in record.report.lower()
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "positive"),
        ({"size": 0}, "at least 32"),
        ({"prevalences": {"unicorn": 0.5}}, "unicorn"),
        ({"prevalences": {"nodule": 1.5}}, "1.5"),
        ({"normal_fraction": -0.1}, r"\[0, 1\]"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**kwargs)


def test_every_finding_kind_has_2d_and_3d_masks_boxes_and_a_label(tmp_path):
    from radalign.data.io import read_image
    from radalign.data.simulate.findings import FINDING_KINDS
    from radalign.data.simulate.report import KIND_LABELS

    config = SimulationConfig(
        n=3, seed=5, size=96, with_3d=True, volume_spacing_mm=6.0, workers=1, normal_fraction=0.0,
        uncertain_fraction=0.0, prevalences=dict.fromkeys(FINDING_KINDS, 1.0),
    )  # fmt: skip
    simulate(config, tmp_path, progress=False)
    manifest = load_manifest(tmp_path / "manifest.csv")
    assert not manifest.problems
    for record in manifest.records:
        regions = json.loads(record.regions_path.read_text())["regions"]
        assert {r["kind"] for r in regions} == set(FINDING_KINDS), record.id
        assert all(r["finding"] == KIND_LABELS[r["kind"]][0] for r in regions)  # label keys, as DenseDataset needs
        for region in regions:
            mask = read_image(record.regions_path.parent / region["mask"]).array > 0.5
            assert mask.any(), (record.id, region["name"])
            if record.modality.value == "xray":
                x0, y0, x1, y1 = region["box"]
                rows, cols = np.nonzero(mask)
                assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            else:
                assert mask.shape == read_image(record.image_paths[0]).shape
                z0, z1 = region["slices"]
                assert np.flatnonzero(mask.any(axis=(0, 1)))[[0, -1]].tolist() == [z0, z1]
            for label in KIND_LABELS[region["kind"]]:
                assert record.labels[label] == 1, (record.id, region["kind"], label)
