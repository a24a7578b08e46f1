"""`radalign demo`: what radalign can do today, end to end on the CPU, with real shipped assets.

Until the pre-training engine lands, the demo runs the data pipeline: simulate a small paired X-ray / CT /
report dataset from the real chest CT, check it like user data, cache it with `prepare`, and stream
augmented, tokenised batches through the LightningDataModule, writing a contact sheet to look at.
"""

from __future__ import annotations

import time
from pathlib import Path

from radalign.utils.logging import get_logger


def run_demo(out: Path, n: int = 48) -> dict[str, float]:
    """Run the demo into ``out``; returns the timings (seconds) it printed."""
    from rich.console import Console

    from radalign.data.cache import CacheSettings, prepare_cache
    from radalign.data.datamodule import DataConfig, RadDataModule
    from radalign.data.manifest import load_manifest
    from radalign.data.simulate.generate import SimulationConfig, simulate
    from radalign.data.simulate.preview import contact_sheet
    from radalign.data.summary import print_summary, summarize

    console = Console()
    log = get_logger()
    out = Path(out)
    timings: dict[str, float] = {}
    data_dir = out / "data"

    console.rule("1. simulate a paired chest X-ray / CT / report dataset from a real chest CT")
    start = time.perf_counter()
    manifest_path = data_dir / "manifest.csv"
    config = SimulationConfig(n=n, seed=0, size=224, with_3d=True, volume_spacing_mm=4.0)
    if manifest_path.is_file() and (data_dir / "simulation.json").is_file():
        log.info(f"reusing the simulated data in {data_dir} (delete it to simulate again)")
    else:
        simulate(config, data_dir)
    timings["simulate"] = time.perf_counter() - start
    sheet = contact_sheet(data_dir, out / "preview.png", n=8)
    log.info(f"contact sheet of the data: {sheet}")

    console.rule("2. check it like any user dataset")
    manifest = load_manifest(manifest_path, require_report=True, decode=True, on_error="skip", progress=True)
    print_summary(manifest, summarize(manifest))

    console.rule("3. decode once into a training-resolution cache")
    start = time.perf_counter()
    report = prepare_cache(manifest.records, out / "cache", CacheSettings(size=256, spacing_mm=(4.0, 4.0, 4.0)))
    timings["prepare"] = time.perf_counter() - start
    log.info(f"cache: {report.written} decoded, {report.reused} reused, {len(report.failed)} failed")

    console.rule("4. stream augmented, tokenised batches (ConVIRT augmentations, the MiniLM tokenizer)")
    for modality in ("xray", "ct"):
        data = RadDataModule(
            DataConfig(
                manifest=manifest_path,
                cache_dir=out / "cache",
                modality=modality,  # type: ignore[arg-type]
                batch_size=8,
                image_size=224,
                volume_size=(64, 64, 64),
                volume_spacing_mm=(4.0, 4.0, 4.0),
                text_swap_p=0.4,
            )
        )
        data.setup("fit")
        start = time.perf_counter()
        batches = list(data.train_dataloader())
        seconds = time.perf_counter() - start
        timings[f"epoch_{modality}"] = seconds
        first = batches[0]
        samples = sum(b["batch_size"] for b in batches)
        log.info(
            f"{modality}: {len(batches)} batches, {samples} samples in {seconds:.1f} s; "
            f"image {tuple(first['image'].shape)}, tokens {tuple(first['input_ids'].shape)}, "
            f"sentences per report {first['n_sentences'].tolist()}"
        )
        log.info(f"  first report as the model sees it: {' | '.join(first['sentences'][0])}")
    console.rule("done")
    log.info(f"outputs in {out}: data/ (manifest, images, volumes, masks), cache/, preview.png")
    return timings
