"""A folder of checkpoints kept during training: `ckptfmt.CheckpointManager`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import CheckpointManager, CheckpointNotFoundError, ConfigError, OutputExistsError, read_header

from .helpers import run_cli, small_model, state_dicts_bit_identical

LOSSES = {1: 5.0, 2: 2.0, 3: 4.0, 4: 1.0, 5: 3.0, 6: 6.0}


def _model() -> torch.nn.Module:
    return small_model(base_filters=4, depth=2)[0]


def _files(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name != "model_config.json")


@pytest.mark.parametrize(("mode", "best"), [("min", [4, 2]), ("max", [6, 1])])
def test_the_manager_keeps_the_latest_and_the_best_by_its_metric(tmp_path, mode, best):
    manager = CheckpointManager(tmp_path, keep_last=1, keep_best=2, metric="loss", mode=mode)
    model = _model()
    for step, loss in LOSSES.items():
        path = manager.save(model, step=step, metrics={"loss": loss, "lr": 0.1})
        assert path == tmp_path / f"step-{step:08d}.safetensors"

    kept = sorted({*best, 6})
    assert [c.step for c in manager.checkpoints] == kept
    assert [c.metrics for c in manager.checkpoints] == [{"loss": LOSSES[s], "lr": 0.1} for s in kept]
    assert manager.best == tmp_path / f"step-{best[0]:08d}.safetensors"
    assert manager.latest == tmp_path / "step-00000006.safetensors"
    assert _files(tmp_path) == sorted(["best_model.safetensors", "last_model.safetensors",
                                       *(f"step-{s:08d}.safetensors" for s in kept)])
    assert os.path.samefile(tmp_path / "best_model.safetensors", manager.best)
    assert os.path.samefile(tmp_path / "last_model.safetensors", manager.latest)
    for entry in ("best_model.safetensors", "last_model.safetensors"):
        assert ckptfmt.verify(tmp_path / entry).ok  # the sidecar binds the entry points too


def test_a_manager_reopened_on_its_folder_knows_its_checkpoints_from_the_files(tmp_path):
    model = _model()
    first = CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="loss")
    for step in (1, 2, 3):
        first.save(model, step=step, metrics={"loss": LOSSES[step]})
    reopened = CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="loss")
    assert reopened.checkpoints == first.checkpoints
    assert [c.metrics for c in reopened.checkpoints] == [{"loss": 2.0}, {"loss": 4.0}]
    assert (reopened.best, reopened.latest) == (first.best, first.latest)
    assert read_header(reopened.latest).training()["global_step"] == 3


def test_a_reopened_folder_is_tidied_of_what_a_crash_left(tmp_path):
    """A crash between deleting a checkpoint's main file and its companion leaves the companion;
    one between a commit and the entry points leaves last_model naming the step before. The next
    manager removes the one and points the other right."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save(model, step=step, optimizer=optimizer)
    (tmp_path / "step-00000001.safetensors").unlink()
    os.replace(tmp_path / "last_model.safetensors", tmp_path / "kept_aside.safetensors")
    os.link(tmp_path / "step-00000002.safetensors", tmp_path / "last_model.safetensors")

    reopened = CheckpointManager(tmp_path, keep_last=3)
    assert [c.step for c in reopened.checkpoints] == [2, 3]
    assert not (tmp_path / "step-00000001.optimizer.safetensors").exists()
    assert (tmp_path / "step-00000002.optimizer.safetensors").exists()
    assert os.path.samefile(tmp_path / "last_model.safetensors", tmp_path / "step-00000003.safetensors")


def _bound(folder) -> list[str]:
    return sorted(json.loads((folder / "model_config.json").read_text())["weights"])


def test_retention_drops_the_sidecar_s_bindings_of_the_steps_it_deletes(tmp_path):
    """Regression: a step deleted by retention stayed bound in model_config.json, which then
    named weights the folder no longer held."""
    model = _model()
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(model, step=step)
    present = _files(tmp_path)
    assert present == ["last_model.safetensors", "step-00000003.safetensors", "step-00000004.safetensors"]
    assert _bound(tmp_path) == present
    reopened = CheckpointManager(tmp_path, keep_last=2)
    assert [c.step for c in reopened.checkpoints] == [3, 4]
    assert _bound(tmp_path) == present
    verified = run_cli("verify", tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines()[-1] == "3 verified, 0 failed"


def test_a_reopened_folder_drops_the_binding_of_a_step_a_crash_deleted(tmp_path):
    """A crash between deleting a step and unbinding it leaves the binding: the next manager
    drops it."""
    model = _model()
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        manager.save(model, step=step)
    (tmp_path / "step-00000001.safetensors").unlink()
    assert "step-00000001.safetensors" in _bound(tmp_path)
    CheckpointManager(tmp_path, keep_last=3)
    assert _bound(tmp_path) == ["last_model.safetensors", "step-00000002.safetensors"]
    assert run_cli("verify", tmp_path).returncode == 0


def test_restore_gives_back_the_weights_and_the_optimizer_scheduler_and_scaler(tmp_path):
    model = _model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2):
        seg, cls = model(torch.rand(2, 1, 8, 8))
        scaler.scale(seg.mean() + cls.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        manager.save(model, step=step, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = _model().train()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=2, gamma=0.5)
    fresh_scaler = torch.amp.GradScaler("cpu")
    restored = manager.restore(fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler, scaler=fresh_scaler)
    assert restored is fresh and state_dicts_bit_identical(fresh.state_dict(), expected)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert all(torch.equal(saved["state"][i][n], loaded["state"][i][n]) for i in saved["state"] for n in saved["state"][i])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_scaler.state_dict() == scaler.state_dict()

    rebuilt = manager.restore(which=1)
    assert type(rebuilt) is type(model) and rebuilt.training
    assert state_dicts_bit_identical(rebuilt.state_dict(), load_file(tmp_path / "step-00000001.safetensors"))
    with pytest.raises(CheckpointNotFoundError, match=r"holds no step 7 checkpoint \(steps: 1, 2\)"):
        manager.restore(which=7)


def test_steps_only_go_forward_in_a_folder(tmp_path):
    manager = CheckpointManager(tmp_path)
    model = _model()
    manager.save(model, step=10)
    with pytest.raises(OutputExistsError, match="holds a checkpoint of step 10 already"):
        manager.save(model, step=10)
    with pytest.raises(ConfigError, match=r"step 5 is not after the latest checkpoint's \(step 10"):
        manager.save(model, step=5)
    with pytest.raises(ConfigError, match="keep_best=2 needs the metric"):
        CheckpointManager(tmp_path, keep_best=2)


def test_an_asynchronous_manager_returns_before_the_write_and_raises_its_error_at_the_next_save(tmp_path):
    model = _model()
    manager = CheckpointManager(tmp_path, keep_last=1, asynchronous=True)
    path = manager.save(model, step=1)
    manager.wait()
    assert manager.checkpoints[0].path == path and ckptfmt.verify(path).ok

    (tmp_path / "step-00000002.safetensors").mkdir()  # the next write cannot take its name
    manager.save(model, step=2)
    with pytest.raises(ckptfmt.WriteError, match="is a folder"):
        manager.save(model, step=3)
    assert [c.step for c in manager.checkpoints] == [1]


# The child saves checkpoints in a loop until it is killed; each step's loss is known to the test.
_SAVING_FOREVER = """
import sys, torch, ckptfmt
from ckptfmt.models.multitask_unet import MultiTaskUNet
model = MultiTaskUNet(base_filters=16, depth=3)
optimizer = torch.optim.Adam(model.parameters())
manager = ckptfmt.CheckpointManager(sys.argv[1], keep_last=2, keep_best=2, metric="loss")
step = 0
while True:
    step += 1
    manager.save(model, step=step, metrics={"loss": float((step * 7) % 11)}, optimizer=optimizer)
"""


@pytest.mark.subprocess  # Its own process: a SIGKILL while it saves is the point.
def test_a_manager_killed_while_saving_leaves_the_kept_set_and_reopens_right(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _SAVING_FOREVER, str(tmp_path)], stderr=subprocess.PIPE)
    try:
        while not (tmp_path / "step-00000006.safetensors").exists():
            assert child.poll() is None, child.stderr.read().decode()
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()

    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=2, metric="loss")
    steps = [c.step for c in manager.checkpoints]
    last = max(steps)
    loss = {step: float((step * 7) % 11) for step in range(1, last + 1)}
    best = sorted(loss, key=lambda s: (loss[s], s))[:2]
    assert {last - 1, last, *best} <= set(steps)  # never fewer than the kept set
    assert manager.latest.name == f"step-{last:08d}.safetensors"
    assert manager.best.name == f"step-{best[0]:08d}.safetensors"
    for checkpoint in manager.checkpoints:  # each whole, with its companion
        assert ckptfmt.verify(checkpoint.path).ok
        assert checkpoint.metrics == {"loss": loss[checkpoint.step]}
    assert os.path.samefile(tmp_path / "last_model.safetensors", manager.latest)
    assert os.path.samefile(tmp_path / "best_model.safetensors", manager.best)
    companions = {p.name.split(".")[0] for p in tmp_path.glob("step-*.optimizer.safetensors")}
    assert companions == {c.path.name.split(".")[0] for c in manager.checkpoints}
