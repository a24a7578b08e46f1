"""The standing mutation check (issue 15): cosmic-ray mutates one module at a time in a copy of the repository and
runs the tests that guard it; a mutant the tests do not kill is a result that could go wrong unnoticed.

    make mutation                                   # installs cosmic-ray (extra "mutation"), runs every target
    .venv/bin/python tests/mutation/mutation_check.py --only metrics retrieval

Slow (a test run per mutant), so not part of ``make test``. Prints, per module, the mutants, how many the tests
killed, and each survivor (line, operator, the changed code) so it can be given a test or listed as equivalent in
docs/testing.md. The working tree is never modified: cosmic-ray edits the copy.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTEST = "python -m pytest -x -q -p no:cacheprovider"

# module under src/radalign -> the tests that guard it (the fast ones that call it directly)
TARGETS = {
    "evaluation/metrics.py": "tests/test_evaluation_core.py -k 'auroc or bootstrap or over_seeds'",
    "evaluation/retrieval.py": "tests/test_evaluation.py -k 'recall or precision or ranks or retrieval'",
    "evaluation/zero_shot.py": "tests/test_evaluation.py -k 'zero_shot or prompt or score'",
    "objectives/contrastive.py": "tests/test_contrastive.py",
    "objectives/local/common.py": "tests/test_local_common.py",
    "objectives/local/gloria.py": "tests/test_local_gloria.py",
    "objectives/local/mgca.py": "tests/test_local_mgca.py",
    "objectives/local/lovt.py": "tests/test_local_lovt.py",
    "objectives/local/prior.py": "tests/test_prior_objectives.py",
    "objectives/prior.py": "tests/test_prior_objectives.py",
    "objectives/prototype.py": "tests/test_local_mgca.py tests/test_prior_objectives.py",
    "training/module.py": "tests/test_training.py -k 'resume or killed or schedule or lr_lambda'",
}  # fmt: skip


def _config(module: Path, tests: str, timeout: float) -> str:
    return (
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{PYTEST} {tests}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )


# "name: Type <op> None" where "Type | None" was: a parameter annotation, on a ``def`` line or a line of its own
_ANNOTATION = re.compile(r"\w\s*:\s*[\w.\[\], ]+?\s*(?:\+|-|\*\*|\*|//|/|%|>>|<<|&|\^)\s*None\s*(?:=|,|\)|$)")


def _survivors(session: Path) -> tuple[int, int, list[dict]]:
    """(mutants, killed, survivors) from cosmic-ray's session database."""
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT m.operator_name, m.start_pos_row, m.occurrence, r.test_outcome, r.diff FROM mutation_specs m "
            "JOIN work_results r ON r.job_id = m.job_id"
        ).fetchall()
    survivors = [
        {"line": line, "operator": op.split("/")[-1], "diff": _added_line(diff)}
        for op, line, _, outcome, diff in rows
        if str(outcome).lower() == "survived"  # SQLAlchemy stores the enum's name, SURVIVED
    ]
    for s in survivors:
        # `int | None` -> `int + None` in a signature: with `from __future__ import annotations` (every module
        # here) annotations are never evaluated, so such a mutant cannot change anything
        bit_or = s["operator"].startswith("ReplaceBinaryOperator_BitOr")
        s["annotation"] = bit_or and bool(_ANNOTATION.search(s["diff"]))
    killed = sum(1 for row in rows if str(row[3]).lower() == "killed")
    return len(rows), killed, sorted(survivors, key=lambda s: s["line"])


def _added_line(diff: str | None) -> str:
    lines = (d[1:].strip() for d in (diff or "").splitlines() if d.startswith("+") and not d.startswith("+++"))
    return next(lines, "")


def check(module: str, tests: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in ("src", "tests", "pyproject.toml"):
            (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, work / part)
        (work / "cr.toml").write_text(_config(Path("src/radalign") / module, tests, timeout), encoding="utf-8")
        env = {"PYTHONPATH": str(work / "src"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
        run = lambda *args: subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)  # noqa: E731
        bin_ = Path(sys.executable).parent
        start = time.perf_counter()
        baseline = run(str(bin_ / "cosmic-ray"), "baseline", "cr.toml")
        if baseline.returncode != 0:
            return {"module": module, "error": "the tests fail on the unmutated code: " + baseline.stdout[-500:]}
        run(str(bin_ / "cosmic-ray"), "init", "cr.toml", "session.sqlite")
        run(str(bin_ / "cosmic-ray"), "exec", "cr.toml", "session.sqlite")
        mutants, killed, survivors = _survivors(work / "session.sqlite")
    return {"module": module, "mutants": mutants, "killed": killed, "survived": len(survivors),
            "survivors": survivors, "minutes": round((time.perf_counter() - start) / 60, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="modules whose path contains one of these words")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a mutant's test run may take")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("cosmic-ray", path=str(Path(sys.executable).parent)) is None:
        sys.exit("cosmic-ray is not installed here: run `make mutation` (or pip install -e '.[mutation]')")
    results = []
    print("| module | mutants | killed | survived | minutes |\n|---|--:|--:|--:|--:|")
    for module, tests in TARGETS.items():
        if args.only and not any(word in module for word in args.only):
            continue
        result = check(module, tests, args.timeout)
        results.append(result)
        if "error" in result:
            print(f"| {module} | error: {result['error'][:200]} | | | |")
            continue
        annotations = sum(s["annotation"] for s in result["survivors"])
        print(f"| {module} | {result['mutants']} | {result['killed']} | {result['survived']} ({annotations} in "
              f"annotations) | {result['minutes']} |")  # fmt: skip
    for result in results:
        for s in result.get("survivors", []):
            if not s["annotation"]:
                print(f"  {result['module']}:{s['line']} {s['operator']}: {s['diff']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
