"""Transactions: the files of one checkpoint take their names together, or none does."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptfmt import OutputExistsError, WriteError
from ckptfmt.io.atomic import write_all
from ckptfmt.io.folder import HOST_TAG, NAME_MAX, hidden_name
from ckptfmt.io.transaction import Transaction, clean_folder, finish_pending, record_path, recover

from .helpers import full_disk_at_link


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def write_set(folder: Path, files: dict[str, bytes], *, overwrite: bool = True, remove: tuple[str, ...] = ()) -> None:
    with Transaction(folder, "m.safetensors") as transaction:
        for name, data in files.items():
            with transaction.stage(folder / name, overwrite=overwrite) as fd:
                write_all(fd, data)
        for name in remove:
            transaction.remove(folder / name)


def test_a_set_of_files_takes_its_names_together(tmp_path):
    write_set(tmp_path, {"m.safetensors": b"weights", "m.optimizer.safetensors": b"state", "model_config.json": b"{}"})
    assert contents(tmp_path) == {"m.optimizer.safetensors": b"state", "m.safetensors": b"weights",
                                  "model_config.json": b"{}"}


def test_an_error_while_staging_changes_no_name(tmp_path):
    write_set(tmp_path, {"m.safetensors": b"old", "model_config.json": b"old"})
    with pytest.raises(RuntimeError, match="the writer failed"):
        with Transaction(tmp_path, "m.safetensors") as transaction:
            with transaction.stage(tmp_path / "m.safetensors", overwrite=True) as fd:
                write_all(fd, b"new")
            raise RuntimeError("the writer failed")
    assert contents(tmp_path) == {"m.safetensors": b"old", "model_config.json": b"old"}


def test_removals_happen_with_the_commit(tmp_path):
    write_set(tmp_path, {"m-00001-of-00003.safetensors": b"a", "m-00003-of-00003.safetensors": b"c"})
    write_set(tmp_path, {"m-00001-of-00002.safetensors": b"A"}, remove=("m-00003-of-00003.safetensors",))
    assert names(tmp_path) == ["m-00001-of-00002.safetensors", "m-00001-of-00003.safetensors"]


def test_files_another_rank_staged_are_committed_by_the_rank_that_commits(tmp_path):
    """A rank stages its shard and sends `staged` to rank 0, which adopts it into its own
    transaction (here both in one process: the hand-over is what is tested)."""
    other_rank = Transaction(tmp_path, "m.safetensors.index.json")
    with other_rank.stage(tmp_path / "m-00002-of-00002.safetensors", overwrite=False) as fd:
        write_all(fd, b"shard 2")
    sent = other_rank.staged  # handed over: that rank neither commits nor aborts
    assert names(tmp_path) == [sent[0][0].name]
    with Transaction(tmp_path, "m.safetensors.index.json") as rank0:
        with rank0.stage(tmp_path / "m-00001-of-00002.safetensors", overwrite=False) as fd:
            write_all(fd, b"shard 1")
        for temp, final in sent:
            rank0.adopt(temp, final, overwrite=False)
        with rank0.stage(tmp_path / "m.safetensors.index.json", overwrite=False) as fd:
            write_all(fd, b"{}")
    assert contents(tmp_path) == {"m-00001-of-00002.safetensors": b"shard 1", "m-00002-of-00002.safetensors": b"shard 2",
                                  "m.safetensors.index.json": b"{}"}


def test_an_existing_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "model_config.json").write_text("theirs")
    with pytest.raises(OutputExistsError, match="model_config.json: already exists; pass overwrite=True"):
        write_set(tmp_path, {"m.safetensors": b"new", "model_config.json": b"ours"}, overwrite=False)
    assert contents(tmp_path) == {"model_config.json": b"theirs"}


def test_disk_full_at_the_commit_record_leaves_the_previous_set(tmp_path, monkeypatch):
    write_set(tmp_path, {"m.safetensors": b"old", "model_config.json": b"old"})
    full_disk_at_link(monkeypatch, ".ckptfmt-commit")
    with pytest.raises(WriteError) as excinfo:
        write_set(tmp_path, {"m.safetensors": b"new", "model_config.json": b"new"})
    assert str(excinfo.value) == (f"{tmp_path / 'm.safetensors'}: writing failed: no space left on device; free "
                                  "some space and retry. Any previous file there is intact")
    assert contents(tmp_path) == {"m.safetensors": b"old", "model_config.json": b"old"}


def test_a_rename_failing_past_the_commit_point_says_the_record_finishes_it(tmp_path, monkeypatch):
    write_set(tmp_path, {"m.safetensors": b"old", "model_config.json": b"old"})
    real_replace, calls = os.replace, []

    def second_rename_fails(source, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(WriteError) as excinfo:
        write_set(tmp_path, {"m.safetensors": b"new", "model_config.json": b"new"})
    monkeypatch.undo()
    record = record_path(tmp_path / "m.safetensors")
    assert str(excinfo.value) == (
        f"{tmp_path / 'm.safetensors'}: committing stopped after 1 of 2 files took their names: Input/output error; "
        f"its commit record {record.name} lists the rest, and the next ckptfmt command that reads or writes this "
        "checkpoint finishes it")
    finish_pending(tmp_path / "m.safetensors")
    assert contents(tmp_path) == {"m.safetensors": b"new", "model_config.json": b"new"}


STALL_AT_SECOND_RENAME = """
import os, sys, time
from pathlib import Path
from ckptfmt.io.atomic import write_all
from ckptfmt.io.transaction import Transaction
folder = Path(sys.argv[1])
real_replace, calls = os.replace, []
def stall(source, target):
    calls.append(target)
    if len(calls) == 2:
        (folder.parent / "stalled").touch()
        time.sleep(600)
    real_replace(source, target)
os.replace = stall
with Transaction(folder, "m.safetensors") as transaction:
    for name in ("model_config.json", "m.optimizer.safetensors", "m.safetensors"):
        with transaction.stage(folder / name, overwrite=True) as fd:
            write_all(fd, b"new")
"""


def kill_at_second_rename(folder: Path, sig: int) -> None:
    stalled = folder.parent / "stalled"
    process = subprocess.Popen([sys.executable, "-c", STALL_AT_SECOND_RENAME, str(folder)])
    try:
        deadline = time.monotonic() + 120
        while not stalled.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the writer never reached its renames"
            time.sleep(0.02)
    finally:
        process.send_signal(sig)
        process.wait(timeout=60)
    stalled.unlink()


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_commit_killed_past_its_commit_point_is_finished_by_the_next_reader(tmp_path, sig):
    folder = tmp_path / "run"
    folder.mkdir()
    write_set(folder, {"m.safetensors": b"old", "m.optimizer.safetensors": b"old", "model_config.json": b"old"})
    kill_at_second_rename(folder, sig)
    record = record_path(folder / "m.safetensors")
    assert record.exists()
    finish_pending(folder / "m.safetensors")
    assert contents(folder) == {"m.optimizer.safetensors": b"new", "m.safetensors": b"new", "model_config.json": b"new"}


@pytest.mark.subprocess
def test_a_killed_commit_is_finished_by_the_next_write_in_its_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    write_set(folder, {"m.safetensors": b"old", "m.optimizer.safetensors": b"old", "model_config.json": b"old"})
    kill_at_second_rename(folder, signal.SIGKILL)
    write_set(folder, {"other.safetensors": b"other"})
    assert contents(folder) == {"m.optimizer.safetensors": b"new", "m.safetensors": b"new",
                                "model_config.json": b"new", "other.safetensors": b"other"}


@pytest.mark.subprocess
def test_a_record_that_cannot_be_finished_is_named(tmp_path, monkeypatch):
    """A reader in a folder it may not write to (root ignores permissions: the refusal is injected)."""
    folder = tmp_path / "run"
    folder.mkdir()
    write_set(folder, {"m.safetensors": b"old", "m.optimizer.safetensors": b"old", "model_config.json": b"old"})
    kill_at_second_rename(folder, signal.SIGKILL)
    record = record_path(folder / "m.safetensors")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(WriteError) as excinfo:
        finish_pending(folder / "m.safetensors")
    assert str(excinfo.value) == (
        f"{record}: a commit of this checkpoint was interrupted (its record {record.name} is left), and this process "
        f"cannot finish it ({folder} is on "
        "a read-only file system); run any ckptfmt command on the checkpoint as a user who may write to its folder, "
        "which finishes it; until then its files are those of the previous save or of the new one")
    monkeypatch.undo()
    recover(folder)
    assert contents(folder) == {"m.optimizer.safetensors": b"new", "m.safetensors": b"new", "model_config.json": b"new"}


def test_a_crafted_record_renames_nothing_but_its_own_temps(tmp_path):
    (tmp_path / "precious.txt").write_text("precious")
    (tmp_path / ".x.ckptfmt-tmp-1-00000000").write_text("attacker")
    record = record_path(tmp_path / "m.safetensors")
    record.write_text(json.dumps({"format": "ckptfmt-commit-1", "renames": [[".x.ckptfmt-tmp-1-00000000", "precious.txt"]],
                                  "removals": []}))
    with pytest.raises(WriteError, match=r"cannot finish it \('.x.ckptfmt-tmp-1-00000000' is not a temp file of "
                                         r"'precious.txt'\)"):
        finish_pending(tmp_path / "m.safetensors")
    assert (tmp_path / "precious.txt").read_text() == "precious"


def test_a_crafted_record_removes_nothing_but_safetensors_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    record_path(tmp_path / "m.safetensors").write_text(json.dumps({"format": "ckptfmt-commit-1", "renames": [],
                                                                   "removals": ["notes.txt"]}))
    with pytest.raises(WriteError, match=r"cannot finish it \(it removes 'notes.txt', which is not a .safetensors "
                                         r"file\)"):
        finish_pending(tmp_path / "m.safetensors")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_leftovers_of_a_dead_process_go_with_the_next_write_in_the_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".m.safetensors.ckptfmt-tmp-{int(dead.stdout)}-0badf00d"
    write_set(tmp_path, {"a.safetensors": b"a"})  # this process has seen the folder
    leftover.write_bytes(b"half")  # another process wrote it since, and died
    write_set(tmp_path, {"b.safetensors": b"b"})
    assert names(tmp_path) == ["a.safetensors", "b.safetensors"]


def test_temps_of_another_host_on_a_shared_folder_are_left_alone(tmp_path):
    """Regression: a temp was removed when its process id was not alive here, so on a file system
    shared by several nodes a rank's live temps on another host were deleted under it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other_host = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    theirs = tmp_path / f".m.safetensors.ckptfmt-tmp-{int(dead.stdout)}-{other_host}-0badf00d"
    ours = tmp_path / f".n.safetensors.ckptfmt-tmp-{int(dead.stdout)}-{HOST_TAG}-0badf00d"
    write_set(tmp_path, {"a.safetensors": b"a"})
    theirs.write_bytes(b"a rank on another node is writing this")
    ours.write_bytes(b"half")
    write_set(tmp_path, {"b.safetensors": b"b"})
    assert names(tmp_path) == [theirs.name, "a.safetensors", "b.safetensors"]


def test_a_temp_name_names_the_host_within_the_name_limit(tmp_path):
    long_name = "é" * 120 + ".safetensors"  # 252 bytes: its temp's name is cut to fit
    with Transaction(tmp_path, long_name) as transaction:
        with transaction.stage(tmp_path / long_name, overwrite=True) as fd:
            name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
    assert f"-{HOST_TAG}-" in name and len(os.fsencode(name)) <= NAME_MAX


def test_a_batch_into_one_folder_lists_it_once(tmp_path, monkeypatch):
    """Regression: cleaning on every write cost a listing per file, quadratic in a folder of thousands."""
    listings = []
    real_listdir = os.listdir

    def counted(path=None):
        listings.append(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", counted)
    for number in range(50):
        write_set(tmp_path, {f"m{number}.safetensors": b"w", "model_config.json": b"{}"})
    assert len(listings) == 1


@pytest.mark.parametrize("length", [NAME_MAX, NAME_MAX - 1, 200])
def test_names_near_the_limit_are_written(tmp_path, length):
    name = "é" * ((length - len(".safetensors")) // 2) + "x" * ((length - len(".safetensors")) % 2) + ".safetensors"
    assert len(name.encode()) == length
    with Transaction(tmp_path, name) as transaction:
        for final in (name, "model_config.json"):
            with transaction.stage(tmp_path / final, overwrite=False) as fd:
                write_all(fd, b"data")
    assert names(tmp_path) == sorted([name, "model_config.json"])
    derived = hidden_name(name, ".ckptfmt-commit")
    assert len(derived.encode()) <= NAME_MAX and derived.endswith(".ckptfmt-commit")
    assert hidden_name(name, ".ckptfmt-commit") != hidden_name("y" + name[1:], ".ckptfmt-commit")


def test_clean_folder_is_harmless_on_a_missing_folder(tmp_path):
    clean_folder(tmp_path / "absent")
    recover(tmp_path / "absent")
