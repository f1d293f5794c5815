"""A writer killed at any point: the previous checkpoint (or, once past the commit point, the whole
new one) verifies and loads, and nothing is left that blocks a rerun.

Each writer runs in a process of its own, which is the point: it is stalled at a chosen point by
wrapping one system call, then killed with SIGKILL or SIGTERM, as a scheduler or a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptfmt

from ..helpers import run_cli, small_model, state_dicts_bit_identical

pytestmark = pytest.mark.subprocess

# Stalls the writer at POINT, then waits to be killed:
#   writing         fsyncing the weights (or a shard), before anything took a name
#   commit-point    about to link the commit record into place
#   renaming        after the first file of the new set took its name
#   record-deleted  every file renamed, the record not yet deleted
# (the STALL_AFTER-th time after the first, when it is set: a later file of a batch).
WRITER = """
import os, sys, time
from pathlib import Path
folder, action, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
real_fsync, real_link, real_replace, real_unlink = os.fsync, os.link, os.replace, os.unlink
renames = []
passed = [int(os.environ.get("STALL_AFTER", "0"))]

def stall():
    passed[0] -= 1
    if passed[0] >= 0:
        return
    (folder.parent / "stalled").touch()
    time.sleep(600)

def fsync(fd):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if point == "writing" and ".ckptfmt-tmp-" in name and "optimizer" not in name and "model_config" not in name:
        stall()
    return real_fsync(fd)

def link(source, target, **kwargs):
    if point == "commit-point" and str(target).endswith(".ckptfmt-commit"):
        stall()
    return real_link(source, target, **kwargs)

def replace(source, target, **kwargs):
    if os.path.dirname(os.path.abspath(target)) == str(folder):
        renames.append(target)
        if point == "renaming" and len(renames) == 2:
            stall()
    return real_replace(source, target, **kwargs)

def unlink(path, **kwargs):
    if point == "record-deleted" and str(path).endswith(".ckptfmt-commit"):
        stall()
    return real_unlink(path, **kwargs)

os.fsync, os.link, os.replace, os.unlink = fsync, link, replace, unlink
if action == "convert":
    from ckptfmt.cli import main
    os.chdir(folder)
    main(["convert", "m.pth", *sys.argv[4:]])
elif action == "convert-folder":  # in groups of 2, so that a batch of 5 files has 3
    import ckptfmt.converter
    from ckptfmt.cli import main
    ckptfmt.converter.GROUP_FILES = 2
    os.chdir(folder)
    main(["convert", "."])
else:
    import torch, ckptfmt
    from tests.helpers import small_model
    from tests.security.test_write_kills import trained
    model, optimizer = trained(4)
    shards = {"max_shard_size": "8KB"} if action == "save-sharded" else {}
    ckptfmt.save(model, folder / "m.safetensors", optimizer=optimizer, overwrite=True, **shards)
"""

ROOT = Path(__file__).resolve().parents[2]


def trained(seed: int):
    """A small model and an SGD optimizer with momentum buffers: a checkpoint with a companion."""
    model, _ = small_model(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sum(output.sum() for output in model(torch.zeros(1, 1, 16, 16))).backward()
    optimizer.step()
    return model, optimizer


def legacy_file(path: Path, seed: int) -> dict[str, torch.Tensor]:
    model, optimizer = trained(seed)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": 1},
               path)
    return model.state_dict()


def kill_writer(folder: Path, action: str, point: str, sig: int, *options: str, stall_after: int = 0) -> None:
    stalled = folder.parent / "stalled"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), action, point, *options], cwd=ROOT,
                               env={**os.environ, "STALL_AFTER": str(stall_after)})
    try:
        deadline = time.monotonic() + 240
        while not stalled.exists():
            assert process.poll() is None, f"the writer ended (exit {process.returncode}) before reaching {point}"
            assert time.monotonic() < deadline, f"the writer never reached {point}"
            time.sleep(0.05)
    finally:  # killed whatever happened: a stalled writer never outlives the test
        process.send_signal(sig)
        process.wait(timeout=60)
    stalled.unlink()


def assert_whole(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """`path` verifies (companion and sidecar included), and loads as the `expected` weights."""
    result = run_cli("verify", path.name, cwd=path.parent)
    assert result.returncode == 0, result.stderr
    assert state_dicts_bit_identical(ckptfmt.load_model(path).state_dict(), expected)
    assert ckptfmt.load_model(path).state_dict().keys() == expected.keys()


POINTS = [("writing", signal.SIGKILL), ("commit-point", signal.SIGTERM), ("renaming", signal.SIGKILL),
          ("record-deleted", signal.SIGTERM)]
PAST_THE_COMMIT_POINT = {"renaming", "record-deleted"}


@pytest.mark.parametrize(("point", "sig"), POINTS)
def test_convert_force_killed_leaves_one_whole_checkpoint(tmp_path, point, sig):
    folder = tmp_path / "run"
    folder.mkdir()
    old = legacy_file(folder / "m.pth", seed=0)
    ckptfmt.convert(folder / "m.pth")
    new = legacy_file(folder / "m.pth", seed=4)
    kill_writer(folder, "convert", point, sig, "--force")
    assert_whole(folder / "m.safetensors", new if point in PAST_THE_COMMIT_POINT else old)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize(("point", "sig"), POINTS)
def test_save_overwrite_killed_leaves_one_whole_checkpoint(tmp_path, point, sig, sharded):
    folder = tmp_path / "run"
    folder.mkdir()
    model, optimizer = trained(0)
    path = ckptfmt.save(model, folder / "m.safetensors", optimizer=optimizer,
                        **({"max_shard_size": "8KB"} if sharded else {}))
    assert path.name == ("m.safetensors.index.json" if sharded else "m.safetensors")
    kill_writer(folder, "save-sharded" if sharded else "save", point, sig)
    expected = trained(4)[0] if point in PAST_THE_COMMIT_POINT else model
    assert_whole(path, expected.state_dict())


@pytest.mark.parametrize(("point", "sig"), [("writing", signal.SIGKILL), ("renaming", signal.SIGTERM)])
def test_interrupted_fresh_convert_does_not_block_the_rerun(tmp_path, point, sig):
    """Regression: a killed first convert left an orphan companion, and the rerun failed with
    "already exists; pass --force"."""
    folder = tmp_path / "run"
    folder.mkdir()
    weights = legacy_file(folder / "m.pth", seed=0)
    kill_writer(folder, "convert", point, sig)
    result = run_cli("convert", "m.pth", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert_whole(folder / "m.safetensors", weights)
    assert sorted(p.name for p in folder.iterdir()) == ["m.optimizer.safetensors", "m.pth", "m.safetensors",
                                                        "model_config.json"]


def test_a_reader_that_cannot_finish_a_killed_commit_names_its_record(tmp_path, monkeypatch):
    """A folder the reader may not write to (root ignores permissions: the refusal is injected):
    one line naming the record and what to do, never a mixed set of files."""
    import errno
    import os

    folder = tmp_path / "run"
    folder.mkdir()
    legacy_file(folder / "m.pth", seed=0)
    ckptfmt.convert(folder / "m.pth")
    legacy_file(folder / "m.pth", seed=4)
    kill_writer(folder, "convert", "renaming", signal.SIGKILL, "--force")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    result = run_cli("verify", "m.safetensors", cwd=folder)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "[FAIL] m.safetensors: a commit of this checkpoint was interrupted (its record .m.safetensors.ckptfmt-commit "
        f"is left), and this process cannot finish it ({folder} is on a read-only file system); run any ckptfmt command on the "
        "checkpoint as a user who may write to its folder, which finishes it; until then its files are those of the "
        "previous save or of the new one"]
    monkeypatch.undo()
    assert_whole(folder / "m.safetensors", legacy_file(folder / "m.pth", seed=4))


def test_a_first_save_killed_past_its_commit_point_loads_whole(tmp_path):
    """The main file takes its name last: a reader asking for it finishes the commit first,
    rather than saying there is no such file."""
    folder = tmp_path / "run"
    folder.mkdir()
    kill_writer(folder, "save", "renaming", signal.SIGKILL)
    assert not (folder / "m.safetensors").exists()
    loaded = ckptfmt.load_model(folder / "m.safetensors")
    assert state_dicts_bit_identical(loaded.state_dict(), trained(4)[0].state_dict())
    assert_whole(folder / "m.safetensors", trained(4)[0].state_dict())


def test_a_folder_batch_killed_mid_group_leaves_its_committed_groups_and_the_rerun_converts_the_rest(tmp_path):
    """Five files in groups of two, killed while the second group's second file is written: the
    first group is converted and whole, nothing of the second took a name, and the rerun
    converts the rest."""
    folder = tmp_path / "run"
    folder.mkdir()
    weights = {name: legacy_file(folder / f"{name}.pth", seed=seed) for seed, name in enumerate("abcde")}
    kill_writer(folder, "convert-folder", "writing", signal.SIGKILL, stall_after=3)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "a.optimizer.safetensors", "a.pth", "a.safetensors", "b.optimizer.safetensors", "b.pth", "b.safetensors",
        "c.pth", "d.pth", "e.pth", "model_config.json"]
    for name in "ab":
        assert_whole(folder / f"{name}.safetensors", weights[name])
    result = run_cli("convert", ".", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines() if line.startswith("[")] == [
        ["[SKIP]", "a.pth:"], ["[SKIP]", "b.pth:"], ["[OK]", "c.pth"], ["[OK]", "d.pth"], ["[OK]", "e.pth"]]
    for name in "abcde":
        assert_whole(folder / f"{name}.safetensors", weights[name])
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_group_killed_while_its_files_take_their_names_is_finished_by_a_reader_of_any_of_them(tmp_path):
    """The group's one commit record is found under each checkpoint's record name: reading the
    second checkpoint of a group killed mid-rename finishes the whole group, never a mixed set."""
    folder = tmp_path / "run"
    folder.mkdir()
    weights = {name: legacy_file(folder / f"{name}.pth", seed=seed) for seed, name in enumerate("abc")}
    kill_writer(folder, "convert-folder", "renaming", signal.SIGKILL)
    assert (folder / ".b.safetensors.ckptfmt-commit").exists() and not (folder / "b.safetensors").exists()
    loaded = ckptfmt.load_model(folder / "b.safetensors")
    assert state_dicts_bit_identical(loaded.state_dict(), weights["b"])
    assert not list(folder.glob("*.ckptfmt-commit"))
    assert_whole(folder / "b.safetensors", weights["b"])
    assert_whole(folder / "a.safetensors", weights["a"])
    assert not (folder / "c.safetensors").exists()
    result = run_cli("convert", ".", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert_whole(folder / "c.safetensors", weights["c"])
