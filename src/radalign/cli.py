"""The ``radalign`` command line: thin wrappers over the Python API, one subcommand each.

Built on jsonargparse (see docs/architecture.md for why): subcommands come from typed functions and their
docstrings, every option can come from a YAML file (``--config``), and an unknown option is an error that
names it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from radalign.config import (
    DataConfig,
    EMAConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    StageConfig,
    TrainerConfig,
)
from radalign.errors import RadalignError


def data_check(
    manifest: Path,
    require_report: bool = False,
    decode: bool = True,
    on_error: Literal["skip", "fail"] = "skip",
    json_out: Path | None = None,
    data_root: Path | None = None,
) -> None:
    """Validate a manifest and print a dataset summary (counts, label prevalence, report lengths, problems).

    Args:
        manifest: A .csv or .parquet manifest (format: docs/data.md).
        require_report: Count a record without report text as a problem.
        decode: Decode every image (slow on large data; false checks only that files exist).
        on_error: 'skip' lists every bad row and summarises the rest; 'fail' stops at the first bad row.
        json_out: Also write the summary as JSON to this file.
        data_root: Files the manifest names must lie under this folder (default: the manifest's folder).

    Exit status: 0 every row is good, 1 bad rows were found (listed), 2 the manifest or an argument is unusable
    (the message says why), 3 radalign itself failed (a bug: please report the traceback).
    """
    import json

    from radalign.data.manifest import load_manifest
    from radalign.data.summary import print_summary, summarize

    loaded = load_manifest(
        manifest, require_report=require_report, decode=decode, on_error=on_error, progress=True, data_root=data_root
    )
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
    data_root: Path | None = None,
) -> None:
    """Decode every image of a manifest once and cache it at training resolution (see docs/data.md).

    Args:
        data: The manifest (.csv or .parquet).
        out: Cache folder; pass it to training as --loader.cache_dir. Re-running reuses unchanged entries.
        size: 2D images: short side in pixels after resizing (aspect kept).
        spacing_mm: 3D volumes: voxel spacing after resampling, in mm.
        workers: Decoding processes (default: up to 4).
        data_root: Files the manifest names must lie under this folder (default: the manifest's folder).
    """
    from radalign.data.cache import CacheSettings, prepare_cache
    from radalign.data.manifest import load_manifest
    from radalign.utils.logging import get_logger

    manifest = load_manifest(data, on_error="skip", data_root=data_root)
    report = prepare_cache(manifest.records, out, CacheSettings(size, spacing_mm), workers=workers)
    log = get_logger()
    log.info(
        f"cache {out}: {report.written} decoded, {report.reused} reused, {len(report.failed)} failed "
        f"in {report.seconds:.1f} s; {len(manifest.problems)} manifest rows skipped as bad"
    )
    for key, reason in list(report.failed.items())[:10]:
        log.warning(f"  {key}: {reason}")


def simulate(
    *,
    out: Path,
    n: int = 200,
    seed: int = 0,
    size: int = 224,
    with_3d: bool = False,
    reports: bool = True,
    volume_spacing_mm: float = 3.0,
    prevalences: dict[str, float] | None = None,
    normal_fraction: float = 0.3,
    image_format: Literal["png", "dicom"] = "png",
    workers: int | None = None,
    preview: bool = False,
) -> None:
    """Generate the simulated paired chest X-ray / CT / report dataset (docs/simulated-data.md).

    Args:
        out: Output folder; receives images/, masks/, regions/, volumes/ and manifest.csv.
        n: Number of simulated patients.
        seed: Random seed; the same seed and settings give identical files.
        size: Radiograph side in pixels.
        with_3d: Also write each patient's CT volume (NIfTI, HU) and 3D finding masks.
        reports: Write each sample's report; false gives an image-label dataset (labels and no report column, as
            CheXpert is beside MIMIC-CXR), for a multi-source run beside a paired one made with another seed.
        volume_spacing_mm: Isotropic voxel spacing of the written volumes.
        prevalences: Per-finding prevalence in [0, 1], e.g. '{"nodule": 0.3, "pneumothorax": 0.1}'.
        normal_fraction: Share of patients with no finding.
        image_format: 'png' (16-bit) or 'dicom'.
        workers: Worker processes (default: up to 4).
        preview: Also write preview.png, a contact sheet of samples with findings outlined and reports.
    """
    from radalign.data.simulate.generate import SimulationConfig
    from radalign.data.simulate.generate import simulate as run_simulation
    from radalign.utils.logging import get_logger

    config = SimulationConfig(
        n=n,
        seed=seed,
        size=size,
        with_3d=with_3d,
        reports=reports,
        volume_spacing_mm=volume_spacing_mm,
        prevalences=prevalences,
        normal_fraction=normal_fraction,
        image_format=image_format,
        workers=workers,
    )
    manifest = run_simulation(config, out)
    get_logger().info(f"wrote {manifest}")
    if preview:
        from radalign.data.simulate.preview import contact_sheet

        get_logger().info(f"wrote {contact_sheet(out)}")


def tokenizer_train(
    *,
    data: Path,
    out: Path,
    vocab_size: int = 2000,
    lowercase: bool = True,
    min_frequency: int = 1,
    split: str | None = "train",
) -> None:
    """Train a WordPiece vocabulary on a manifest's reports, offline (for a tiny random BERT: text.name 'tiny').

        radalign tokenizer train --data sim/manifest.csv --out runs/vocab
        radalign pretrain --config configs/methods/clip-tiny.yaml --model.text.name tiny \\
            --loader.tokenizer runs/vocab ...

    Args:
        data: Manifest (.csv or .parquet) whose report texts form the corpus.
        out: Folder for the tokenizer (loads with transformers.AutoTokenizer).
        vocab_size: Upper bound on the vocabulary size (a small corpus gives fewer tokens).
        lowercase: Lower-case text before tokenising.
        min_frequency: Drop pieces seen fewer times than this.
        split: Train on this split's reports only (so validation and test text stays unseen); '' for all rows.
    """
    from radalign.data.manifest import load_manifest
    from radalign.data.tokenization import train_wordpiece
    from radalign.errors import DataError
    from radalign.utils.logging import get_logger

    records = load_manifest(data, on_error="skip", check_files=False).records
    texts = [r.report for r in records if r.report and (not split or r.split == split)]
    if not texts:
        where = f" in split {split!r}" if split else ""
        raise DataError(f"{data}: no report text{where} to train a vocabulary on; pass --split '' to use every row")
    tokenizer = train_wordpiece(texts, vocab_size, out, lowercase=lowercase, min_frequency=min_frequency)
    get_logger().info(f"wrote {out}: {len(tokenizer)} tokens from {len(texts)} reports")


def label(
    manifest: Path,
    *,
    out: Path,
    rules: Path | None = None,
    extend: bool = False,
    sections: list[str] | None = None,
    overwrite: bool = False,
    sentences: Path | None = None,
) -> None:
    """Label a manifest's reports with radalign's rule-based labeler (docs/labeler.md), offline.

        radalign label data/iu.csv --out data/iu-labelled.csv
        radalign label data/mine.csv --out data/mine-labelled.csv --rules my-rules.yaml --extend true

    Writes a copy of the manifest with label_<finding> columns (1 positive, 0 negative, -1 uncertain, empty not
    mentioned; no_finding derived as CheXpert does) and a label_source column: labeler where the labels came from
    the report, dataset where the manifest already had labels (kept unless --overwrite true).

    Args:
        manifest: A .csv or .parquet manifest with a report or report_path column.
        out: The labelled manifest to write (.csv or .parquet); never the input.
        rules: A labeler rules YAML (format: the shipped configs/labeler/default.yaml); default: the shipped rules.
        extend: With --rules: add its phrases to the shipped rules instead of replacing them.
        sections: Report sections to read (default FINDINGS and IMPRESSION; a report with neither: its text).
        overwrite: Replace labels the manifest already has with the labeler's.
        sentences: Also write one row per sentence with its labels (.csv or .parquet), to see what was decided.
    """
    from radalign.data.labeler import Labeler
    from radalign.data.manifest_labels import label_manifest
    from radalign.utils.logging import get_logger

    labeler = Labeler.from_yaml(rules, extend=extend)
    summary = label_manifest(
        manifest, out, labeler=labeler, sections=tuple(sections or ("FINDINGS", "IMPRESSION")),
        overwrite=overwrite, sentences_out=sentences,
    )  # fmt: skip
    for line in summary.lines():
        get_logger().info(line)


def pretrain(
    *,
    data: Path | None = None,
    out: Path,
    max_steps: int | None = None,
    resume: bool = True,
    allow_config_change: bool = False,
    method: str = "clip",
    model: ModelConfig = ModelConfig(),  # noqa: B008 - jsonargparse reads defaults from the signature
    objectives: dict[str, dict[str, Any]] | None = None,
    stages: list[StageConfig] | None = None,
    optim: OptimConfig = OptimConfig(),  # noqa: B008
    ema: EMAConfig = EMAConfig(),  # noqa: B008
    loader: DataConfig = DataConfig(),  # noqa: B008
    trainer: TrainerConfig = TrainerConfig(),  # noqa: B008
) -> None:
    """Pre-train a method on a manifest (docs/training.md), usually from a method config given with --config.

        radalign pretrain --config configs/methods/clip-tiny.yaml --data sim/manifest.csv --out runs/clip

    Every config value can be overridden, e.g. --optim.lr 3e-4 --loader.batch_size 16 --trainer.devices 4.
    Re-running the same command resumes from the newest checkpoint in OUT/checkpoints/ that verifies.

    Args:
        data: Training manifest (.csv or .parquet); its train/val splits are used. A multi-source run lists its
            manifests as loader.sources in a config file instead (docs/training.md).
        out: Run folder: checkpoints/, logs/ (CSV, TensorBoard), export/ (safetensors + config.json).
        max_steps: Stop after this many optimiser steps (overrides trainer.max_steps).
        resume: Continue from the newest valid checkpoint in OUT/checkpoints/ (false: start afresh, earlier
            checkpoints moved to OUT/checkpoints/superseded/).
        allow_config_change: Resume even though the config or the manifest's content differs from the run's
            (refused otherwise: the run would mix two settings under one name).
        method: Registered method name (clip, convirt, gloria, mgca, lovt, prior, umcl, mlip).
        model: Encoders, projection and embedding size.
        objectives: Per-objective settings and weights, e.g. {global: {weight: 1.0, temperature: 0.07}}.
        stages: Stage schedule: objective weights from a step, an epoch or a fraction of max_steps, with an
            optional optimiser reset at its own lr and warm-up (docs/training.md).
        optim: AdamW and learning-rate schedule.
        ema: EMA copies of sub-modules (teachers).
        loader: How the manifest becomes batches (image size, augmentation, tokenizer, batch size, workers).
        trainer: Lightning flags: devices, nodes, strategy, precision, accumulation, clipping, checkpoints.
    """
    import dataclasses

    from radalign.training.run import pretrain as run_pretrain

    if data is not None:
        loader = dataclasses.replace(loader, manifest=data)
    if max_steps is not None:
        trainer = dataclasses.replace(trainer, max_steps=max_steps)
    config = PretrainConfig(
        method=method,
        model=model,
        objectives=objectives or {},
        stages=stages or [],
        optim=optim,
        ema=ema,
        loader=loader,
        trainer=trainer,
    )
    run_pretrain(config, out, resume=resume, allow_config_change=allow_config_change)


def evaluate(
    *,
    model: Path,
    protocol: str = "quick",
    out: Path,
    data: Path | None = None,
    cache: Path | None = None,
    tasks: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    data_root: Path | None = None,
) -> None:
    """Evaluate a pre-trained model under a named protocol; writes OUT/results.json and OUT/report.md.

        radalign evaluate --model runs/clip/export --protocol quick --data sim/manifest.csv --out runs/clip/eval

    Args:
        model: An export folder (<run>/export) or a run folder holding one.
        protocol: A shipped protocol name (quick, quick-3d, mgca, lovt, prior) or a protocol YAML (docs/evaluation.md).
        out: Results folder: results.json, report.md, figures/.
        data: The manifest to evaluate on (overrides the protocol's).
        cache: A `radalign prepare` cache of that manifest (faster image loading).
        tasks: Run only these tasks of the protocol, e.g. [zero_shot, retrieval].
        overrides: Protocol overrides by dotted key, e.g. '{"seeds": [0], "tasks.linear_probe.epochs": 5}'.
        device: auto (a GPU when one is visible, else the CPU, as pretrain decides), cpu, cuda or cuda:N.
        data_root: Files the manifest names must lie under this folder (default: the manifest's folder).

    Exit status: 0 every task ran, 1 a task failed (the others' results are written; the message says why), 2 the
    model, protocol, data or an override is unusable (nothing ran), 3 radalign itself failed (a bug).
    """
    from radalign.evaluation.run import evaluate as run_evaluate
    from radalign.utils.logging import get_logger

    if data_root is not None:
        overrides = {**(overrides or {}), "data_root": str(data_root)}

    results = run_evaluate(model, protocol, out, data=data, cache_dir=cache, overrides=overrides, tasks=tasks,
                           device=device)  # fmt: skip
    failed = [name for name, task in results["tasks"].items() if "error" in task]
    if failed:
        get_logger().error(
            f"{len(failed)} of {len(results['tasks'])} tasks failed ({', '.join(failed)}); the others' results are in "
            f"{Path(out) / 'results.json'}"
        )
        sys.exit(1)


def compare(runs: list[Path], out: Path | None = None) -> None:
    """Put several evaluation results side by side (models as rows, tasks as columns).

    Results from different protocols or data go in separate tables, with a warning: they are not comparable.

    Args:
        runs: Evaluation output folders (or their results.json files).
        out: Also write the markdown table to this file.
    """
    from rich.console import Console
    from rich.markdown import Markdown

    from radalign.evaluation.report import compare_table
    from radalign.evaluation.run import load_results
    from radalign.utils.logging import get_logger

    table, warnings = compare_table([load_results(r) for r in runs])
    for warning in warnings:
        get_logger().warning(warning)
    Console(width=200).print(Markdown(table))
    if out is not None:
        out.write_text(table, encoding="utf-8")


def demo(out: Path = Path("demo_out"), n: int = 1000, steps: int = 250) -> None:
    """Run the demo: simulate data, pre-train CLIP on the CPU, compare it with the untrained model in OUT/report.md.

    It simulates paired data from the real chest CT, pre-trains CLIP on the CPU, compares it with the untrained
    model (zero-shot AUROC, retrieval) and writes OUT/report.md with the loss curve.

    Args:
        out: Folder for the demo's data, run and report (the simulated data and cache are reused).
        n: Number of simulated patients.
        steps: Pre-training steps (batch 32).
    """
    from radalign.demo import run_demo

    run_demo(out, n=n, steps=steps)


def _underscored(arg: str) -> str:
    """``--max-steps=5`` -> ``--max_steps=5``: options take either spelling (the parser knows only underscores)."""
    if not arg.startswith("--") or len(arg) == 2:
        return arg
    name, sep, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + sep + value


def _listed_runs(args: list[str]) -> list[str]:
    """``compare A B C --out t.md`` -> ``compare '["A", "B", "C"]' --out t.md``: the parser reads a list-typed
    positional as one JSON list, and the documented spelling is one path per argument."""
    count = next((i for i, arg in enumerate(args) if arg.startswith("-")), len(args))
    if count == 0 or (count == 1 and args[0].lstrip().startswith("[")):
        return args
    import json

    return [json.dumps(args[:count]), *args[count:]]


def _named_config(args: list[str]) -> list[str]:
    """``--config clip-tiny`` -> the shipped file's path, as ``evaluate --protocol quick`` takes a name."""
    from radalign.config import find_config

    result = list(args)
    for i, arg in enumerate(result[:-1]):
        if arg == "--config" and not Path(result[i + 1]).exists():
            result[i + 1] = str(find_config(result[i + 1]))  # neither a file nor a shipped name: says which exist
    return result


def _plain_lists(args: list[str], options: tuple[str, ...] = ("--tasks",)) -> list[str]:
    """``--tasks zero_shot`` or ``--tasks zero_shot,retrieval`` -> ``--tasks '["zero_shot", "retrieval"]'``."""
    import json

    result = list(args)
    for i, arg in enumerate(result[:-1]):
        value = result[i + 1]
        if arg in options and not value.lstrip().startswith("["):
            result[i + 1] = json.dumps([v.strip() for v in value.split(",") if v.strip()])
    return result


def _parser_class():
    """jsonargparse's parser with errors that fit on a screen: the message, a close option name if there is one,
    and where to look, instead of a usage block of every option (70 lines for pretrain) above the error."""
    import difflib
    import re

    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
            if not self.exit_on_error:
                return super().error(message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            hint = ""
            unknown = re.search(r"unrecognized arguments: (--[\w.-]+)", message, flags=re.IGNORECASE)
            if unknown:
                known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
                name = unknown.group(1).split("=")[0]
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
            prog = parser.prog.replace(" [options]", "")
            sys.stderr.write(f"radalign: error: {message}{hint}\n`{prog} --help` lists every option\n")
            self.exit(2)

    return Parser


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    from radalign import __version__

    commands = {
        "data": {"check": data_check, "_help": "Dataset tools: validate and summarise manifests."},
        "prepare": prepare,
        "tokenizer": {"train": tokenizer_train, "_help": "Tokenizers: train a WordPiece vocabulary offline."},
        "simulate": simulate,
        "label": label,
        "pretrain": pretrain,
        "evaluate": evaluate,
        "compare": compare,
        "demo": demo,
    }
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("--version", "-V"):
        print(f"radalign {__version__}")
        return
    if argv and argv[0] == "compare":
        argv = ["compare", *_listed_runs(list(argv[1:]))]
    # Exit status: 0 done, 1 a check found problems (data check), 2 unusable input or environment (the message says
    # what to do), 3 radalign itself failed (a bug: the traceback is for the report), 130 interrupted.
    try:
        args = _plain_lists(_named_config([_underscored(arg) for arg in argv]))
        auto_cli(commands, args=args, as_positional=True, parser_class=_parser_class())
    except RadalignError as err:
        # A user-facing problem: the message says what and how to fix it; a traceback would only bury it.
        print(f"radalign: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a read-only or full output folder, a file vanished: the machine's state, not a bug
        where = f": {err.filename}" if err.filename else ""
        advice = "check that the path exists, is writable and has free space, then re-run (pre-training resumes)"
        print(f"radalign: error: {err.strerror or err}{where}; {advice}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("radalign: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"radalign: internal error (radalign {__version__}); please report the traceback above", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
