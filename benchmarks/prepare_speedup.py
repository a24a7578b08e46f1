"""How much `radalign prepare` saves per training access: decode a DICOM and resize it, vs read the cache.

Writes N synthetic radiographs as DICOM at a typical detector size (uncompressed and JPEG 2000), then times
(a) decode + resize to the training resolution, as a pipeline without a cache does on every access, and
(b) loading the prepared cache entry. Prints a table with the speed-up.

    .venv/bin/python benchmarks/prepare_speedup.py [--n 24] [--pixels 2048] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless

from radalign.data.cache import CacheSettings, PreparedCache, prepare_cache, resize_image
from radalign.data.io import read_image, write_dicom_2d
from radalign.data.schema import Modality, Record


def synthetic_radiograph(rng: np.random.Generator, pixels: int) -> np.ndarray:
    """Smooth structure plus noise: compresses like a real radiograph, unlike white noise."""
    y, x = np.mgrid[0:pixels, 0:pixels] / pixels
    base = 0.5 + 0.3 * np.sin(6 * x + rng.uniform(0, 6)) * np.cos(4 * y + rng.uniform(0, 6))
    return np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--pixels", type=int, default=2048)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for syntax in ("explicit VR little endian", "JPEG 2000 lossless"):
            records = []
            for i in range(args.n):
                path = root / f"{syntax[:4]}_{i}.dcm"
                write_dicom_2d(path, synthetic_radiograph(rng, args.pixels), spacing=(0.14, 0.14))
                if syntax.startswith("JPEG"):
                    ds = pydicom.dcmread(path)
                    ds.compress(JPEG2000Lossless)
                    ds.save_as(path)
                records.append(Record(id=f"{syntax[:4]}{i}", image_paths=(path,), modality=Modality.XRAY))
            settings = CacheSettings(size=args.size)
            start = time.perf_counter()
            for record in records:
                resize_image(read_image(record.image_path), settings)
            decode = (time.perf_counter() - start) / len(records)
            prepare_cache(records, root / f"cache_{syntax[:4]}", settings, workers=1, progress=False)
            cache = PreparedCache(root / f"cache_{syntax[:4]}")
            passes = []
            for _ in range(5):  # one pass of 24 sub-millisecond reads is at the mercy of the scheduler: median of 5
                start = time.perf_counter()
                for record in records:
                    assert cache.get(record) is not None
                passes.append((time.perf_counter() - start) / len(records))
            cached = statistics.median(passes)
            rows.append((syntax, decode * 1000, cached * 1000, decode / cached))
    print(f"\n{args.n} radiographs of {args.pixels}x{args.pixels} px, cached with short side {args.size} px")
    print(f"| {'DICOM transfer syntax':<28} | decode+resize (ms) | cached read (ms) | speed-up |")
    print(f"|{'-' * 30}|-------------------:|-----------------:|---------:|")
    for syntax, d, c, ratio in rows:
        print(f"| {syntax:<28} | {d:>18.1f} | {c:>16.2f} | {ratio:>7.0f}x |")


if __name__ == "__main__":
    main()
