"""Shared test helpers: small models saved for real, and commands run as a user runs them."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from click.testing import CliRunner

from ckptfmt import ModelConfig, save_model_with_config
from ckptfmt.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints"
# What tools/make_demo_checkpoints.py trains.
DEMO_ARCHITECTURE = {"base_filters": 4, "depth": 3, "in_channels": 1, "seg_out_channels": 1, "cls_num_classes": 2}


def small_model(seed: int = 0, **architecture) -> tuple[MultiTaskUNet, ModelConfig]:
    """A randomly initialised model with non-trivial BatchNorm statistics, and its config."""
    params = {"base_filters": 4, "depth": 2, **architecture}
    torch.manual_seed(seed)
    model = MultiTaskUNet(**params)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval(), ModelConfig(**params)


def save_small(folder: Path, name: str = "best_model.safetensors", **architecture) -> tuple[Path, MultiTaskUNet, ModelConfig]:
    model, config = small_model(**architecture)
    path = save_model_with_config(model, folder / name, config)
    return path, model, config


def write_dcp_folder(folder: Path, state_dict: dict) -> Path:
    """A DCP folder as one process writes it (torch warns that it found no process group)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state_dict, checkpoint_id=folder, no_dist=True)
    return folder


def copy_demo(tmp_path: Path) -> Path:
    target = tmp_path / "checkpoints"
    shutil.copytree(DEMO, target)
    return target


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in a fresh Python process, as a user would."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def run_cli_in_fresh_process(*args: str, cwd: Path | None = None,
                             env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m ckptfmt ARGS` in a fresh process, for a test whose point is the process itself
    (what it imports, how it ends); every other command runs in this one, through `run_cli`."""
    return run("-m", "ckptfmt", *args, cwd=cwd, env=env)


@dataclass(frozen=True)
class CliResult:
    """What a user sees of a command: its exit code and what it printed, stdout and stderr apart."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliResult:
    """`ckptfmt ARGS` run in this process, through click's CliRunner, as a terminal runs it: in
    `cwd`, with `env` added to the environment, warnings shown as the command shows them.

    An exception that escapes the command fails the test with its traceback (the CLI turns
    every error into one line, so one that escapes is a bug), and nothing the command set for
    the process outlives it.

    Example:
        result = run_cli("verify", path)
        assert result.returncode == 0 and result.stdout.startswith("[OK]")
    """
    with _as_a_command_starts(cwd):
        result = CliRunner().invoke(main, [str(arg) for arg in args], env=env, prog_name="ckptfmt",
                                    catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


@contextlib.contextmanager
def _as_a_command_starts(cwd: Path | None) -> Iterator[None]:
    """What a command starts from in a fresh `ckptfmt` process, and everything put back when it
    ends: the current folder; Python's default warning filters, not this suite's (which turns
    CkptfmtWarning into an error, where the command shows it as a `warning:` line);
    `warnings.showwarning` and the `ckptfmt` logger, which the command sets up for itself.

    What ckptfmt's modules hold (the registry, the folders a process has cleaned of stale temp
    files) stays shared with the test, as in any process that uses the library; a test that
    needs it new runs the command with `run_cli_in_fresh_process`."""
    logger = logging.getLogger("ckptfmt")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    folder = os.getcwd()
    try:
        with warnings.catch_warnings():  # restores the filters and warnings.showwarning on leaving
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            if cwd is not None:
                os.chdir(cwd)
            yield
    finally:
        os.chdir(folder)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def dice(a, b) -> float:
    """Dice overlap of two boolean masks (numpy)."""
    import numpy as np

    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def state_dicts_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    from ckptfmt.format.writer import tensor_bytes

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and tensor_bytes(a[k]).tobytes() == tensor_bytes(b[k]).tobytes()
        for k in a
    )


def craft_safetensors(path: Path, header_json: str, data: bytes = b"") -> Path:
    """Write a safetensors file byte by byte, from raw header text (duplicate keys and all)."""
    raw = header_json.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def flip_byte(path: Path, offset_from_end: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def full_disk_at_link(monkeypatch, ending: str) -> None:
    """`os.link` fails as on a full disk for a target whose name ends with `ending` (a commit
    record's), and works for the others."""
    import errno

    real_link = os.link

    def link(source, target, *args, **kwargs):
        if str(target).endswith(ending):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_link(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)
