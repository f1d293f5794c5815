"""Only regular files are opened or written: a FIFO named like a checkpoint, a sidecar, a
companion, a .pth or a .ckpt is refused without waiting on it, and skipped in folder walks;
nothing is written through a FIFO at the output, even when asked to overwrite.

Reading a FIFO blocks until something writes to it. The tests that read one run the command
in a fresh process with a timeout, so that a regression fails the test instead of hanging the
suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ckptfmt

from ..helpers import run_cli_in_fresh_process, save_small, small_model
from .crafted import CLI, fresh_python, trained_checkpoint


@pytest.mark.subprocess  # Its own process: were the FIFO read, its timeout fails the test and the suite goes on.
def test_a_fifo_named_like_a_checkpoint_is_refused_not_waited_on(tmp_path):
    """inspect and verify of a FIFO named x.safetensors, and inspect of a checkpoint whose
    sidecar is a FIFO: refused without waiting on it, the sidecar shown as invalid."""
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    for command in (["inspect", str(fifo)], ["verify", str(fifo)]):
        result = run_cli_in_fresh_process(*command)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith(
            f"{fifo}: is a FIFO (named pipe), not a regular file; refused (reading it could block or never end)"
        )
    path, _, _ = save_small(tmp_path / "m")
    os.unlink(path.parent / "model_config.json")
    os.mkfifo(path.parent / "model_config.json")
    result = run_cli_in_fresh_process("inspect", str(path))
    assert result.returncode == 0 and "sidecar     invalid: is a FIFO (named pipe)" in result.stdout
    json.loads(run_cli_in_fresh_process("inspect", str(path), "--json").stdout)


@pytest.mark.subprocess  # Its own process: were the FIFO read, its timeout fails the test and the suite goes on.
def test_a_fifo_as_the_companion_is_refused_not_waited_on(tmp_path):
    """A FIFO where the optimizer companion belongs: load_training_state and verify refuse it
    without waiting on it."""
    path, _ = trained_checkpoint(tmp_path)
    companion = path.with_name("m.optimizer.safetensors")
    companion.unlink()
    os.mkfifo(companion)
    code = textwrap.dedent(f"""
        import ckptfmt, torch
        model = ckptfmt.load_model({str(path)!r})
        try:
            ckptfmt.load_training_state({str(path)!r}, torch.optim.AdamW(model.parameters()))
        except ckptfmt.HeaderError as exc:
            print(exc)
        print(ckptfmt.verify({str(path)!r}).failures[0])
    """)
    result = fresh_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    refusal = "is a FIFO (named pipe), not a regular file; refused (reading it could block or never end)"
    assert result.stdout.splitlines() == [
        f"{companion}: {refusal}", f"{path}: training state m.optimizer.safetensors: {refusal}"]


@pytest.mark.subprocess  # Its own process: were the FIFO read, its timeout fails the test and the suite goes on.
def test_a_fifo_named_pth_or_ckpt_is_refused_and_skipped_in_folders(tmp_path):
    """convert of FIFOs named x.pth and x.ckpt fails each with one line; `convert .` skips them."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "good.pth")
    for name in ("x.pth", "x.ckpt"):
        os.mkfifo(tmp_path / name)
    result = subprocess.run([sys.executable, "-c", CLI, "convert", "x.pth", "x.ckpt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-2:] == [
        f"[FAIL] {name}: is a FIFO (named pipe), not a regular file; refused (reading it could block or never end)"
        for name in ("x.pth", "x.ckpt")
    ]
    folder = subprocess.run([sys.executable, "-c", CLI, "convert", "."], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert folder.returncode == 0, folder.stderr
    assert folder.stdout.splitlines()[-1] == "1 converted, 0 skipped, 0 failed"


def test_nothing_is_written_through_a_fifo_at_the_output(tmp_path):
    """A FIFO at the output path: nothing is written through it, even with overwrite=True, and
    it stays as it was."""
    model, config = small_model()
    os.mkfifo(tmp_path / "m.safetensors")
    for overwrite in (False, True):
        with pytest.raises(ckptfmt.WriteError, match="is not a regular file \\(a FIFO, a device or a socket\\); ckptfmt "
                                                     "writes only regular files and never through one of those"):
            ckptfmt.save_model_with_config(model, tmp_path / "m.safetensors", config, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
