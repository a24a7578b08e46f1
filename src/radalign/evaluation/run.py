"""``evaluate(model, protocol, out)``: run a protocol's tasks on a frozen model and write results.json + report.md.

results.json records everything needed to reproduce and to judge a number: every metric with its interval or
spread, the full protocol, the model (path, method, weights hash), the data (manifest hash, split sizes), the
radalign and torch versions, the device and the time. It is rewritten after every task, so a failure or an
interrupted run keeps what was finished; a task that fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from radalign.config import Protocol, load_protocol
from radalign.errors import RadalignError
from radalign.utils.logging import get_logger

RESULTS_FORMAT = 1


def file_sha256(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:limit] if limit else digest.hexdigest()


def evaluate(
    model: str | Path,
    protocol: str | Path | Protocol,
    out: str | Path,
    *,
    data: str | Path | None = None,
    cache_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the exported ``model`` under ``protocol`` (a shipped name, a YAML path or a Protocol).

    ``data`` overrides the protocol's manifest, ``cache_dir`` its image cache; ``tasks`` runs a subset by name.
    """
    import torch
    from rich.console import Console

    from radalign import __version__
    from radalign.data.manifest import load_manifest
    from radalign.evaluation.context import EvalContext
    from radalign.evaluation.report import write_report
    from radalign.evaluation.tasks import check_task_params, task_function
    from radalign.inference import load

    log = get_logger()
    console = Console()
    out = Path(out)
    if not isinstance(protocol, Protocol):
        protocol = load_protocol(protocol, overrides)
    if data is not None:
        protocol.data = Path(data)
    if cache_dir is not None:
        protocol.cache_dir = Path(cache_dir)
    if protocol.data is None:
        raise RadalignError(f"protocol {protocol.name} names no dataset: pass --data MANIFEST")
    selected = [t for t in protocol.tasks if not tasks or t.name in tasks]
    if tasks and len(selected) != len(tasks):
        import difflib

        names = [t.name for t in protocol.tasks]
        unknown = sorted(set(tasks) - set(names))
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RadalignError(f"protocol {protocol.name} has no task {unknown[0]!r}{hint}; it has {names}")

    for spec in protocol.tasks:  # every task's, selected or not: a misspelled override is a mistake either way
        check_task_params(spec)
    from radalign.inference import resolve_device

    device = str(resolve_device(device))  # before anything is loaded or written
    encoder = load(model, device=device)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(protocol.data, on_error="skip", decode=False, data_root=protocol.data_root)
    ctx = EvalContext(encoder, protocol, manifest.records, out, vocabulary=manifest.vocabulary, device=device,
                      progress=progress)  # fmt: skip
    model_path = Path(model)
    export = model_path / "export" if (model_path / "export" / "config.json").is_file() else model_path
    config = json.loads((export / "config.json").read_text(encoding="utf-8"))["config"]
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "radalign_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "path": str(model_path.resolve()),
            "name": model_path.resolve().name if model_path.name != "export" else model_path.resolve().parent.name,
            "method": config.get("method"),
            "image_encoder": config.get("model", {}).get("image", {}).get("name"),
            "weights_sha256": file_sha256(export / "model.safetensors", 16),
        },
        "protocol": protocol.to_dict(),
        "data": {
            "manifest": str(Path(protocol.data).resolve()),
            "sha256": file_sha256(Path(protocol.data), 16),
            "records": {role: len(records) for role, records in ctx.records.items()},
            "skipped_rows": len(manifest.problems),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        },
        "tasks": {},
    }
    start_all = time.perf_counter()
    for spec in selected:
        console.rule(f"{spec.name} ({spec.task})")
        start = time.perf_counter()
        try:
            result = task_function(spec.task)(ctx, spec)
        except RadalignError as err:  # the user can fix it: record, say it, go on with the other tasks
            log.error(f"{spec.name}: {err}")
            results["tasks"][spec.name] = {"task": spec.task, "error": str(err), "metrics": {}}
            _write(out, results)
            continue
        seconds = time.perf_counter() - start
        results["tasks"][spec.name] = {
            "task": spec.task,
            "params": spec.params,
            "metrics": {k: m.to_dict() for k, m in result.metrics.items()},
            "figures": result.figures,
            "notes": result.notes,
            "details": _jsonable(result.details),
            "seconds": round(seconds, 1),
        }
        headline = next(iter(result.metrics.items()), None)
        log.info(f"{spec.name}: {headline[0]} = {headline[1]} ({seconds:.0f} s)" if headline else spec.name)
        results["seconds"] = round(time.perf_counter() - start_all, 1)
        _write(out, results)
    results["seconds"] = round(time.perf_counter() - start_all, 1)
    _write(out, results)
    report = write_report(results, out)
    log.info(f"results: {out / 'results.json'}; report: {report}; {results['seconds'] / 60:.1f} min")
    return results


def _write(out: Path, results: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2), encoding="utf-8")
    tmp.replace(out / "results.json")  # atomic: a crash never leaves a half-written results.json


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise RadalignError(
            f"{path} is not an evaluation result; `radalign evaluate ... --out DIR` writes DIR/results.json"
        )
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("format") != RESULTS_FORMAT:
        raise RadalignError(f"{path}: results format {results.get('format')}; this radalign reads {RESULTS_FORMAT}")
    return results
