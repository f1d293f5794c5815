"""Your own classes on the command line: `ckptfmt --import MODULE COMMAND ...` (or
CKPTFMT_IMPORT) imports the modules that register them, found from the current folder as
`python -m` finds modules, before the command runs."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from .helpers import run_cli_in_fresh_process

MODULE = textwrap.dedent("""
    import torch
    import ckptfmt

    @ckptfmt.register_model("smallcnn")
    class SmallCNN(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, width, 3)
            self.head = torch.nn.Linear(width, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean(dim=(2, 3)))
""")


@pytest.mark.subprocess  # Its own processes: what a command imports is the point.
def test_a_class_of_your_own_converts_verifies_and_is_inspected_with_import(tmp_path):
    (tmp_path / "mynets.py").write_text(MODULE)
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(8, 1, 3, 3), "conv.bias": torch.randn(8),
             "head.weight": torch.randn(2, 8), "head.bias": torch.randn(2)}
    torch.save(state, tmp_path / "sd.pth")
    without = run_cli_in_fresh_process("convert", "sd.pth", "--model-type", "smallcnn", "--set", "width=8", cwd=tmp_path)
    assert without.returncode == 1 and "'smallcnn' is not registered here" in without.stderr
    converted = run_cli_in_fresh_process("--import", "mynets", "convert", "sd.pth", "--model-type", "smallcnn",
                                         "--set", "width=8", cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout.splitlines()[0] == "[OK]   sd.pth -> sd.safetensors  smallcnn(width=8)"
    verified = run_cli_in_fresh_process("verify", "sd.safetensors", cwd=tmp_path, env={"CKPTFMT_IMPORT": "mynets"})
    assert verified.returncode == 0, verified.stderr
    assert "skipped" not in verified.stdout


@pytest.mark.subprocess  # Its own processes: what a command imports is the point.
def test_a_module_that_fails_to_import_is_one_error_naming_it(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(0)\n")
    missing = run_cli_in_fresh_process("--import", "nosuchmodule", "inspect", ".", cwd=tmp_path)
    assert (missing.returncode, missing.stderr.strip()) == (
        1, "Error: --import nosuchmodule: no module named 'nosuchmodule' in the current folder or the installed "
           "packages")
    broken = run_cli_in_fresh_process("--import", "broken", "inspect", ".", cwd=tmp_path)
    assert (broken.returncode, broken.stderr.strip()) == (
        1, "Error: --import broken: the module failed to import (RuntimeError: no GPU here)")
    quits = run_cli_in_fresh_process("inspect", ".", cwd=tmp_path, env={"CKPTFMT_IMPORT": "quits"})
    assert (quits.returncode, quits.stderr.strip()) == (
        1, "Error: --import quits: the module failed to import (SystemExit: 0)")


@pytest.mark.subprocess  # Its own processes: what a command imports is the point.
def test_a_module_that_prints_or_hangs_at_import_neither_corrupts_nor_stalls_the_command(tmp_path):
    """What an imported module prints is set aside (stdout carries the report and --json), and
    one that never finishes importing is an error naming it after the wait."""
    (tmp_path / "talks.py").write_text("print('hello from talks')\n")
    (tmp_path / "stalls.py").write_text("import threading\nthreading.Event().wait()\n")
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "sd.pth")
    talks = run_cli_in_fresh_process("--import", "talks", "inspect", "sd.pth", "--json", cwd=tmp_path)
    assert talks.returncode == 0, talks.stderr
    assert json.loads(talks.stdout)["file"] == "sd.pth"
    assert talks.stderr.splitlines() == [
        "warning: --import talks: the module printed while being imported; set aside: 'hello from talks'"]
    stalls = run_cli_in_fresh_process("--import", "stalls", "inspect", "sd.pth", cwd=tmp_path,
                                      env={"CKPTFMT_PLUGIN_TIMEOUT": "2"})
    assert (stalls.returncode, stalls.stderr.strip()) == (
        1, "Error: --import stalls: the module did not finish importing (still importing after 2 s; set "
           "CKPTFMT_PLUGIN_TIMEOUT=SECONDS to wait longer)")
