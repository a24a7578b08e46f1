"""The command line: help, exit codes, clear errors, and the data commands end to end on simulated data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from radalign.cli import main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "prepare", "simulate", "tokenizer", "pretrain", "demo"):
        assert command in out


def test_console_script_is_installed():
    result = subprocess.run(
        [Path(sys.executable).parent / "radalign", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("radalign ")


def test_unknown_option_is_an_error_that_names_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--out", "x", "--nn", "3"])
    assert exit_.value.code != 0
    assert "nn" in capsys.readouterr().err


def test_bad_setting_is_a_one_line_error_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--out", str(tmp_path / "sim"), "--n", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("radalign: error:") and "n must be a positive" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-sim")
    main(["simulate", "--out", str(out), "--n", "6", "--size", "64", "--workers", "1", "--preview", "true"])
    return out


def test_simulate_writes_a_manifest_and_a_preview(simulated):
    table = pd.read_csv(simulated / "manifest.csv")
    assert len(table) == 6 and set(table["modality"]) == {"xray"}
    assert (simulated / "preview.png").stat().st_size > 10_000


def test_data_check_passes_on_good_data_and_fails_with_exit_1_on_bad_rows(simulated, tmp_path, capsys):
    main(["data", "check", str(simulated / "manifest.csv"), "--json_out", str(tmp_path / "summary.json")])
    assert (tmp_path / "summary.json").is_file()
    table = pd.read_csv(simulated / "manifest.csv")
    table.loc[0, "image"] = "images/missing.png"
    bad = simulated / "bad.csv"
    table.to_csv(bad, index=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(bad)])
    assert exit_.value.code == 1
    assert "missing.png" in capsys.readouterr().out


def test_data_check_warns_when_sectioning_drops_most_of_the_reports(simulated, tmp_path, capsys):
    table = pd.read_csv(simulated / "manifest.csv")
    body = table["report"].str.replace("FINDINGS:", "").str.replace("IMPRESSION:", "")  # a header it does not know
    table["report"] = "HISTORY: Cough.\nSTUDY NOTES: " + body + "\nCONCLUSION: Stable."
    odd = simulated / "odd-headers.csv"
    table.to_csv(odd, index=False)
    capsys.readouterr()
    main(["data", "check", str(odd), "--json_out", str(tmp_path / "summary.json")])
    out = " ".join(capsys.readouterr().out.split())
    assert "6 of 6 reports (100%) keep less than half" in out and "'STUDY NOTES' (6)" in out
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())
    assert summary["reports_mostly_dropped"] == 6 and summary["unknown_headers"] == {"STUDY NOTES": 6}
    capsys.readouterr()
    main(["data", "check", str(simulated / "manifest.csv")])
    assert "keep less than half" not in capsys.readouterr().out


def test_prepare_caches_every_image_and_reuses_them(simulated, tmp_path):
    cache = tmp_path / "cache"
    main(["prepare", "--data", str(simulated / "manifest.csv"), "--out", str(cache), "--size", "32", "--workers", "1"])
    first = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != "index.json"}
    assert len(first) >= 6
    main(["prepare", "--data", str(simulated / "manifest.csv"), "--out", str(cache), "--size", "32", "--workers", "1"])
    second = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != "index.json"}
    assert second == first  # nothing rewritten


def test_options_take_dashes_or_underscores(tmp_path):
    from radalign.cli import _underscored

    assert _underscored("--max-steps") == "--max_steps"
    assert _underscored("--loader.batch-size=4") == "--loader.batch_size=4"
    assert _underscored("runs/my-vocab") == "runs/my-vocab" and _underscored("-1") == "-1"


def test_demo_writes_a_report_with_both_models_and_chance(tmp_path):
    import re

    from radalign.demo import run_demo

    result = run_demo(tmp_path / "demo", n=24, steps=3, size=64)
    assert result.steps == 3
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| measure | chance | untrained | pre-trained |" in report
    # README's table, with this run's figures, so a reader can compare the two
    mean_row = re.search(r"\| mean zero-shot AUROC \(9 findings\) \| 0.500 \| [\d.]+ \| \*\*([\d.]+)\*\* \|", report)
    assert mean_row is not None and float(mean_row.group(1)) == pytest.approx(result.after.mean_auroc, abs=1e-3)
    row = re.search(r"\| retrieval i2t_R@10 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", report)
    assert row is not None and float(row.group(1)) == pytest.approx(min(1.0, 10 / result.before.n), abs=1e-3)
    assert (tmp_path / "demo" / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "run" / "export" / "model.safetensors").is_file()


def test_readme_quotes_exactly_the_rows_the_demo_report_writes():
    import re

    from radalign.demo import README_ROWS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quoted = re.findall(r"^\| (.+?) \| [\d.]+ \| [\d.]+ \| \*\*[\d.]+\*\* \|$", readme, flags=re.M)
    assert quoted == [name for name, _ in README_ROWS]


def test_evaluate_then_compare_through_the_command_line(tiny_export, eval_manifest, tmp_path, capsys):
    import json

    overrides = '{"image_size": 64, "bootstrap": 0, "seeds": [0]}'
    for name in ("a", "b"):
        main(["evaluate", "--model", str(tiny_export), "--data", str(eval_manifest), "--out", str(tmp_path / name),
              "--tasks", "[zero_shot, retrieval]", "--overrides", overrides])  # fmt: skip
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["tasks"].keys() == {"zero_shot", "retrieval"} and (tmp_path / "a" / "report.md").is_file()
    main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "table.md")])
    table = (tmp_path / "table.md").read_text()
    auroc = results["tasks"]["zero_shot"]["metrics"]["auroc"]["value"]
    assert table.count(f"{auroc:.3f}") == 2  # both rows carry the evaluated value (the same model twice)


def test_pretrain_without_data_names_the_missing_option(tmp_path, capsys):
    from radalign.config import find_config

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(find_config("clip-tiny")), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_exits_1_when_a_task_failed_after_writing_the_others(tiny_export, eval_manifest, tmp_path, caplog):
    import json

    overrides = '{"image_size": 64, "bootstrap": 0, "tasks.zero_shot.findings": ["no_such_finding"]}'
    with pytest.raises(SystemExit) as exit_:  # the plain --tasks form, comma-separated
        main(["evaluate", "--model", str(tiny_export), "--data", str(eval_manifest), "--out", str(tmp_path / "r"),
              "--tasks", "zero_shot,retrieval", "--overrides", overrides])  # fmt: skip
    assert exit_.value.code == 1 and "1 of 2 tasks failed (zero_shot)" in caplog.text
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert "no_such_finding" in results["tasks"]["zero_shot"]["error"]
    assert "i2t_R@1" in results["tasks"]["retrieval"]["metrics"]


def test_a_misspelled_task_parameter_is_refused_before_anything_runs(tiny_export, eval_manifest, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", str(tiny_export), "--data", str(eval_manifest), "--out", str(tmp_path / "r"),
              "--tasks", "retrieval", "--overrides", '{"tasks.zero_shot.temperatur": 0.1}'])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown parameter 'temperatur' (did you mean 'temperature'?)" in err
    assert not (tmp_path / "r").exists()  # nothing ran, nothing was written


def test_a_shipped_config_name_is_taken_where_a_path_is_and_unknown_options_say_so_briefly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--config", "clip-tiny", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path)])
    assert exit_.value.code == 2 and f"manifest {tmp_path / 'none.csv'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--config", "clip-tiny", "--data", "m.csv", "--out", str(tmp_path), "--optim.lrr", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--optim.lrr" in err and "did you mean --optim.lr?" in err
    assert len(err.strip().splitlines()) <= 3  # no usage block of every option above the error
    with pytest.raises(SystemExit) as exit_:  # neither a file nor a shipped name: which ones there are
        main(["pretrain", "--config", "clip-tny", "--data", "m.csv", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "config clip-tny not found (did you mean clip-tiny?)" in err


def test_evaluate_device_follows_pretrain_s_rule_and_a_missing_gpu_is_a_message(tiny_export, tmp_path, capsys):
    import torch

    from radalign.inference import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the missing-GPU message cannot be shown")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", str(tiny_export), "--data", "m.csv", "--out", str(tmp_path / "r"),
              "--device", "cuda"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no CUDA device is visible on this machine" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_every_pretrain_option_has_a_meaning_in_help(capsys, monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: help text wraps, often onto the line below its option
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--help"])
    assert exit_.value.code == 0
    paragraphs = capsys.readouterr().out.split("\n\n")
    description = " ".join(paragraphs[1].split())  # the paragraph after the usage block
    assert description and not description.endswith(":"), description
    entries: list[list[str]] = []  # an option's line, then the deeper-indented lines its help wraps onto
    for line in "\n".join(paragraphs[2:]).splitlines():
        if re.match(r"  -\S", line):
            entries.append([line])
        elif line.startswith("   ") and entries:
            entries[-1].append(line)
    helps = {}
    for first, *rest in entries:
        invocation, _, same_line = first.strip().partition("  ")  # argparse puts 2+ spaces before help
        helps[invocation.split()[0].rstrip(",")] = " ".join(" ".join([same_line, *rest]).split())
    dotted = {name: text for name, text in helps.items() if re.fullmatch(r"--\w+(\.\w+)+", name)}
    assert len(dotted) > 60  # the parse found the options: every config group's keys
    assert {"--model.image.name", "--model.text.pooling", "--optim.lr", "--trainer.seed"} <= set(dotted)
    bare = [name for name, text in dotted.items() if not re.sub(r"\((required, )?type: .*\)$", "", text).strip()]
    assert not bare, f"options whose help is only '(type: ..., default: ...)': {bare}"
