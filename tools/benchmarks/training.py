"""Checkpointing during training: how long `ckptfmt.async_save` blocks the caller, beside a
blocking `ckptfmt.save` of the same model and DCP's own `async_save` (one process, CPU).

One fresh process builds a U-Net (about 1 GB at full size) and, round after round, saves it each
way, every save finished and the page cache written back before the next one starts; the first
round is untimed (the staging buffers are allocated there, as in a training loop's first save),
and the first async_save is reported apart. After the rounds, the async save's tensors are
checked bit for bit against the blocking save's (not timed).

    python tools/bench.py --only training --quick
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

# What the caller of each save waits for, in seconds, per round.
TRAINING = """
import json, os, shutil, sys, time
from pathlib import Path
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
import ckptfmt
from ckptfmt.format.writer import tensor_bytes
from ckptfmt.models.multitask_unet import MultiTaskUNet

base_filters, depth, rounds, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
torch.manual_seed(0)
model = MultiTaskUNet(base_filters=base_filters, depth=depth)
times = {name: [] for name in ("blocking", "async", "async_done", "dcp", "dcp_done")}

def blocked(start_save):
    os.sync()
    start = time.perf_counter()
    future = start_save()
    returned = time.perf_counter() - start
    future.result()
    return returned, time.perf_counter() - start

for round in range(rounds + 1):
    shutil.rmtree(out / f"round-{round - 1}", ignore_errors=True)
    folder = out / f"round-{round}"
    os.sync()
    start = time.perf_counter()
    ckptfmt.save(model, folder / "blocking.safetensors")
    blocking = time.perf_counter() - start
    asynchronous, asynchronous_done = blocked(lambda: ckptfmt.async_save(model, folder / "async.safetensors"))
    dcp_returned, dcp_done = blocked(lambda: dcp.async_save(
        model.state_dict(), storage_writer=dcp.FileSystemWriter(folder / "dcp"), no_dist=True))
    assert (folder / "dcp/.metadata").exists()
    if round == 0:
        first_async = asynchronous
        continue
    for name, value in (("blocking", blocking), ("async", asynchronous), ("async_done", asynchronous_done),
                        ("dcp", dcp_returned), ("dcp_done", dcp_done)):
        times[name].append(value)

written, expected = load_file(folder / "async.safetensors"), load_file(folder / "blocking.safetensors")
identical = written.keys() == expected.keys() and all(
    tensor_bytes(written[k]).tobytes() == tensor_bytes(expected[k]).tobytes() for k in expected)
print(json.dumps({"times": times, "first_async": first_async, "identical": identical,
                  "size": (folder / "blocking.safetensors").stat().st_size}))
"""


def bench_training(work: Path, repeats: int, architecture: tuple[int, int]) -> list[dict]:
    """The rows of the training step of `tools/bench.py`."""
    from tools.benchmarks.measure import ENV, ROOT, gb, python_child, row

    out = work / "training"
    result = subprocess.run(python_child(TRAINING) + [*map(str, architecture), str(repeats), str(out)],
                            capture_output=True, cwd=ROOT, env=ENV)
    if result.returncode != 0:
        raise RuntimeError(f"the training bench failed:\n{result.stderr.decode()[-2000:]}")
    report = json.loads(result.stdout.decode().splitlines()[-1])
    if not report["identical"]:
        raise RuntimeError("async_save wrote other tensors than the blocking save of the same model")
    timed = {name: {"in_process_s": statistics.median(values), "walls_s": [round(v, 4) for v in values]}
             for name, values in report["times"].items()}
    first = {"in_process_s": report["first_async"], "walls_s": [round(report["first_async"], 4)]}
    size = gb(report["size"])
    return [
        row("training_async_blocked", f"async_save of a {size} U-Net on the CPU: time the caller is blocked "
            "(staging buffer reused) vs a blocking ckptfmt.save of the same model (tensors bit-identical: yes)",
            timed["async"], timed["blocking"], "in_process", target=("<=", 0.15)),
        row("training_async_first", "the same, the process's first async_save (its staging buffer allocated)",
            first, timed["blocking"], "in_process"),
        row("training_async_done", "the same, until its future's result() (written, read back, fsynced) vs the "
            "blocking save", timed["async_done"], timed["blocking"], "in_process"),
        # DCP's own reuse of its staging memory (cache_staged_state_dict=True) pins it, which
        # needs an accelerator: on the CPU it stages afresh each time.
        row("training_vs_dcp_async", "async_save: time the caller is blocked vs DCP's async_save (FileSystemWriter, "
            "one process)", timed["async"], timed["dcp"], "in_process"),
        row("training_dcp_async_done", "DCP's async_save until its future's result() vs the blocking ckptfmt.save",
            timed["dcp_done"], timed["blocking"], "in_process"),
    ]
