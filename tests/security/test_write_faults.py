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
from ckptfmt import OutputExistsError, WriteError, convert, read_header

from ..helpers import full_disk_at_link, run_cli, run_cli_in_fresh_process, small_model


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


def _legacy_with_optimizer(path: Path, seed: int) -> None:
    model, _ = small_model(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sum(output.sum() for output in model(torch.zeros(1, 1, 16, 16))).backward()
    optimizer.step()
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)


@pytest.fixture
def converted_with_companion(tmp_path):
    """A converted checkpoint with its companion and sidecar, and a changed source."""
    _legacy_with_optimizer(tmp_path / "m.pth", seed=0)
    convert(tmp_path / "m.pth")
    _legacy_with_optimizer(tmp_path / "m.pth", seed=4)
    return tmp_path


def test_disk_full_at_each_write_leaves_the_previous_set(converted_with_companion, monkeypatch):
    """Every write of convert --force fails in turn (companion, weights, sidecar, commit record):
    each time the previous set is untouched and verifies, and the message says so truly."""
    folder = converted_with_companion
    before = snapshot(folder)
    real_write, real_writev = os.write, os.writev
    failed_at = set()
    for failing in range(1, 200):
        calls = 0

        def full(fd):
            nonlocal calls
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
                calls += 1
                if calls == failing:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def write(fd, data):
            full(fd)
            return real_write(fd, data)

        def writev(fd, buffers):  # a small file's tensors go out in one writev
            full(fd)
            return real_writev(fd, buffers)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "writev", writev)
        try:
            convert(folder / "m.pth", force=True)
            break
        except WriteError as exc:
            failed_at.add(exc.path)
            assert str(exc) == (f"{exc.path}: writing failed: no space left on device; free some space and retry. "
                                "Any previous file there is intact")
        finally:
            monkeypatch.undo()
        assert snapshot(folder) == before
        assert ckptfmt.verify(folder / "m.safetensors").ok
    assert failed_at == {str(folder / name) for name in ("m.optimizer.safetensors", "m.safetensors",
                                                          "model_config.json")}
    assert ckptfmt.verify(folder / "m.safetensors").ok and snapshot(folder) != before


@pytest.mark.subprocess
@pytest.mark.parametrize("limit", [64, 4096, 20000])
def test_file_size_limit_leaves_the_previous_set(converted_with_companion, limit):
    """A real refusal of the kernel (RLIMIT_FSIZE, as a quota gives) wherever it falls."""
    folder = converted_with_companion
    before = snapshot(folder)
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from ckptfmt.cli import main\n"
            "main(['convert', 'm.pth', '--force'])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("[FAIL] m.pth: m.")
    assert result.stderr.rstrip().endswith(": writing failed: the file is larger than this process may write (its "
                                           "file-size limit); raise the limit (ulimit -f) and retry. Any previous "
                                           "file there is intact")
    assert snapshot(folder) == before
    assert run_cli("verify", "m.safetensors", cwd=folder).returncode == 0


def test_sharded_convert_never_deletes_shards_it_did_not_write(tmp_path):
    """Regression: convert --max-shard-size deleted every NAME-0000X-of-0000N.safetensors it had
    not named, someone else's files included."""
    _legacy_with_optimizer(tmp_path / "m.pth", seed=0)
    theirs = {name: name.encode() for name in ("m-00001-of-00009.safetensors", "m-00002-of-00009.safetensors")}
    for name, data in theirs.items():
        (tmp_path / name).write_bytes(data)
    first = convert(tmp_path / "m.pth", max_shard_size="8KB")
    ours = {p.name for p in read_header(first.output).files}
    assert len(ours) > 2 and all((tmp_path / name).read_bytes() == data for name, data in theirs.items())
    _legacy_with_optimizer(tmp_path / "m.pth", seed=4)
    second = convert(tmp_path / "m.pth", max_shard_size="16KB", force=True)
    kept = {p.name for p in read_header(second.output).files}
    assert 1 < len(kept) < len(ours)
    assert ckptfmt.verify(second.output).ok
    shards = {p.name for p in tmp_path.glob("m-*-of-*.safetensors")}
    assert shards == kept | set(theirs)  # the first convert's other shards went, theirs stayed
    assert all((tmp_path / name).read_bytes() == data for name, data in theirs.items())


def test_sharded_convert_does_not_replace_a_shard_it_did_not_write(tmp_path, tmp_path_factory):
    _legacy_with_optimizer(tmp_path / "m.pth", seed=0)
    shards = read_header(convert(tmp_path / "m.pth", output=tmp_path_factory.mktemp("elsewhere") / "m.safetensors",
                                 max_shard_size="8KB").output).files
    (tmp_path / shards[1].name).write_bytes(b"theirs")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match=f"{shards[1].name}: already exists; pass overwrite=True to "
                                                "replace it"):
        convert(tmp_path / "m.pth", max_shard_size="8KB")
    assert snapshot(tmp_path) == before


def test_two_sources_of_one_output_are_refused_naming_both(tmp_path):
    """Regression: m.pth and m.ckpt in one folder were both "converted" into m.safetensors, the
    first lost."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    torch.save(small_model(seed=4)[0].state_dict(), tmp_path / "m.ckpt")
    before = snapshot(tmp_path)
    result = run_cli("convert", ".", "--force", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: m.safetensors: would be the output of both m.ckpt and m.pth, and the second would replace the "
        "first; convert one of them on its own with -o naming another file, or move it away"]
    assert snapshot(tmp_path) == before


def test_an_output_name_of_255_bytes_is_written_with_its_companion(tmp_path):
    """Regression: convert probed NAME.safetensors.index.json, 11 bytes longer, and failed with
    "File name too long". Hidden names (temps, the commit record) and the companion are shortened
    by a hash; the index and the shards, whose names other tools derive, are refused by name."""
    stem = "é" * 121 + "x"  # 243 bytes: the output NAME.safetensors is 255
    _legacy_with_optimizer(tmp_path / f"{stem}.pth", seed=0)
    result = run_cli("convert", f"{stem}.pth", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = tmp_path / f"{stem}.safetensors"
    assert len(output.name.encode()) == 255
    assert ckptfmt.verify(output).ok
    companion = ckptfmt.convert(tmp_path / f"{stem}.pth", force=True).optimizer_file
    assert len(companion.name.encode()) <= 255 and companion.name.endswith(".optimizer.safetensors")
    assert ckptfmt.verify(output).ok and ckptfmt.load_model(output) is not None
    before = snapshot(tmp_path)
    with pytest.raises(WriteError) as excinfo:
        convert(tmp_path / f"{stem}.pth", max_shard_size="8KB", force=True)
    assert str(excinfo.value).startswith(f"{output}: its shards would be named like ")
    assert str(excinfo.value).endswith(", 270 bytes, over the file system's limit of 255; give it a name at least "
                                       "15 bytes shorter, or write it unsharded")
    assert snapshot(tmp_path) == before


def test_a_conversion_failing_at_its_commit_leaves_its_previous_file_bound(tmp_path, monkeypatch):
    """In a folder converted in one run, a file whose commit fails keeps its previous weights and
    its previous binding: the next file's sidecar does not bind weights that were never named."""
    from ckptfmt import convert_all

    for name in "abc":
        torch.save(small_model(seed=0)[0].state_dict(), tmp_path / f"{name}.pth")
    convert_all([tmp_path])
    for name in "abc":
        torch.save(small_model(seed=4)[0].state_dict(), tmp_path / f"{name}.pth")
    full_disk_at_link(monkeypatch, ".b.safetensors.ckptfmt-commit")
    results = convert_all([tmp_path], force=True)
    monkeypatch.undo()
    assert [result.status for result in results] == ["converted", "failed", "converted"]
    assert all(ckptfmt.verify(tmp_path / f"{name}.safetensors").ok for name in "abc")
