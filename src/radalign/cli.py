"""The ``radalign`` command line: thin wrappers over the Python API, one subcommand each.

Built on jsonargparse (see docs/architecture.md for why): subcommands come from typed functions and their
docstrings, every option can come from a YAML file (``--config``), and an unknown option is an error that
names it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from radalign.errors import RadalignError


def data_check(
    manifest: Path,
    require_report: bool = False,
    decode: bool = True,
    on_error: Literal["skip", "fail"] = "skip",
    json_out: Path | None = None,
) -> None:
    """Validate a manifest and print a dataset summary (counts, label prevalence, report lengths, problems).

    Args:
        manifest: A .csv or .parquet manifest (format: docs/data.md).
        require_report: Count a record without report text as a problem.
        decode: Decode every image (slow on large data; false checks only that files exist).
        on_error: 'skip' lists every bad row and summarises the rest; 'fail' stops at the first bad row.
        json_out: Also write the summary as JSON to this file.
    """
    import json

    from radalign.data.manifest import load_manifest
    from radalign.data.summary import print_summary, summarize

    loaded = load_manifest(manifest, require_report=require_report, decode=decode, on_error=on_error, progress=True)
    summary = summarize(loaded)
    print_summary(loaded, summary)
    if json_out is not None:
        json_out.write_text(json.dumps(summary.as_dict(), indent=2), encoding="utf-8")
    if loaded.problems:
        sys.exit(1)


def prepare(
    *,
    data: Path,
    out: Path,
    size: int = 256,
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5),
    workers: int | None = None,
) -> None:
    """Decode every image of a manifest once and cache it at training resolution (see docs/data.md).

    Args:
        data: The manifest (.csv or .parquet).
        out: Cache folder; pass it to training as data.cache_dir. Re-running reuses unchanged entries.
        size: 2D images: short side in pixels after resizing (aspect kept).
        spacing_mm: 3D volumes: voxel spacing after resampling, in mm.
        workers: Decoding processes (default: up to 4).
    """
    from radalign.data.cache import CacheSettings, prepare_cache
    from radalign.data.manifest import load_manifest
    from radalign.utils.logging import get_logger

    manifest = load_manifest(data, on_error="skip")
    report = prepare_cache(manifest.records, out, CacheSettings(size, spacing_mm), workers=workers)
    log = get_logger()
    log.info(
        f"cache {out}: {report.written} decoded, {report.reused} reused, {len(report.failed)} failed "
        f"in {report.seconds:.1f} s; {len(manifest.problems)} manifest rows skipped as bad"
    )
    for key, reason in list(report.failed.items())[:10]:
        log.warning(f"  {key}: {reason}")


def demo(out: Path = Path("demo_out"), n: int = 48) -> None:
    """Run the demo: build a small dataset from real shipped assets, check it, cache it and load batches.

    Args:
        out: Folder for the demo's data and outputs.
        n: Number of records to build.
    """
    from radalign.demo import run_demo

    run_demo(out, n=n)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    from radalign import __version__

    commands = {
        "data": {"check": data_check, "_help": "Dataset tools: validate and summarise manifests."},
        "prepare": prepare,
        "demo": demo,
    }
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("--version", "-V"):
        print(f"radalign {__version__}")
        return
    try:
        auto_cli(commands, args=argv, as_positional=True)
    except RadalignError as err:
        # A user-facing problem: the message says what and how to fix it; a traceback would only bury it.
        print(f"radalign: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
