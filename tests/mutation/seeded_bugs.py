"""Issue 15's seeded bugs: put each into a copy of ``src/``, run the test meant to catch it, report caught or missed.

    .venv/bin/python tests/mutation/seeded_bugs.py [--only NAME ...]

Each bug is one textual change. The copy goes first on PYTHONPATH, so the working tree is never touched (a kill
leaves nothing to revert). A bug is *caught* when its test fails; the script first checks that every test passes
on the unchanged copy, so a failure means the bug, not a broken test. Not part of the default test run (it runs
the listed tests once per bug, a few minutes in all).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Bug:
    name: str
    file: str  # under src/radalign/
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    Bug("retrieval Recall@K off by one", "evaluation/retrieval.py", "hits = (rank < k)", "hits = (rank <= k)",
        ("tests/test_evaluation.py::test_retrieval_recall_in_results_equals_a_loop_over_queries",)),
    Bug("zero-shot AUROC on 1 - scores", "evaluation/zero_shot.py", '{"auroc": bootstrap(macro_auroc, labels, scores,',
        '{"auroc": bootstrap(macro_auroc, labels, 1 - scores,',
        ("tests/test_evaluation.py::test_zero_shot_auroc_equals_a_pairwise_count_on_hand_made_scores",)),
    Bug("LoVT positives d < threshold", "objectives/local/lovt.py", "(d <= threshold)", "(d < threshold)",
        ("tests/test_local_lovt.py",
         "tests/test_method_lovt.py::test_local_losses_on_a_2x2_grid_equal_the_loop_reference_with_hand_written_positives")),
    Bug("resume forgets the stage's optimiser start", "training/module.py",
        'self._optimizer_start_step = int(state.get("optimizer_start_step", 0))', "self._optimizer_start_step = 0",
        ("tests/test_training.py::test_a_resume_past_a_stage_restart_keeps_that_stage_s_cosine_length",)),
    Bug("resume at an epoch's last batch replays the epoch", "data/datamodule.py",
        'if state["handed_out"] >= state.get("batches", len(self)):',
        'if state["handed_out"] > state.get("batches", len(self)):',
        ("tests/test_training.py::test_a_run_killed_at_an_epoch_boundary_resumes_exactly",)),
    Bug("EMA lerps by decay", "models/ema.py", "lerp_(p.detach(), 1.0 - self.decay)", "lerp_(p.detach(), self.decay)",
        ("tests/test_training.py::test_ema_update_moves_each_copy_by_one_minus_decay",)),
    Bug("loaded Encoder left in train mode", "inference.py", "self.method = method.eval()", "self.method = method",
        ("tests/test_export_roundtrip.py::test_a_loaded_export_embeds_like_the_trained_model[clip-tiny]",)),
    Bug("masked_softmax without its fill", "models/pooling.py",
        "weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=dim)",
        "weights = scores.softmax(dim=dim)", ("tests/test_local_common.py",)),
    Bug("DDP resume skips a per-process count of the global order", "data/datamodule.py", "rest = order[offset:]",
        "rest = order[offset // self.num_replicas :]",
        ("tests/test_ddp.py::test_a_ddp_run_killed_mid_epoch_resumes_every_rank_where_it_was",)),
    Bug("DDP resume gives every rank rank 0's generators", "training/module.py", "set_rng_state(per_rank[rank])",
        "set_rng_state(per_rank[0])",
        ("tests/test_ddp.py::test_a_ddp_run_killed_mid_epoch_resumes_every_rank_where_it_was",)),
)  # fmt: skip


def run_tests(src: Path, tests: tuple[str, ...]) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    return done.returncode == 0, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only the bugs whose name contains one of these words")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or any(word in b.name for word in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", copy)
        tests = tuple(dict.fromkeys(t for b in bugs for t in b.tests))
        ok, seconds = run_tests(copy, tests)
        if not ok:
            sys.exit(f"the tests fail on the unchanged code; fix them first: {' '.join(tests)}")
        print(f"baseline: {len(tests)} tests pass on the unchanged copy ({seconds:.0f} s)\n")
        print("| seeded bug | file | caught by | result |\n|---|---|---|---|")
        missed = 0
        for bug in bugs:
            path = copy / "radalign" / bug.file
            original = path.read_text(encoding="utf-8")
            if original.count(bug.old) != 1:
                sys.exit(f"{bug.name}: {bug.old!r} is not in {bug.file} exactly once; update the bug")
            path.write_text(original.replace(bug.old, bug.new), encoding="utf-8")
            try:
                passed, seconds = run_tests(copy, bug.tests)
            finally:
                path.write_text(original, encoding="utf-8")
            missed += passed
            where = ", ".join(t.split("::")[-1] if "::" in t else t for t in bug.tests)
            print(f"| {bug.name} | {bug.file} | {where} | {'MISSED' if passed else 'caught'} ({seconds:.0f} s) |")
        print(f"\n{len(bugs) - missed} of {len(bugs)} caught")
        sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
