"""The examples a user copies: every `$ ckptfmt ...` line of the README and every example of
every command's --help runs as written, in a fresh process, after the Quickstart's main job."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
from click.testing import CliRunner

from ckptfmt.cli import main

from .helpers import DEMO, ROOT, run_cli

COMMANDS = ["convert", "inspect", "verify", "diff", "predict"]


def _help_examples() -> list[str]:
    examples = []
    for command in [None, *COMMANDS]:
        text = CliRunner().invoke(main, [command, "--help"] if command else ["--help"]).stdout
        block = text.split("Example:", 1)[1] if "Example:" in text else ""
        examples += [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("ckptfmt ")]
    return examples


def _readme_examples() -> list[str]:
    return [line[2:].strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("$ ckptfmt ")]


EXAMPLES = sorted(set(_help_examples() + _readme_examples()))


@pytest.fixture(scope="module")
def after_quickstart(tmp_path_factory):
    """A checkout's demo checkpoints, and what the Quickstart's main job made of them."""
    folder = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(DEMO, folder / "checkpoints")
    quickstart = next(line for line in (ROOT / "README.md").read_text().splitlines() if "ckptfmt convert" in line
                      and line.startswith("python3 -m venv"))
    job = shlex.split(re.search(r"\.venv/bin/ckptfmt (.*)$", quickstart).group(1))
    result = run_cli(*job, cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


def test_there_are_examples_to_run():
    assert len(EXAMPLES) >= 9 and all(example.startswith("ckptfmt ") for example in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES)
def test_each_example_runs_as_written_after_the_quickstart(after_quickstart, example):
    args = shlex.split(example)[1:]
    result = run_cli(*args, cwd=after_quickstart)
    # diff says "they differ" with exit code 1, as diff(1) does; nothing else may fail.
    assert result.returncode in ((0, 1) if args[0] == "diff" else (0,)), result.stderr
    assert "Error:" not in result.stderr and "Traceback" not in result.stderr


TOOLS = sorted(path.name for path in (ROOT / "tools").iterdir() if path.suffix in (".py", ".sh") and path.name != "__init__.py")


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_takes_help_and_refuses_unknown_options(tool, tmp_path):
    """Regression: `make_demo_checkpoints.py --help` trained for a minute into a folder named
    `--help`."""
    import subprocess
    import sys

    runner = ["bash"] if tool.endswith(".sh") else [sys.executable]
    helped = subprocess.run([*runner, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.strip() and list(tmp_path.iterdir()) == []
    refused = subprocess.run([*runner, str(ROOT / "tools" / tool), "--no-such-option"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip()
    assert list(tmp_path.iterdir()) == []
