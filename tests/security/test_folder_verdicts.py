"""A command given a folder says what it could not read there: whatever under the folder could
not be walked or read (a folder without permission, a link loop, an index that names itself or
would hide a checkpoint) is a `[FAIL]` line naming it, and the command exits 1. What it could
not see, it never reports as fine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import ckptfmt
from ckptfmt import CkptfmtError, HeaderError

from ..helpers import run_cli, save_small, small_model
from .crafted import CLI

# What load_model raises for the path given, as a user's script would print it.
LOAD = ("import sys, ckptfmt\ntry:\n    ckptfmt.load_model(sys.argv[1])\nexcept ckptfmt.CkptfmtError as exc:\n"
        "    print(type(exc).__name__, exc)\n")
LOOP = "is a link loop (following it leads back to itself); nothing was read"
LOCKED = "is a folder that cannot be read: permission denied; nothing in it was read"


def _fail_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[FAIL]")]


def _folder_with_a_locked_subfolder(root):
    """`ok/` with a checkpoint and a .pth, and `locked/` (mode 000) holding a damaged file of each kind."""
    (root / "ok").mkdir(parents=True)
    save_small(root / "ok", "m.safetensors")
    torch.save(small_model()[0].state_dict(), root / "ok/legacy.pth")
    (root / "locked").mkdir()
    for name in ("bad.safetensors", "bad.pth"):
        (root / "locked" / name).write_bytes(b"damaged beyond reading")
    (root / "locked").chmod(0)
    return root


@pytest.mark.subprocess  # Its own process: setpriv drops root's right to read any file for the process it starts.
@pytest.mark.parametrize("command, summary", [
    ("verify", "1 verified, 1 failed"),
    ("convert", "1 converted, 0 skipped, 1 failed"),
    ("inspect", None),
])
def test_an_unreadable_subfolder_fails_the_folder(tmp_path, command, summary):
    """Regression: `verify DIR` with a subfolder of mode 000 holding a damaged file said
    "2 verified, 0 failed" and exit 0; convert skipped it silently. Each names it and exits 1."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv, which can drop root's right to read anything")
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
              "--inh-caps=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    folder = _folder_with_a_locked_subfolder(tmp_path / "runs")
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", CLI, command, "."], cwd=folder, capture_output=True,
                                text=True, timeout=120)
        loaded = subprocess.run([*prefix, sys.executable, "-c", LOAD, "locked/bad.safetensors"], cwd=folder,
                                capture_output=True, text=True, timeout=120)
    finally:
        (folder / "locked").chmod(0o755)
    assert loaded.stdout == "HeaderError locked/bad.safetensors: cannot be read: permission denied\n", loaded.stderr
    assert result.returncode == 1, result.stderr
    assert _fail_lines(result.stderr) == [f"[FAIL] locked: {LOCKED}"]
    if summary:
        assert result.stdout.splitlines()[-1] == summary
    else:
        assert result.stdout.startswith("ok/legacy.pth  legacy  multitask(")


@pytest.mark.parametrize("command, summary", [
    ("verify", "1 verified, 1 failed"),
    ("convert", "1 converted, 0 skipped, 1 failed"),
    ("inspect", None),
])
def test_a_link_loop_in_a_folder_fails_by_name(tmp_path, command, summary):
    """A link that leads back to itself, named like a checkpoint, was passed over in silence."""
    save_small(tmp_path, "m.safetensors")
    torch.save(small_model()[0].state_dict(), tmp_path / "legacy.pth")
    for name in ("loop.safetensors", "loop.pth"):
        (tmp_path / name).symlink_to(name)
    result = run_cli(command, ".", cwd=tmp_path)
    assert result.returncode == 1
    expected = "loop.safetensors" if command != "convert" else "loop.pth"
    assert f"[FAIL] {expected}: {LOOP}" in _fail_lines(result.stderr)
    if summary:
        assert result.stdout.splitlines()[-1] == summary
    with pytest.raises(HeaderError) as excinfo:
        ckptfmt.load_model(tmp_path / "loop.safetensors")
    assert str(excinfo.value) == f"{tmp_path / 'loop.safetensors'}: {LOOP}"
    assert ckptfmt.verify(tmp_path / "loop.safetensors").failures == [f"{tmp_path / 'loop.safetensors'}: {LOOP}"]


def test_verify_goes_on_past_a_file_whose_header_is_damaged(tmp_path):
    """`verify A B`, A's header damaged: one [FAIL] for A, B still checked, exit 1."""
    a, _, _ = save_small(tmp_path / "a", "m.safetensors")
    b, _, _ = save_small(tmp_path / "b", "m.safetensors")
    with open(a, "r+b") as f:
        f.write(b"\xff" * 7)  # the header's length, now far past the file
    result = run_cli("verify", a, b)
    assert result.returncode == 1
    assert _fail_lines(result.stderr) == [
        f"[FAIL] {a}: declares a 72057594037927935-byte header, over the 100000000-byte limit; the file is damaged "
        "or not a safetensors file"]
    assert result.stdout.startswith(f"[OK]   {b}: header, config, shapes, sidecar, digest")
    assert result.stdout.splitlines()[-1] == "1 verified, 1 failed"


def test_a_sidecar_that_is_a_link_loop_fails_its_checkpoint_alone(tmp_path):
    """Regression: a model_config.json that is a link loop aborted `inspect` of the whole folder
    (`Error: ... Too many levels of symbolic links`), and load_model raised a plain OSError."""
    bad, _, _ = save_small(tmp_path / "a", "m.safetensors")
    good, _, _ = save_small(tmp_path / "b", "m.safetensors")
    sidecar = tmp_path / "a/model_config.json"
    sidecar.unlink()
    sidecar.symlink_to("model_config.json")
    shown = run_cli("inspect", ".", cwd=tmp_path)
    assert shown.returncode == 1
    assert [line.split("  ")[0] for line in shown.stdout.splitlines()] == ["a/m.safetensors", "b/m.safetensors"]
    assert shown.stdout.splitlines()[1].endswith("sidecar: consistent")
    assert _fail_lines(shown.stderr) == [f"[FAIL] a/m.safetensors: sidecar is invalid: {LOOP}"]
    with pytest.raises(CkptfmtError) as excinfo:
        ckptfmt.load_model(bad)
    assert str(excinfo.value) == f"{sidecar}: {LOOP}"
    assert ckptfmt.load_model(good) is not None
    verified = run_cli("verify", ".", cwd=tmp_path)
    assert verified.returncode == 1
    assert _fail_lines(verified.stderr) == [f"[FAIL] a/m.safetensors: sidecar is invalid: {LOOP}"]


def test_convert_fails_a_source_whose_sidecar_is_a_link_loop_and_goes_on(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torch.save(small_model()[0].state_dict(), tmp_path / name / "m.pth")
    (tmp_path / "a/model_config.json").symlink_to("model_config.json")
    result = run_cli("convert", ".", cwd=tmp_path)
    assert result.returncode == 1
    assert _fail_lines(result.stderr) == [f"[FAIL] a/m.pth: a/model_config.json: {LOOP}"]
    assert result.stdout.splitlines()[-1] == "1 converted, 0 skipped, 1 failed"


def _index(folder, weight_map: dict) -> None:
    (folder / "x.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_an_index_that_names_itself_is_refused_by_name(tmp_path):
    """Regression: an index whose weight_map names the index itself ended in `unexpected
    RecursionError` (inspect, verify), and load_model raised RecursionError; a folder holding
    only it hid it from inspect (nothing shown, exit 0)."""
    _index(tmp_path, {"w": "x.safetensors.index.json"})
    index = tmp_path / "x.safetensors.index.json"
    message = (f"{index}: weight_map['w'] names 'x.safetensors.index.json', an index (this index itself), not a "
               "shard; an index names the .safetensors files that hold its tensors")
    with pytest.raises(HeaderError) as excinfo:
        ckptfmt.load_model(index)
    assert str(excinfo.value) == message
    for command in ("inspect", "verify"):
        for target in (index, tmp_path):
            result = run_cli(command, target)
            assert result.returncode == 1
            assert message in result.stderr, (command, target, result.stderr)


def test_two_indexes_that_name_each_other_are_refused(tmp_path):
    _index(tmp_path, {"w": "y.safetensors.index.json"})
    (tmp_path / "y.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "w": "x.safetensors.index.json"}}))
    with pytest.raises(HeaderError, match="names 'y.safetensors.index.json', an index, not a shard"):
        ckptfmt.load_model(tmp_path / "x.safetensors.index.json")


def test_an_index_cannot_hide_a_checkpoint_of_its_own(tmp_path):
    """An index naming a whole checkpoint as its shard took it out of a folder's walk: that
    checkpoint was never verified on its own. It is checked on its own, and the index, whose
    "shard" belongs to no index, fails by name."""
    checkpoint, _, _ = save_small(tmp_path, "m.safetensors")
    names = ckptfmt.read_header(checkpoint).tensors
    _index(tmp_path, {name: "m.safetensors" for name in names})
    result = run_cli("verify", ".", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("[OK]   m.safetensors: header, config, shapes, sidecar, digest")
    assert _fail_lines(result.stderr) == [
        "[FAIL] x.safetensors.index.json: m.safetensors is not a shard of this index: it is a ckptfmt checkpoint of "
        "its own (its header names no index)"]
    shown = run_cli("inspect", ".", cwd=tmp_path)
    assert shown.returncode == 1 and shown.stdout.startswith("m.safetensors  ckptfmt  multitask(")
    with pytest.raises(HeaderError, match="m.safetensors is not a shard of this index: it is a ckptfmt checkpoint"):
        ckptfmt.load_model(tmp_path / "x.safetensors.index.json")


def test_sharded_checkpoints_are_still_seen_once_in_a_folder(tmp_path):
    """What the rule on shards leaves alone: a sharded checkpoint is verified once, as its index."""
    model, config = small_model()
    ckptfmt.save_model_with_config(model, tmp_path / "m.safetensors", config, max_shard_size=20_000)
    assert len(list(tmp_path.glob("m-*-of-*.safetensors"))) > 1
    result = run_cli("verify", ".", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:-1]] == ["[OK]   m.safetensors.index.json"]


def test_predict_fails_an_input_it_cannot_read_in_a_folder(tmp_path, demo_model):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    np.save(inputs / "a.npy", np.zeros((1, 32, 32), dtype=np.float32))
    (inputs / "loop.npy").symlink_to("loop.npy")
    result = run_cli("predict", demo_model, inputs, "--out", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 1
    assert _fail_lines(result.stderr) == [f"[FAIL] {inputs / 'loop.npy'}: {LOOP}"]
    assert result.stdout.splitlines()[-1].startswith("1 predicted, 0 skipped, 1 failed")
