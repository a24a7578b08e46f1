"""Decode every image once and cache it at training resolution (``radalign prepare``).

DICOM decoding (JPEG 2000 especially) and resizing a 3000 px radiograph cost far more than a training step
needs, so they are done once: 2D images are resized so the short side is ``size`` px (aspect kept; random
crops happen later), volumes are resampled to ``spacing_mm``. Each image becomes one ``.npy`` file, named by
a hash of the record id, the image's position and its source path, so two records never share a file whatever
their ids (``pat/1``, ``pat_1`` and ``pat 1`` are three files). ``index.json`` records what each entry was made
from (id, source path, size, mtime) and a checksum of its pixels; a hit is served only when all of them match the
record asking, so a changed source file is decoded again and a damaged entry is never served.

Storage dtypes: float16 for [0, 1] radiographs, int16 for CT in HU (1 HU steps), float32 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from radalign.data.schema import Image, Modality, Record
from radalign.errors import DataError

INDEX_FILE = "index.json"
SAVE_EVERY_S = 30.0  # `prepare` saves its index this often, so a crash keeps the decoded work
# 2: collision-free file names and per-entry checksums (1 let ids like pat/1 and pat_1 share one file)
FORMAT_VERSION = 2


@dataclass(frozen=True)
class CacheSettings:
    size: int = 256  # 2D: short side in px after resizing
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)  # 3D: voxel spacing after resampling

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise DataError(f"cache size must be a positive number of pixels, got {self.size}")
        if len(self.spacing_mm) != 3 or any(s <= 0 for s in self.spacing_mm):
            raise DataError(f"cache spacing_mm must be 3 positive numbers (mm), got {self.spacing_mm}")


def _source_key(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def resize_image(image: Image, settings: CacheSettings) -> Image:
    """2D: short side to ``settings.size`` (antialiased); 3D: resample to ``settings.spacing_mm``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None, None]
    if image.ndim == 2:
        h, w = image.shape
        scale = settings.size / min(h, w)
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
        out = F.interpolate(tensor, size=new, mode="bilinear", antialias=True, align_corners=False)
        spacing = tuple(s * o / n for s, o, n in zip(image.spacing, image.shape, new, strict=True))
    else:
        new = tuple(
            max(1, round(n * s / t)) for n, s, t in zip(image.shape, image.spacing, settings.spacing_mm, strict=True)
        )
        out = F.interpolate(tensor, size=new, mode="trilinear", align_corners=False)
        spacing = tuple(float(s * o / n) for s, o, n in zip(image.spacing, image.shape, new, strict=True))
    return Image(
        array=out[0, 0].numpy(),
        spacing=tuple(float(s) for s in spacing),
        modality=image.modality,
        intensity=image.intensity,
        orientation=image.orientation,
    )


def _storage_dtype(intensity: str) -> np.dtype:
    return np.dtype({"unit": np.float16, "hu": np.int16}.get(intensity, np.float32))


def _entry_name(record_id: str, index: int, source: Path) -> str:
    """A file name no other (record, image) can have: a readable prefix for people, a hash of the id, the
    image's position and the resolved source path for uniqueness."""
    identity = f"{record_id}\0{index}\0{source.resolve()}".encode()
    digest = hashlib.sha256(identity).hexdigest()[:24]
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id)[:40]
    return f"{readable}.{index}-{digest}.npy"


def _checksum(array: np.ndarray) -> str:
    # CRC-32 catches damaged files (flipped bits, truncation) at ~2 GB/s with no copy; it is read on every cache
    # hit, and a cryptographic hash (4x slower here) would guard nothing more: whoever can write the files can
    # write the index too
    return f"crc32:{zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B')):08x}"


def _prepare_one(
    args: tuple[str, int, str, str, CacheSettings, str],
) -> tuple[str, dict[str, Any] | None, str | None]:
    record_id, index, source, declared, settings, root = args
    from radalign.data.io import read_image

    key = f"{record_id}#{index}"
    try:
        image = resize_image(read_image(Path(source), expect=declared), settings)
        array = image.array
        if image.intensity == "hu":
            array = np.clip(np.rint(array), -32768, 32767)
        name = _entry_name(record_id, index, Path(source))
        stored = array.astype(_storage_dtype(image.intensity))
        np.save(Path(root) / "images" / name, stored)
        entry = {
            "file": name,
            "id": record_id,
            "index": index,
            "shape": list(stored.shape),
            "checksum": _checksum(stored),
            "source": _source_key(Path(source)),
            "spacing": list(image.spacing),
            "modality": image.modality.value,
            "declared": declared,
            "intensity": image.intensity,
            "orientation": image.orientation,
        }
        return key, entry, None
    except (DataError, OSError, MemoryError) as err:  # MemoryError: an image too large for this machine
        return key, None, str(err)


@dataclass
class PrepareReport:
    written: int = 0
    reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # "id#index" -> reason
    seconds: float = 0.0


class PreparedCache:
    """Read side of the cache: the decoded, resized image of a record, or None when absent, stale or damaged.

    ``stale`` counts entries whose source changed after `prepare`; ``damaged`` those whose file is missing or
    does not hold the pixels `prepare` wrote (both are decoded from the source instead)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise DataError(
                f"{self.root} is not a radalign image cache (no {INDEX_FILE}); create it with "
                f"`radalign prepare --data MANIFEST --out {self.root}`"
            )
        payload = json.loads(index_path.read_text(encoding="utf-8"))
        if payload.get("version") != FORMAT_VERSION:
            settings = payload.get("settings") or {}
            raise DataError(
                f"cache {self.root} was written in format {payload.get('version')} and this radalign reads format "
                f"{FORMAT_VERSION} (format 1 could give two records one file); rebuild it in place with `radalign "
                f"prepare --data MANIFEST --out {self.root} --size {settings.get('size', 256)} --spacing_mm "
                f'"{list(settings.get("spacing_mm", [1.5, 1.5, 1.5]))}"`'
            )
        self.settings = CacheSettings(payload["settings"]["size"], tuple(payload["settings"]["spacing_mm"]))
        self.entries: dict[str, dict[str, Any]] = payload["entries"]
        self.stale = 0
        self.damaged = 0

    def check_covers(self, image_size: int, where: str) -> None:
        """A 2D cache resized below the size asked for would be upsampled: blurrier images under the same name."""
        from radalign.errors import ConfigError

        if self.settings.size < image_size:
            raise ConfigError(
                f"{where}: the cache {self.root} holds radiographs resized to {self.settings.size} px (short side) and "
                f"{image_size} px are asked for, so every image would be upsampled. Prepare a cache at that size "
                f"(`radalign prepare --data MANIFEST --out CACHE --size {image_size}`), or leave the cache out"
            )

    def get(self, record: Record, index: int = 0) -> Image | None:
        entry = self.entries.get(f"{record.id}#{index}")
        if entry is None:
            return None
        source = record.image_paths[index]
        try:
            if _source_key(source) != entry["source"]:
                self.stale += 1  # the source changed after `prepare`: decode it again rather than serve old pixels
                return None
        except OSError:
            return None
        if entry.get("declared") != record.modality.value:
            self.stale += 1  # the row's modality changed since `prepare`: decode (and check) it afresh
            return None
        expected = _entry_name(record.id, index, source)
        if (entry["id"], entry["index"]) != (record.id, index) or entry["file"] != expected:
            self.damaged += 1  # an index edited or merged by hand: never serve another record's pixels
            return None
        try:
            stored = np.load(self.root / "images" / entry["file"])
        except (OSError, ValueError):
            self.damaged += 1
            return None
        if list(stored.shape) != entry["shape"] or _checksum(stored) != entry["checksum"]:
            self.damaged += 1
            return None
        array = stored.astype(np.float32)
        return Image(
            array=array,
            spacing=tuple(entry["spacing"]),
            modality=Modality(entry["modality"]),
            intensity=entry["intensity"],
            orientation=entry["orientation"],
        )


def prepare_cache(
    records: Sequence[Record],
    out: str | Path,
    settings: CacheSettings | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Decode and resize every image of ``records`` into ``out``; already cached, unchanged images are reused."""
    settings = settings or CacheSettings()
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    index_path = root / INDEX_FILE
    if index_path.is_file():
        old = json.loads(index_path.read_text(encoding="utf-8"))
        if old.get("version") == FORMAT_VERSION and old.get("settings") == _settings_json(settings):
            entries = old["entries"]
    report = PrepareReport()
    start = time.perf_counter()
    todo = []
    for record in records:
        for i, path in enumerate(record.image_paths):
            key = f"{record.id}#{i}"
            entry = entries.get(key)
            if (
                entry is not None
                and path.exists()
                and _source_key(path) == entry["source"]
                and entry["file"] == _entry_name(record.id, i, path)
                and entry.get("declared") == record.modality.value
                and (root / "images" / entry["file"]).is_file()
            ):
                report.reused += 1
                continue
            todo.append((record.id, i, str(path), record.modality.value, settings, str(root)))
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    saved = time.perf_counter()
    for done, (key, entry, error) in enumerate(_run(todo, workers, progress), start=1):
        if entry is not None:
            entries[key] = entry
            report.written += 1
        else:
            entries.pop(key, None)
            report.failed[key] = error or "unknown error"
        if time.perf_counter() - saved > SAVE_EVERY_S and done < len(todo):
            # a crash or kill loses at most this much decoding: the next run reuses what the index lists
            _write_index(index_path, settings, entries)
            saved = time.perf_counter()
    _write_index(index_path, settings, entries)
    # files no entry names (an older format's names, failed re-decodes) would only cost disk
    named = {entry["file"] for entry in entries.values()}
    for orphan in (root / "images").glob("*.npy"):
        if orphan.name not in named:
            orphan.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


def _write_index(index_path: Path, settings: CacheSettings, entries: dict[str, dict[str, Any]]) -> None:
    # atomically: an interrupted write leaves the previous index valid
    tmp = index_path.with_suffix(".tmp")
    payload = {"version": FORMAT_VERSION, "settings": _settings_json(settings), "entries": entries}
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    tmp.replace(index_path)


def _settings_json(settings: CacheSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["spacing_mm"] = list(data["spacing_mm"])
    return data


def _run(todo: list[tuple], workers: int, progress: bool) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Results as they come (in ``todo`` order), so the caller can save progress while decoding goes on."""
    if not todo:
        return
    if workers <= 1:
        yield from _track(map(_prepare_one, todo), len(todo), progress)
        return
    # torch threads inside each worker would oversubscribe the cores
    with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from _track(pool.map(_prepare_one, todo, chunksize=8), len(todo), progress)


def _track(iterator: Any, total: int, enabled: bool) -> Any:
    if not enabled:
        return iterator
    from rich.progress import track

    return track(iterator, total=total, description="decoding images")
