"""The examples a user copies: every `$ ckptfmt ...` line of the README and of every page of
docs/, and every example of every command's --help, runs as written after the Quickstart's main
job (in-process, through click's runner); every Python block of those pages runs in a fresh
process, each one on its own, in any order, in one folder. The pages' links lead somewhere, and
the names they give exist."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil

import pytest

from .helpers import DEMO, ROOT, run, run_cli

COMMANDS = ["convert", "inspect", "verify", "diff", "predict"]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def _help_examples() -> list[str]:
    examples = []
    for command in [None, *COMMANDS]:
        text = run_cli(*([command, "--help"] if command else ["--help"])).stdout
        block = text.split("Example:", 1)[1] if "Example:" in text else ""
        examples += [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("ckptfmt ")]
    return examples


def _page_examples() -> list[str]:
    return [line[2:].strip() for page in PAGES for line in page.read_text().splitlines() if line.startswith("$ ckptfmt ")]


EXAMPLES = sorted(set(_help_examples() + _page_examples()))


@pytest.fixture(scope="module")
def after_quickstart(tmp_path_factory):
    """A checkout's demo checkpoints, and what the Quickstart's main job made of them."""
    folder = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(DEMO, folder / "checkpoints")
    quickstart = next(line for line in README.read_text().splitlines() if "ckptfmt convert" in line
                      and line.startswith("python3 -m venv"))
    job = shlex.split(re.search(r"\.venv/bin/ckptfmt (.*)$", quickstart).group(1))
    result = run_cli(*job, cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


def test_there_are_examples_to_run():
    assert len(EXAMPLES) >= 9 and all(example.startswith("ckptfmt ") for example in EXAMPLES)


def test_the_docs_have_their_pages():
    """The reference the README links to: one page per subject."""
    assert {page.name for page in DOCS} >= {
        "cli.md", "python.md", "legacy.md", "architectures.md", "libraries.md", "large-and-distributed.md",
        "format.md", "security.md", "performance.md", "development.md",
    }
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("example", EXAMPLES)
def test_each_example_runs_as_written_after_the_quickstart(after_quickstart, example):
    args = shlex.split(example)[1:]
    result = run_cli(*args, cwd=after_quickstart)
    # diff says "they differ" with exit code 1, as diff(1) does; nothing else may fail.
    assert result.returncode in ((0, 1) if args[0] == "diff" else (0,)), result.stderr
    assert "Error:" not in result.stderr and "Traceback" not in result.stderr


def _python_blocks(page) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _is_distributed(block: str) -> bool:
    return 'init_process_group("nccl")' in block


# Each block runs in a namespace of its own, so that none leans on another's names; the blocks
# of one page share a process, as a reader's session would, and so pay for torch's import once.
_RUN_BLOCKS = """
import json, sys
page, blocks = sys.argv[1], json.loads(sys.argv[2])
for number, block in enumerate(blocks, 1):
    exec(compile(block, f"<{page}, Python block {number}>", "exec"), {"__name__": "__main__"})
"""


def _runnable_blocks() -> list[tuple[str, list[str]]]:
    pages = [(page.relative_to(ROOT).as_posix(), _python_blocks(page)) for page in PAGES]
    return [(name, [block for block in blocks if not _is_distributed(block)]) for name, blocks in pages if blocks]


@pytest.mark.subprocess  # Its own processes: each page's Python runs as a script, as a reader runs it.
def test_every_python_block_runs_after_every_other_in_one_folder(after_quickstart, tmp_path):
    """Every page's Python, in a fresh process per page, where the Quickstart ran: once in the
    pages' order, and once in the reverse order (pages and blocks) in another folder, so that
    each block runs both before and after each other one. The distributed example alone is left
    out: it needs torchrun and GPUs (nccl), and tests/test_distributed.py makes the same calls
    on two CPU ranks."""
    distributed = [block for page in PAGES for block in _python_blocks(page) if _is_distributed(block)]
    pages = _runnable_blocks()
    assert len(distributed) == 1
    assert sum(len(blocks) for _, blocks in pages) >= 7
    assert {name for name, _ in pages} >= {"README.md", "docs/python.md", "docs/architectures.md",
                                           "docs/large-and-distributed.md"}
    for order, sequence in (("forward", pages), ("reverse", [(n, b[::-1]) for n, b in reversed(pages)])):
        folder = tmp_path / order
        shutil.copytree(after_quickstart, folder)
        for name, blocks in sequence:
            result = run("-c", _RUN_BLOCKS, name, json.dumps(blocks), cwd=folder)
            assert result.returncode == 0, f"{name} ({order}): {result.stderr}"
            assert "Traceback" not in result.stderr


def test_the_readmes_inspect_transcript_is_what_inspect_prints(after_quickstart):
    """The lines of each inspect sample (the README's, the command line page's) that do not
    depend on when it ran."""
    command = "$ ckptfmt inspect converted/multitask_joint/best_model.safetensors\n"
    samples = [(page, text.split(command, 1)[1].split("```", 1)[0])
               for page in PAGES if command in (text := page.read_text())]
    assert README in [page for page, _ in samples]
    shown = run_cli("inspect", "converted/multitask_joint/best_model.safetensors", cwd=after_quickstart).stdout
    for page, sample in samples:
        stable = [line for line in sample.splitlines() if line.split(" ", 1)[0] in ("file", "size", "format", "tensors", "sidecar")]
        assert len(stable) == 5, page
        assert [line for line in shown.splitlines() if line in stable] == stable, page


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_link_leads_to_a_page_and_a_heading_that_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link}"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
            assert anchor in {_slug(heading) for heading in headings}, f"{page.name}: {link}"


# Keys of a checkpoint's metadata, and the entry-point group: `ckptfmt.NAME` that are not Python.
_NOT_PYTHON = {"format_version", "config", "training", "provenance", "weights_sha256", "aliases", "shard",
               "optimizer", "models", "tensor_digests"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_name_a_page_gives_exists(page):
    """Every `ckptfmt.` name a page gives imports, every file or folder it names is there, and
    every test it names is defined. Regression: the pages named modules by the paths they had
    before the package was regrouped into io/, format/, config/ and sources/."""
    text = page.read_text()
    names = set(re.findall(r"`(ckptfmt(?:\.\w+)+)", text))
    for name in sorted(names):
        parts = name.split(".")
        if len(parts) == 2 and parts[1] in _NOT_PYTHON:
            continue
        for split in range(len(parts), 0, -1):
            try:
                value = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                value = getattr(value, attribute, None)
            assert value is not None, f"{page.name}: {name}"
            break
    for path in sorted(set(re.findall(r"`((?:ckptfmt|models|tools|tests|checkpoints)/[\w./]*)", text))):
        assert (ROOT / path).exists(), f"{page.name}: {path}"
    tests = [path for path in (ROOT / "tests").rglob("*.py")]
    defined = {path.stem for path in tests} | set(re.findall(r"def (test_\w+)\(", "\n".join(p.read_text() for p in tests)))
    for name in sorted(set(re.findall(r"\b(test_\w+\*?)", text))):
        found = any(d.startswith(name[:-1]) for d in defined) if name.endswith("*") else name in defined
        assert found, f"{page.name}: {name}"


def test_the_docs_describe_the_software_not_its_history():
    """The pages say what the software does, never how or when it was made."""
    history = re.compile(r"\bround (one|two|three)\b|\bthis round\b|\bclass \d+ of\b|\bissue \d+|\bthis session\b|\bsessions\b"
                         r"|\bwas lent\b|\bnot drawn\b", re.I)
    for page in PAGES:
        found = history.findall(page.read_text())
        assert not found, f"{page.name}: {found}"


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
