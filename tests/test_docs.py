"""The examples a user copies: every `$ ckptfmt ...` line of the README and every example of
every command's --help runs as written, after the Quickstart's main job; the README's Python
runs as a script, in a fresh process."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from .helpers import DEMO, ROOT, run, run_cli

COMMANDS = ["convert", "inspect", "verify", "diff", "predict"]


def _help_examples() -> list[str]:
    examples = []
    for command in [None, *COMMANDS]:
        text = run_cli(*([command, "--help"] if command else ["--help"])).stdout
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


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.subprocess  # Its own processes: each section of the README runs as a script, as a reader runs it.
def test_the_readmes_python_runs_as_written_after_the_quickstart(after_quickstart, tmp_path):
    """Each section's Python, in a fresh process per section, in order, where the Quickstart ran.
    The distributed example alone is left out: it needs torchrun and GPUs (nccl), and
    tests/test_distributed.py makes the same calls on two CPU ranks."""
    blocks = _python_blocks()
    distributed = [block for block in blocks if 'init_process_group("nccl")' in block]
    assert len(blocks) >= 5 and len(distributed) == 1
    folder = tmp_path / "work"
    shutil.copytree(after_quickstart, folder)
    api, resume, own, sharded = [block for block in blocks if block not in distributed]
    for section in (api + resume, own + sharded):  # a later section uses the model of the one before
        result = run("-c", section, cwd=folder)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr


def test_the_readmes_inspect_transcript_is_what_inspect_prints(after_quickstart):
    """The lines of the README's inspect sample that do not depend on when it ran."""
    text = (ROOT / "README.md").read_text()
    sample = text.split("$ ckptfmt inspect converted/multitask_joint/best_model.safetensors\n", 1)[1].split("```", 1)[0]
    stable = [line for line in sample.splitlines() if line.split(" ", 1)[0] in ("file", "size", "format", "tensors", "sidecar")]
    assert len(stable) == 5
    shown = run_cli("inspect", "converted/multitask_joint/best_model.safetensors", cwd=after_quickstart).stdout
    assert [line for line in shown.splitlines() if line in stable] == stable


TOOLS = sorted(path.name for path in (ROOT / "tools").iterdir() if path.suffix in (".py", ".sh") and path.name != "__init__.py")


@pytest.mark.subprocess  # Its own processes: the tools are scripts, run as a user runs them.
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
