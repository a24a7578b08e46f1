"""Training under Lightning DDP with two CPU processes (gloo): sync_batchnorm, and a killed run's resume on every
rank (data position, random generators, weights). The runs are subprocesses of tests/ddp_toy_run.py, since
Lightning's "ddp" strategy starts the other rank by re-running the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_toy_run.py")


def _run(manifest: Path, run: Path, record: Path, *args: str, expect: int = 0) -> tuple[list[dict], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(manifest), str(run), str(record), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == expect, done.stderr[-4000:]
    return [json.loads((record / f"rank-{r}.json").read_text()) for r in range(2)], done.stdout + done.stderr


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "export" / "model.safetensors")


def test_sync_batchnorm_on_cpu_processes_is_refused_before_anything_is_written(simulated_manifest, tmp_path):
    # PyTorch's SyncBatchNorm has no CPU implementation: DDP would fail inside every process with a traceback
    from radalign.config import PretrainConfig, from_dict
    from radalign.errors import ConfigError
    from radalign.training.run import pretrain

    config = from_dict(PretrainConfig, {"method": "clip", "loader": {"manifest": str(simulated_manifest)},
                                        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp",
                                                    "sync_batchnorm": True}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"sync_batchnorm: true needs GPUs.*2 processes on CPUAccelerator"):
        pretrain(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_sync_batchnorm_normalises_with_the_statistics_of_both_processes(simulated_manifest, tmp_path):
    ranks, _ = _run(simulated_manifest, tmp_path / "run", tmp_path / "record", "--sync-batchnorm", "--steps", "2",
                    "--accelerator", "gpu")  # fmt: skip
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert {r["norm_type"] for r in ranks} == {"SyncBatchNorm"}
    own = [torch.tensor(r["batch_means"][-1]) for r in ranks]  # each rank's last batch: BatchNorm's input mean
    assert (own[0] - own[1]).abs().max() > 1e-3  # the ranks saw different images, so the check can tell
    both = (own[0] + own[1]) / 2  # equal batch sizes: the global batch's mean
    for r in ranks:  # momentum 1: the running mean is the last batch's mean, over both processes
        torch.testing.assert_close(torch.tensor(r["running_mean"]), both, rtol=1e-4, atol=1e-5)


def test_a_ddp_run_killed_mid_epoch_resumes_every_rank_where_it_was(simulated_manifest, tmp_path):
    """Six steps of batch 4 per rank cross an epoch (28 training samples: three steps an epoch); the run dies at
    step 2 (os._exit on both ranks: no teardown). Resumed, each rank trains on the samples, with the random
    draws, it would have had, and the weights end bit for bit equal to the uninterrupted run's."""
    straight, output = _run(simulated_manifest, tmp_path / "straight", tmp_path / "r-straight", "--steps", "6")
    killed, _ = _run(simulated_manifest, tmp_path / "resumed", tmp_path / "r-killed", "--steps", "6",
                     "--stop-at", "2", expect=17)  # fmt: skip
    resumed, _ = _run(simulated_manifest, tmp_path / "resumed", tmp_path / "r-resumed", "--steps", "6")
    assert output.count("export in") == 1  # one process writes the shared export (and says so)
    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == ["checkpoints", "config.yaml", "export",
                                                                         "logs"]  # fmt: skip
    for rank in range(2):
        assert len(straight[rank]["seen"]) == 6 * 4
        assert killed[rank]["seen"] + resumed[rank]["seen"] == straight[rank]["seen"], rank
    assert not set(straight[0]["seen"][:12]) & set(straight[1]["seen"][:12])  # the ranks share out each epoch
    assert straight[0]["torch_rng"] != straight[1]["torch_rng"]  # the ranks draw different dropout masks
    for rank in range(2):
        assert resumed[rank]["torch_rng"] == straight[rank]["torch_rng"], rank
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_multi_source_ddp_run_shares_each_batch_and_resumes_exactly(simulated_manifest, eval_manifest, tmp_path):
    """Two weighted sources on two processes: every step each rank trains on its own slice of one global batch
    (same count, no item on both); killed at step 2 and resumed, each rank continues with its own samples, and the
    weights match the uninterrupted run's bit for bit."""
    two = ("--second-source", str(eval_manifest), "--steps", "5")
    straight, _ = _run(simulated_manifest, tmp_path / "straight", tmp_path / "r-straight", *two)
    killed, _ = _run(simulated_manifest, tmp_path / "resumed", tmp_path / "r-killed", *two, "--stop-at", "2",
                     expect=17)  # fmt: skip
    resumed, _ = _run(simulated_manifest, tmp_path / "resumed", tmp_path / "r-resumed", *two)
    for rank in range(2):
        assert len(straight[rank]["seen"]) == 5 * 4
        assert killed[rank]["seen"] + resumed[rank]["seen"] == straight[rank]["seen"], rank
    for step in range(5):
        first, second = (set(straight[r]["seen"][step * 4 : (step + 1) * 4]) for r in range(2))
        assert not first & second, step
    ids = straight[0]["seen"] + straight[1]["seen"]
    assert any(i.startswith("sim3-") for i in ids) and any(i.startswith("sim11-") for i in ids)  # both sources
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
