"""What every benchmark shares: running a command as a fresh, measured process beside its
baseline, the U-Net files they measure, and the rows of the table (`tools/bench.py`)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


# Runs the command as its own child and reports that child's rusage. The extra process matters:
# Linux carries the RSS high-water mark of the process that forks into the child's ru_maxrss,
# so a child forked straight from this (large) benchmark process would inherit its footprint.
# The wall time is taken here too, from fork to exit, so the launcher's own start is not in it.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"status": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss, "wall_s": wall}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


# As users run Python: with bytecode caches (some sandboxes set PYTHONDONTWRITEBYTECODE, which
# makes every start recompile every module that is not precompiled).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_once(command: list[str], scratch: Path) -> tuple[float, int, str]:
    """One fresh process: wall seconds, peak RSS in bytes, stdout."""
    report = scratch / "rusage.json"
    result = subprocess.run([PYTHON, "-c", LAUNCHER, str(report), *command], capture_output=True, cwd=ROOT, env=ENV)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr.decode()[-2000:]}")
    usage = json.loads(report.read_text())
    return usage["wall_s"], usage["maxrss_kb"] * 1024, result.stdout.decode()


def measure(*commands: list[str], repeats: int) -> list[dict]:
    """Run the commands in turn, `repeats` rounds after one untimed round (ours and its baseline
    alternate, so drift in the machine's speed falls on both): per command the median wall,
    max peak RSS, last stdout."""
    os.sync()  # no writeback from an earlier step running under this one
    runs: list[list[tuple[float, int, str]]] = [[] for _ in commands]
    with tempfile.TemporaryDirectory() as scratch:
        for command in commands:  # untimed: bytecode caches written, files in the page cache
            run_once(command, Path(scratch))
        for _ in range(repeats):
            for index, command in enumerate(commands):
                runs[index].append(run_once(command, Path(scratch)))
    return [
        {"wall_s": statistics.median(r[0] for r in rounds), "walls_s": [round(r[0], 4) for r in rounds],
         "peak_rss_bytes": max(r[1] for r in rounds), "stdout": rounds[-1][2], "stdouts": [r[2] for r in rounds]}
        for rounds in runs
    ]


def python_child(code: str) -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(code)]


def make_unet_files(folder: Path, base_filters: int, depth: int) -> tuple[Path, Path]:
    """The same random U-Net weights as a legacy .pth and as a ckptfmt .safetensors."""
    import torch
    from ckptfmt.models.multitask_unet import MultiTaskUNet

    from ckptfmt import ModelConfig
    from ckptfmt.format.metadata import build_metadata
    from ckptfmt.format.writer import write_safetensors

    pth = folder / f"unet_{base_filters}_{depth}.pth"
    safetensors = folder / f"unet_{base_filters}_{depth}.safetensors"
    if pth.exists() and safetensors.exists():  # a --workdir kept from an earlier run
        return pth, safetensors
    config = ModelConfig(base_filters=base_filters, depth=depth)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in MultiTaskUNet(**config.get_model_params()).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        k: torch.randn(shape, generator=generator) * 0.01 if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        for k, (shape, dtype) in shapes.items()
    }
    torch.save(state_dict, pth)
    write_safetensors(safetensors, state_dict, build_metadata(config, training={}, provenance={}))
    return pth, safetensors


def median_of(result: dict, key: str) -> float:
    """The median of a figure that each run printed as JSON on its stdout."""
    return statistics.median(json.loads(out)[key] for out in result["stdouts"])


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def row(name: str, what: str, ours: dict, baseline: dict | None, metric: str, target: tuple | None = None) -> dict:
    key, unit = {
        "wall": ("wall_s", "s"), "in_process": ("in_process_s", "s"), "rss": ("peak_rss_bytes", "MB"),
        "gbps": ("gb_per_s", "GB/s"), "ips": ("images_per_s", "img/s"), "per_file": ("per_file_s", "s"),
    }[metric]
    ours_value = ours[key]
    base_value = baseline[key] if baseline else None
    ratio = ours_value / base_value if base_value else None
    met = None
    if target and ratio is not None:
        met = ratio <= target[1] if target[0] == "<=" else ratio >= target[1]
    scale = 1e6 if unit == "MB" else 1
    return {
        "name": name, "what": what, "unit": unit, "ours_walls_s": ours["walls_s"],
        "baseline_walls_s": baseline["walls_s"] if baseline else None,
        "ours": round(ours_value / scale, 4), "baseline": round(base_value / scale, 4) if base_value else None,
        "ratio": round(ratio, 4) if ratio is not None else None,
        "target": f"{target[0]} {target[1]:g}x" if target else None, "met": met,
    }
