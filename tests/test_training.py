"""The training engine with a toy method: config loading, stages, schedule, EMA, exact resume, export."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from radalign.config import (
    PretrainConfig,
    StageConfig,
    TrainerConfig,
    find_config,
    from_dict,
    load_config,
)
from radalign.errors import ConfigError
from radalign.methods.base import Method
from radalign.methods.registry import METHODS, register
from radalign.training.module import lr_lambda


class ToyMethod(Method):
    """Pixels -> linear embedding; 'fit' pulls embeddings to the label vector, 'norm' is a second objective."""

    name = "toy"
    objective_names = ("fit", "norm")

    def __init__(self, config, tokenizer=None, *, for_inference=False):
        super().__init__(config, tokenizer, for_inference=for_inference)
        self.encoder = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(64, 4))
        self.setup_ema()

    def losses(self, batch):
        z = self.encoder(batch["image"])
        target = torch.nan_to_num(batch["labels"][:, :4], nan=0.0).clamp_min(0)
        return {"fit": ((z - target) ** 2).mean(), "norm": z.pow(2).mean()}

    def encode_images(self, images):
        return nn.functional.normalize(self.encoder(images), dim=-1)


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    register("toy")(ToyMethod)
    yield
    METHODS.pop("toy", None)


def toy_config(manifest, **trainer) -> PretrainConfig:
    return from_dict(
        PretrainConfig,
        {
            "method": "toy",
            "objectives": {"fit": {"weight": 1.0}, "norm": {"weight": 0.0}},
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "loader": {"manifest": str(manifest), "tokenizer": None, "image_size": 32, "batch_size": 4,
                       "preset": "none", "require_report": False},
            "trainer": {"max_steps": 6, "progress": False, "checkpoint_every_n_steps": 3, "log_every_n_steps": 1,
                        **trainer},
        },
    )  # fmt: skip


# -- killing and comparing runs ------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


class _KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Killed


def _export_weights(result):
    from safetensors.torch import load_file

    return load_file(result.export / "model.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_every_shipped_config_loads_and_names_a_registered_method():
    import importlib

    from radalign.config import shipped_config_dir
    from radalign.methods.registry import BUILTIN_METHODS

    for module in BUILTIN_METHODS:
        importlib.import_module(f"radalign.methods.{module}")
    paths = sorted((shipped_config_dir() / "methods").glob("*.yaml"))
    assert len(paths) >= 8
    for path in [*paths, *(shipped_config_dir() / "protocols").glob("*.yaml")]:  # they cite the project's own docs
        assert "shared/" not in path.read_text(encoding="utf-8"), path.name
    for path in paths:
        config = load_config(path)
        assert config.method in METHODS, path.name
        if not path.stem.endswith("-tiny") and "ablation" not in path.stem:  # every method ships a CPU-sized twin
            assert (path.parent / f"{path.stem}-tiny.yaml").is_file(), path.name


def test_unknown_config_keys_are_errors_that_name_them(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: clip\noptim: {lr: 1.0e-4, lrr: 3}\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"loader\.batchsize"):
        load_config(find_config("clip-tiny"), {"loader.batchsize": 3})
    with pytest.raises(ConfigError, match="schedule"):
        load_config(find_config("clip-tiny"), {"optim.schedule": "linearly"})
    assert load_config(find_config("clip-tiny"), {"optim.lr": 0.5}).optim.lr == 0.5


def test_stage_weights_switch_at_their_step():
    config = PretrainConfig(
        objectives={"a": {"weight": 1.0}, "b": {"weight": 0.0}},
        stages=[StageConfig(name="two", start_step=10, weights={"b": 0.5, "a": 0.25})],
    )
    assert config.weights_at(9, 0) == {"a": 1.0, "b": 0.0}
    assert config.weights_at(10, 0) == {"a": 0.25, "b": 0.5}


def test_a_stage_boundary_recreates_the_optimiser_and_says_so(simulated_manifest, tmp_path, caplog):
    import lightning as L

    from radalign.training.run import pretrain

    seen = []

    class Watch(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            steps_taken = max((float(v["step"]) for v in optimizer.state.values()), default=0.0)
            seen.append((trainer.global_step, steps_taken, optimizer.param_groups[0]["lr"]))

    config = toy_config(simulated_manifest)
    config.stages = [StageConfig(name="with-norm", start_step=3, weights={"norm": 1.0}, reset_optimizer=True)]
    with caplog.at_level("INFO", logger="radalign"):
        pretrain(config, tmp_path / "run", callbacks=[Watch()])
    assert "stage 1 (with-norm) begins at step 3: losses fit x 1, norm x 1; optimiser and schedule re-created" in (
        caplog.text
    )
    by_step = {step: (moments, lr) for step, moments, lr in seen}
    assert by_step[2][0] == 2 and by_step[3][0] == 0  # step 3 starts from an optimiser with no Adam moments
    # the fresh schedule warms up again: step 3's learning rate is the first warm-up value, as at step 0
    assert by_step[3][1] == pytest.approx(by_step[0][1]) and by_step[3][1] < by_step[2][1]
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/stage" in metrics and "train/norm" in metrics


def test_learning_rate_warms_up_then_follows_a_cosine():
    values = [lr_lambda(s, warmup_steps=4, total_steps=20, schedule="cosine", min_ratio=0.1) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))
    mid = 4 + 8
    assert values[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("staged", [False, True], ids=["one-stage", "killed-after-an-optimiser-reset"])
def test_a_killed_run_resumed_from_its_checkpoint_matches_an_uninterrupted_run(simulated_manifest, tmp_path, staged):
    """With ``staged``, a stage re-creates the optimiser at step 2 with its own lr and warm-up before the step-3
    checkpoint (PRIOR's case): the resumed run must rebuild that stage's optimiser and schedule, not stage 1's."""
    from radalign.training.run import pretrain

    def config():
        c = toy_config(simulated_manifest)
        if staged:
            c.stages = [StageConfig(name="second", start_step=2, weights={"norm": 1.0}, reset_optimizer=True,
                                    lr=3e-3, warmup_steps=3)]  # fmt: skip
        return c

    straight = pretrain(config(), tmp_path / "straight")
    with pytest.raises(_Killed):  # the step-3 checkpoint is on disk; the process "dies" at step 3
        pretrain(config(), tmp_path / "resumed", callbacks=[_KillAt(3)])
    resumed = pretrain(config(), tmp_path / "resumed")
    assert straight.steps == resumed.steps == 6

    a, b = _export_weights(straight), _export_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


_KILL_SCRIPT = """
import json, os, signal, sys

import lightning as L

from radalign.config import find_config, load_config
from radalign.training.run import pretrain

overrides, out, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])


class Kill(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == kill_at:  # after the step-`kill_at` checkpoint: no cleanup, no flush
            os.kill(os.getpid(), signal.SIGKILL)


pretrain(load_config(find_config("clip-tiny"), overrides), out, callbacks=[Kill()])
"""


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "two-loader-workers"])
def test_a_run_killed_at_any_step_resumes_bit_for_bit_with_dropout_and_augmentation(
    simulated_manifest, tmp_path, workers
):
    """CLIP-tiny: the MiniLM's dropout draws from torch's global generator, as do the PRIOR preset's crops and the
    sentence shuffle in-process (loader workers: per-item seeds); SIGKILL after checkpoints 2, 3 and 5 of 6 steps
    (3 only with workers, which cost a process start each)."""
    import json
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from radalign.training.run import pretrain

    overrides = {
        "loader.manifest": str(simulated_manifest), "loader.image_size": 32, "loader.batch_size": 4,
        "loader.max_length": 32, "loader.preset": "prior", "loader.text_shuffle": True, "trainer.max_steps": 6,
        "trainer.checkpoint_every_n_steps": 1, "trainer.progress": False, "model.text.freeze_layers": 4,
        "loader.num_workers": workers,
    }  # fmt: skip
    straight = load_file(pretrain(load_config(find_config("clip-tiny"), overrides), tmp_path / "straight").export
                         / "model.safetensors")  # fmt: skip
    for kill_at in (2, 3, 5) if workers == 0 else (3,):
        run = tmp_path / f"killed-at-{kill_at}"
        killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(overrides), str(run), str(kill_at)],
                                capture_output=True, text=True)  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert not (run / "export").exists()
        resumed = load_file(pretrain(load_config(find_config("clip-tiny"), overrides), run).export
                            / "model.safetensors")  # fmt: skip
        assert resumed.keys() == straight.keys()
        differing = [k for k in straight if not torch.equal(straight[k], resumed[k])]
        assert differing == [], f"killed at step {kill_at}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def test_a_training_item_is_augmented_from_its_own_seed(simulated_manifest):
    from radalign.data.datamodule import DataConfig, RadDataModule

    data = RadDataModule(DataConfig(manifest=str(simulated_manifest), image_size=32, preset="prior"))
    data.setup("fit")
    dataset = data.datasets["train"]
    before = torch.get_rng_state()
    a, b, c = dataset[0, 7], dataset[0, 7], dataset[0, 8]
    assert torch.equal(torch.get_rng_state(), before)  # the global generator (dropout's) is untouched
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])


class _RunsOnUnpickle:
    """Unpickling this calls open(marker, "w"): what a planted checkpoint could do with any callable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(simulated_manifest, tmp_path, monkeypatch):
    from radalign.training.run import pretrain

    run, marker = tmp_path / "run", tmp_path / "code-ran"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": _RunsOnUnpickle(marker)}, run / "checkpoints" / "last.ckpt")
    # the variable makes torch.load unpickle anything unless the caller insists on weights_only
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ConfigError, match="refused to resume"):
        pretrain(toy_config(simulated_manifest), run)
    assert not marker.exists()


def test_ema_copy_trails_the_trained_weights(simulated_manifest, tmp_path):
    from radalign.training.run import pretrain

    config = toy_config(simulated_manifest)
    config.ema.modules = ["encoder"]
    config.ema.decay = 0.5
    result = pretrain(config, tmp_path / "ema")
    from safetensors.torch import load_file

    state = load_file(result.export / "model.safetensors")
    live, teacher = state["encoder.2.weight"], state["ema.copies.encoder.2.weight"]
    assert not torch.equal(live, teacher)  # it moved, but not onto the live weights
    assert (live - teacher).abs().max() < 1.0


def test_run_folder_holds_checkpoints_logs_and_export(simulated_manifest, tmp_path):
    from radalign.training.run import pretrain

    result = pretrain(toy_config(simulated_manifest), tmp_path / "run")
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000006.ckpt"
    assert result.checkpoint.with_name("step-00000006.ckpt.sha256").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/fit" in metrics
    assert (result.export / "config.json").is_file()


def test_trainer_flags_reach_lightning(simulated_manifest, tmp_path):
    from radalign.training.run import build_trainer

    config = toy_config(simulated_manifest, accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer = build_trainer(config, tmp_path)
    assert trainer.accumulate_grad_batches == 2 and trainer.gradient_clip_val == 0.5
    assert trainer.max_steps == 6
    assert isinstance(TrainerConfig().precision, str)


# -- checkpoints that survive (issue 14, defect 4) -------------------------------------------------------------------
@pytest.fixture
def straight_run(simulated_manifest, tmp_path):
    from radalign.training.run import pretrain

    return _export_weights(pretrain(toy_config(simulated_manifest, checkpoint_every_n_steps=1), tmp_path / "straight"))


@pytest.mark.parametrize("damage", ["empty", "bit-flip", "no-checksum", "killed-mid-save"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    simulated_manifest, tmp_path, straight_run, damage, monkeypatch, caplog
):
    from radalign.training import checkpoints
    from radalign.training.run import pretrain

    run = tmp_path / "run"
    config = toy_config(simulated_manifest, checkpoint_every_n_steps=1)
    if damage == "killed-mid-save":
        real = checkpoints.commit_checkpoint

        def dies_at_step_4(written, final):
            if final.name == "step-00000004.ckpt":
                raise _Killed  # the file is fully written but neither checksummed nor renamed
            real(written, final)

        monkeypatch.setattr(checkpoints, "commit_checkpoint", dies_at_step_4)
        with pytest.raises(_Killed):
            pretrain(config, run)
        monkeypatch.undo()
        assert (run / "checkpoints" / ".step-00000004.ckpt.partial").is_file()
    else:
        with pytest.raises(_Killed):
            pretrain(config, run, callbacks=[_KillAt(5)])
        newest = run / "checkpoints" / "step-00000005.ckpt"
        if damage == "empty":
            newest.write_bytes(b"")
        elif damage == "bit-flip":
            data = bytearray(newest.read_bytes())
            data[len(data) // 2] ^= 0x10
            newest.write_bytes(bytes(data))
        else:
            newest.with_name(newest.name + ".sha256").unlink()
    caplog.set_level("INFO")
    resumed = pretrain(config, run)
    if damage != "killed-mid-save":
        assert "resuming from the previous good checkpoint step-00000004.ckpt" in caplog.text
        assert "step-00000005.ckpt is not used" in caplog.text
    _assert_same_weights(straight_run, _export_weights(resumed))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_file())
    assert kept == [
        "step-00000005.ckpt",
        "step-00000005.ckpt.sha256",
        "step-00000006.ckpt",
        "step-00000006.ckpt.sha256",
    ]


def test_a_moved_run_folder_resumes_where_it_was_without_piling_up_copies(simulated_manifest, tmp_path, straight_run):
    import shutil

    from radalign.training.run import pretrain

    config = toy_config(simulated_manifest, checkpoint_every_n_steps=1)
    with pytest.raises(_Killed):
        pretrain(config, tmp_path / "first", callbacks=[_KillAt(3)])
    shutil.move(tmp_path / "first", tmp_path / "moved")
    result = pretrain(config, tmp_path / "moved")
    assert result.steps == 6
    _assert_same_weights(straight_run, _export_weights(result))
    names = sorted(p.name for p in (tmp_path / "moved" / "checkpoints").glob("*.ckpt"))
    assert names == ["step-00000005.ckpt", "step-00000006.ckpt"]


def test_no_valid_checkpoint_starts_from_step_0_and_says_why(simulated_manifest, tmp_path, caplog):
    from radalign.training.run import pretrain

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-00000004.ckpt").write_bytes(b"")
    caplog.set_level("INFO")
    result = pretrain(toy_config(simulated_manifest), tmp_path / "run")
    assert result.steps == 6
    assert "no checkpoint verifies, starting from step 0" in caplog.text and "empty" in caplog.text


def test_a_damaged_checkpoint_of_a_later_step_is_moved_aside_and_never_costs_a_good_one(simulated_manifest, tmp_path):
    from radalign.training.run import pretrain

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-00000009.ckpt").write_bytes(b"")  # left in place it would be one of "the newest two"
    pretrain(toy_config(simulated_manifest, checkpoint_every_n_steps=1), tmp_path / "run")
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["step-00000005.ckpt", "step-00000006.ckpt"]
    assert (folder / "damaged" / "step-00000009.ckpt").is_file()


def test_a_fresh_start_keeps_the_earlier_run_aside(simulated_manifest, tmp_path):
    from radalign.training.run import pretrain

    run = tmp_path / "run"
    pretrain(toy_config(simulated_manifest), run)
    other = toy_config(simulated_manifest)
    other.optim.lr = 3e-2
    pretrain(other, run, resume=False)
    superseded = list((run / "checkpoints" / "superseded").glob("*/step-00000006.ckpt"))
    assert len(superseded) == 1
    kept = superseded[0].parent  # the earlier run's record travels with its checkpoints
    assert "lr: 0.01" in (kept / "config.yaml").read_text() and (kept / "export" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "step-00000006.ckpt").is_file()
    assert "lr: 0.03" in (run / "config.yaml").read_text()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` -> (size, mtime in ns): what 'nothing was rewritten' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def test_a_finished_run_run_again_says_so_and_rewrites_nothing(simulated_manifest, tmp_path, caplog):
    from radalign.training.run import pretrain

    run = tmp_path / "run"
    first = pretrain(toy_config(simulated_manifest), run)
    assert not first.already_complete
    before = _snapshot(run)
    caplog.set_level("INFO")
    again = pretrain(toy_config(simulated_manifest), run)
    assert again.already_complete and again.steps == 6 and again.export == first.export
    assert "is already complete: 6 of 6 steps" in caplog.text and "raise --trainer.max_steps" in caplog.text
    assert _snapshot(run) == before  # no new log version, no re-export, config.yaml untouched

    # a changed batch size is refused before anything is written, even though the run is complete
    bigger = toy_config(simulated_manifest)
    bigger.loader.batch_size = 8
    with pytest.raises(ConfigError, match=r"loader\.batch_size: 4 -> 8"):
        pretrain(bigger, run)
    assert _snapshot(run) == before


def test_another_method_pointed_at_a_run_folder_is_refused_before_writing(simulated_manifest, tmp_path):
    from radalign.training.run import pretrain

    run = tmp_path / "run"
    pretrain(toy_config(simulated_manifest), run)
    before = _snapshot(run)
    other = toy_config(simulated_manifest)
    other.objectives["norm"]["weight"] = 0.5
    with pytest.raises(ConfigError, match=r"refused to resume .*objectives\.norm\.weight: 0\.0 -> 0\.5"):
        pretrain(other, run)
    assert _snapshot(run) == before
    # another method cannot continue the run, not even with --allow-config-change
    register("toy-2")(ToyMethod)
    try:
        foreign = toy_config(simulated_manifest)
        foreign.method = "toy-2"
        with pytest.raises(ConfigError, match=r"it is a toy run and this command trains toy-2; another method"):
            pretrain(foreign, run, allow_config_change=True)
    finally:
        METHODS.pop("toy-2", None)
    assert _snapshot(run) == before
    # without checkpoints (deleted, or never written) config.yaml still names the run the folder holds
    for path in (run / "checkpoints").glob("step-*"):
        path.unlink()
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"refused to write into .*another run.*--resume false"):
        pretrain(other, run)
    assert _snapshot(run) == before


def test_a_resume_with_allowed_changes_records_them_beside_the_original_config(simulated_manifest, tmp_path):
    from radalign.training.run import pretrain

    run = tmp_path / "run"
    with pytest.raises(_Killed):
        pretrain(toy_config(simulated_manifest), run, callbacks=[_KillAt(4)])
    original = (run / "config.yaml").read_text()
    changed = toy_config(simulated_manifest)
    changed.optim.lr = 3e-2
    pretrain(changed, run, allow_config_change=True)
    assert (run / "config.yaml").read_text() == original
    assert "lr: 0.03" in (run / "config.resumed-step00000003.yaml").read_text()
    assert '"lr": 0.03' in (run / "export" / "config.json").read_text()  # the export says what it ended with


def test_the_export_is_written_whole_and_readable_by_colleagues(simulated_manifest, tmp_path):
    import os
    import stat

    from radalign.training.run import pretrain

    previous = os.umask(0o022)
    try:
        result = pretrain(toy_config(simulated_manifest), tmp_path / "run")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((result.export / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "run" / "config.yaml").stat().st_mode) == 0o644
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no staging left over


def test_resuming_with_a_changed_config_or_manifest_is_refused(simulated_manifest, tmp_path, caplog):
    import shutil

    from radalign.training.run import pretrain

    run = tmp_path / "run"
    config = toy_config(simulated_manifest)
    with pytest.raises(_Killed):
        pretrain(config, run, callbacks=[_KillAt(4)])
    written = (run / "config.yaml").read_text()

    changed = toy_config(simulated_manifest)
    changed.optim.lr = 3e-2
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.01 -> 0\.03.*--allow-config-change true"):
        pretrain(changed, run)
    assert (run / "config.yaml").read_text() == written  # the run's record still says what it trained with

    longer = toy_config(simulated_manifest, max_steps=7)  # training longer is a continuation, not a change
    # the same content under another name (a renamed or moved archive) is fine too; beside the original, as the
    # manifest's image paths are relative to its folder
    other = simulated_manifest.with_name(f"copy-{tmp_path.name}.csv")
    shutil.copy(simulated_manifest, other)
    try:
        longer.loader.manifest = other
        with pytest.raises(_Killed):
            pretrain(longer, run, callbacks=[_KillAt(5)])
        other.write_text(other.read_text().replace("train", "val", 1))
        with pytest.raises(ConfigError, match=r"loader\.manifest \(its content\)"):
            pretrain(longer, run)
    finally:
        other.unlink()

    caplog.set_level("WARNING")
    assert pretrain(changed, run, allow_config_change=True).steps == 6
    assert "resuming" in caplog.text and "optim.lr" in caplog.text


def test_a_run_killed_at_an_epoch_boundary_resumes_exactly(simulated_manifest, tmp_path):
    """The checkpoint of an epoch's last step is written before Lightning closes the epoch: the resume must neither
    repeat nor skip an epoch (batch 8: four or five steps an epoch, so six steps cross a boundary)."""
    from radalign.training.run import pretrain

    class KillAtSecondEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise _Killed

    def config():
        c = toy_config(simulated_manifest, checkpoint_every_n_steps=1)
        c.loader.batch_size = 8
        return c

    straight = pretrain(config(), tmp_path / "straight")
    with pytest.raises(_Killed):
        pretrain(config(), tmp_path / "resumed", callbacks=[KillAtSecondEpoch()])
    resumed = pretrain(config(), tmp_path / "resumed")
    assert straight.steps == resumed.steps == 6
    _assert_same_weights(_export_weights(straight), _export_weights(resumed))


def test_ema_update_moves_each_copy_by_one_minus_decay():
    from radalign.models.ema import EMACopies

    model = nn.ModuleDict({"encoder": nn.Linear(3, 2)})
    ema = EMACopies(model, ["encoder"], decay=0.9)  # 0.5 would hide decay and 1 - decay being swapped
    before = ema["encoder"].weight.clone()
    with torch.no_grad():
        model["encoder"].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema["encoder"].weight, 0.9 * before + 0.1 * model["encoder"].weight)


def test_a_resume_past_a_stage_restart_keeps_that_stage_s_cosine_length(simulated_manifest, tmp_path):
    """The stage at step 2 re-creates the optimiser with a schedule over the remaining 6 steps; resumed at step 5,
    3 steps into its cosine, the schedule must still be 6 steps long (not the run's 8), or the lr differs."""
    from radalign.training.run import pretrain

    def config():
        c = toy_config(simulated_manifest, max_steps=8, checkpoint_every_n_steps=1)
        c.stages = [StageConfig(name="second", start_step=2, weights={"norm": 1.0}, reset_optimizer=True,
                                lr=3e-3, warmup_steps=1)]  # fmt: skip
        return c

    straight = pretrain(config(), tmp_path / "straight")
    with pytest.raises(_Killed):
        pretrain(config(), tmp_path / "resumed", callbacks=[_KillAt(5)])
    resumed = pretrain(config(), tmp_path / "resumed")
    _assert_same_weights(_export_weights(straight), _export_weights(resumed))


def test_under_gradient_accumulation_the_teacher_moves_once_per_optimiser_step(
    simulated_manifest, tmp_path, monkeypatch
):
    from radalign.models.ema import EMACopies
    from radalign.training.run import pretrain

    calls = []
    real = EMACopies.update
    monkeypatch.setattr(EMACopies, "update", lambda self, model: (calls.append(1), real(self, model))[1])
    config = toy_config(simulated_manifest, max_steps=3, accumulate_grad_batches=2)
    config.ema.modules = ["encoder"]
    result = pretrain(config, tmp_path / "run")
    assert result.steps == 3 and len(calls) == 3  # 6 micro-batches, 3 optimiser steps, 3 teacher updates


def test_bf16_mixed_precision_trains_a_step_on_the_cpu(simulated_manifest, tmp_path, monkeypatch):
    from radalign.training.run import pretrain

    seen = []
    real = ToyMethod.losses

    def watched(self, batch):  # the forward must run under CPU bf16 autocast, not silently in float32
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, batch)

    monkeypatch.setattr(ToyMethod, "losses", watched)
    result = pretrain(toy_config(simulated_manifest, max_steps=2, precision="bf16-mixed"), tmp_path / "run")
    assert seen and all(seen_step == (True, torch.bfloat16) for seen_step in seen)
    weights = _export_weights(result)
    assert result.steps == 2 and math.isfinite(result.metrics["train/loss"])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert weights["encoder.2.weight"].dtype == torch.float32  # mixed precision keeps float32 master weights


def test_validation_runs_every_tenth_of_the_run_and_a_manifest_without_val_trains_without_it(
    simulated_manifest, tmp_path, caplog
):
    import csv

    import pandas as pd

    from radalign.training.run import pretrain

    # batch 32 of 28 training samples: one batch an epoch, where per-epoch validation ran after every step
    config = toy_config(simulated_manifest, max_steps=20, log_every_n_steps=1)
    config.loader.batch_size = 32
    pretrain(config, tmp_path / "run")
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv") as f:
        validated = [int(row["step"]) for row in csv.DictReader(f) if row.get("val/loss")]
    assert len(validated) == 10, validated

    table = pd.read_csv(simulated_manifest)
    no_val = simulated_manifest.with_name(f"no-val-{tmp_path.name}.csv")
    table[table["split"] != "val"].to_csv(no_val, index=False)
    try:
        caplog.set_level("INFO")
        other = toy_config(no_val)
        assert pretrain(other, tmp_path / "no-val").steps == 6
        assert f"starting toy in {tmp_path / 'no-val'}: checking {no_val}" in caplog.text  # said before start-up
        assert "no 'xray' records in the 'val' split: training runs without validation" in caplog.text
    finally:
        no_val.unlink()
