"""Write faults: the previous files survive intact, no stray temp file, one clear message."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptfmt
from ckptfmt import WriteError, convert

from ..helpers import run_cli, run_cli_in_fresh_process, small_model


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def converted(tmp_path):
    """A folder with a converted checkpoint, and a changed source waiting to be re-converted."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    convert(tmp_path / "m.pth")
    torch.save(small_model(seed=4)[0].state_dict(), tmp_path / "m.pth")
    return tmp_path


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("call", ["write", "fsync", "replace"])
def test_disk_full_leaves_the_previous_pair_intact(converted, monkeypatch, call):
    before = snapshot(converted)
    monkeypatch.setattr(f"ckptfmt.io.atomic.os.{call}", _fail_with(errno.ENOSPC))
    with pytest.raises(WriteError) as excinfo:
        convert(converted / "m.pth", force=True)
    assert str(excinfo.value) == (
        f"{converted / 'm.safetensors'}: writing failed: no space left on device; free some space "
        "and retry. Any previous file there is intact"
    )
    monkeypatch.undo()
    assert snapshot(converted) == {**before, "m.pth": (converted / "m.pth").read_bytes()}
    assert ckptfmt.verify(converted / "m.safetensors").ok


def test_disk_full_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    monkeypatch.setattr("ckptfmt.io.atomic.os.link", _fail_with(errno.ENOSPC))
    with pytest.raises(WriteError, match="no space left on device"):
        convert(tmp_path / "m.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


# Its own processes: the converter it kills, and the next run, which removes what a process that
# no longer runs left (a process cleans a folder once: this one already wrote there).
@pytest.mark.subprocess
def test_sigkill_mid_write_leaves_a_recognisable_temp_that_the_next_run_removes(converted):
    before = snapshot(converted)
    stalled = converted / "stalled"
    # Stall the converter inside its fsync, after the data is written, then kill it.
    code = (
        "import os, sys, time\n"
        "real_fsync = os.fsync\n"
        "def stall(fd):\n"
        f"    open({str(stalled)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
        "os.fsync = stall\n"
        "from ckptfmt.cli import main\n"
        "main(['convert', sys.argv[1], '--force'])\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(converted / "m.pth")])
    try:
        deadline = time.monotonic() + 120
        while not stalled.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the converter never reached fsync"
            time.sleep(0.05)
    finally:  # killed whatever happened: a stalled converter never outlives the test
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    stalled.unlink()
    temps = [p.name for p in converted.iterdir() if ".ckptfmt-tmp-" in p.name]
    assert len(temps) == 1 and temps[0].startswith(".m.safetensors.ckptfmt-tmp-")
    assert {k: v for k, v in snapshot(converted).items() if k not in temps} == {**before, "m.pth": (converted / "m.pth").read_bytes()}
    assert ckptfmt.verify(converted / "m.safetensors").ok
    result = run_cli_in_fresh_process("convert", "m.pth", "--force", cwd=converted)
    assert result.returncode == 0, result.stderr
    assert not [p for p in converted.iterdir() if ".ckptfmt-tmp-" in p.name]
    assert ckptfmt.verify(converted / "m.safetensors").ok


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_folder_is_one_clear_error(tmp_path, monkeypatch, code):
    """Root ignores folder permissions, so the refusal of the file system is injected."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    real_open = os.open

    def refuse_new_files(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("ckptfmt.io.atomic.os.open", refuse_new_files)
    with pytest.raises(WriteError) as excinfo:
        convert(tmp_path / "m.pth")
    reason = {errno.EACCES: f"permission denied in {tmp_path}", errno.EROFS: f"{tmp_path} is on a read-only file system"}[code]
    assert str(excinfo.value).startswith(f"{tmp_path / 'm.safetensors'}: cannot create a file in its folder: {reason}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(WriteError, match="permission denied"):
            convert(tmp_path / "m.pth")
    finally:
        tmp_path.chmod(stat.S_IRWXU)


def test_existing_output_is_not_overwritten(converted):
    before = snapshot(converted)
    result = run_cli("convert", "m.pth", cwd=converted)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["[FAIL] m.pth: m.safetensors: already exists; pass --force to replace it"]
    assert snapshot(converted) == {**before, "m.pth": (converted / "m.pth").read_bytes()}


def test_output_equal_to_input_is_refused(converted):
    """A .safetensors of someone else's is rewritten in place only when asked; a ckptfmt file is
    not converted again. Either way nothing is touched."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, converted / "plain.safetensors")
    before = snapshot(converted)
    with pytest.raises(WriteError, match="is both the source and the output; pass force=True to rewrite it in "
                                         "place, or choose another output"):
        convert(converted / "plain.safetensors")
    assert convert(converted / "m.safetensors").status == "skipped"
    with pytest.raises(WriteError, match="the output must end in .safetensors"):
        convert(converted / "m.pth", output=converted / "m.pth")
    assert snapshot(converted) == before


def test_symlinked_output_is_refused_and_its_target_untouched(converted, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "precious.safetensors"
    elsewhere.write_bytes(b"precious")
    (converted / "m.safetensors").unlink()
    (converted / "m.safetensors").symlink_to(elsewhere)
    with pytest.raises(WriteError, match=rf"is a symbolic link \(to {elsewhere}\); ckptfmt does not write through links"):
        convert(converted / "m.pth", force=True)
    assert elsewhere.read_bytes() == b"precious"
    assert (converted / "m.safetensors").is_symlink()


def test_files_follow_the_umask_not_0600(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    old = os.umask(0o022)
    try:
        result = convert(tmp_path / "m.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(result.output.stat().st_mode) == 0o644
    assert stat.S_IMODE(result.sidecar.stat().st_mode) == 0o644


def test_crash_before_the_sidecar_is_staged_leaves_the_previous_set(converted, monkeypatch):
    """Regression: the new weights took their name before the sidecar was written, so a crash
    between the two left a sidecar bound to other weights. They are one transaction now."""
    before = snapshot(converted)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies with the weights written, the sidecar not

    monkeypatch.setattr("ckptfmt.converter.write_sidecar", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(converted / "m.pth", force=True)
    monkeypatch.undo()
    assert snapshot(converted) == {**before, "m.pth": (converted / "m.pth").read_bytes()}
    assert ckptfmt.verify(converted / "m.safetensors").ok


def test_weights_replaced_behind_the_sidecar_are_reported_by_verify(converted):
    """Weights written over by something else than ckptfmt: the sidecar still binds the old ones."""
    from ckptfmt.format.writer import read_state_dict, write_safetensors

    path = converted / "m.safetensors"
    header = ckptfmt.read_header(path)
    tensors = {name: tensor + 1 if tensor.is_floating_point() else tensor
               for name, tensor in read_state_dict(path).items()}
    write_safetensors(path, tensors, {k: v for k, v in header.metadata.items() if k != "ckptfmt.weights_sha256"},
                      overwrite=True)
    report = ckptfmt.verify(path)
    assert not report.ok
    assert report.failures[0].startswith(f"{path}: sidecar is bound to other weights")
    result = run_cli("verify", "m.safetensors", cwd=converted)
    assert result.returncode == 1
    assert result.stderr.startswith("[FAIL] m.safetensors: sidecar is bound to other weights")


def test_data_read_back_wrong_replaces_nothing(converted, monkeypatch):
    """A disk that returns other bytes than were written: the check after writing catches it."""
    before = snapshot(converted)
    real_preadv = os.preadv

    def corrupting_preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        if ".ckptfmt-tmp-" in os.readlink(f"/proc/self/fd/{fd}"):  # the file being written, not its source
            buffers[0][0] ^= 0xFF
        return got

    monkeypatch.setattr("ckptfmt.format.writer.os.preadv", corrupting_preadv)
    with pytest.raises(ckptfmt.IntegrityError, match="reading back the written data of tensor .* gave other bytes than were written; nothing was replaced"):
        convert(converted / "m.pth", force=True)
    monkeypatch.undo()
    assert snapshot(converted) == {**before, "m.pth": (converted / "m.pth").read_bytes()}
