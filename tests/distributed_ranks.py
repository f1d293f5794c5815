"""One rank of the 2-rank runs of test_distributed.py, started by it as a user's launcher would
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment, one fresh process per rank).

    python tests/distributed_ranks.py WORKDIR
    python tests/distributed_ranks.py WORKDIR --save-until-killed
    python tests/distributed_ranks.py WORKDIR --save-in-background

WORKDIR holds `big/model.safetensors`, `big_sharded/` and `single/` (written by the test). Each rank writes what
it saw to `WORKDIR/rank{N}.json`, and the checkpoints and outputs the test then checks. With
`--save-until-killed`, the ranks save one checkpoint, say so (`WORKDIR/saved_once`), then save it again and
again, for the test to kill a rank in the middle of a save. With `--save-in-background`, they save with
`async_save` and train on (and save again) while it writes.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from ckptfmt.models.multitask_unet import MultiTaskUNet
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

import ckptfmt
import ckptfmt.distributed

STEPS, STOP = 6, 3
SMALL = {"base_filters": 4, "depth": 2}


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same global batch for a step however many ranks there are; each rank takes its part."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 1, 16, 16, generator=generator)
    mask = (torch.rand(8, 1, 16, 16, generator=generator) > 0.5).float()
    label = torch.randint(0, 2, (8,), generator=generator)
    return x.chunk(world)[rank], mask.chunk(world)[rank], label.chunk(world)[rank]


def train(model, optimizer, steps, rank, world) -> None:
    for step in steps:
        x, mask, label = batch(step, rank, world)
        seg, cls = model(x)
        loss = F.binary_cross_entropy_with_logits(seg, mask) + F.cross_entropy(cls, label)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def agree_on_buffers(model) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does: FSDP2 leaves each rank
    its own, and ckptfmt.distributed.save refuses replicated tensors that differ."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def save_full_state(model, optimizer, path: Path) -> None:
    """The model's and the optimizer's full state as torch gathers them, on rank 0: the reference that a
    checkpoint must give back bit for bit."""
    model_state, optimizer_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        moments = {f"{name}.{key}": value for name, state in optimizer_state["state"].items()
                   for key, value in state.items()}
        save_file({**{f"model.{k}": v for k, v in model_state.items()},
                   **{f"optimizer.{k}": v for k, v in moments.items()}}, path)


def new_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def restart_peak() -> bool:
    """Restart this process's peak resident memory (VmHWM) from its present size, where Linux
    lets a process do so."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory() -> dict[str, int]:
    """This process's resident memory now and at its peak, and the bytes it has read (read and
    pread calls, whatever the page cache held), from /proc."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"rss": int(status["VmRSS"].split()[0]) * 1024, "peak": int(status["VmHWM"].split()[0]) * 1024,
            "read": int(io["rchar"])}


def outputs(model, path: Path) -> None:
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        seg, cls = model.eval()(x)
    save_file({"seg": seg.contiguous(), "cls": cls.contiguous()}, path)


def error_of(action) -> dict[str, str] | None:
    try:
        action()
    except ckptfmt.CkptfmtError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def main(work: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    report: dict = {"rank": rank}

    # Train, save (one file, and shards), save a DCP folder too, train on: "never stopping".
    torch.manual_seed(0)
    model = MultiTaskUNet(**SMALL)
    ckptfmt.distributed.shard_model(model, mesh)
    optimizer = new_optimizer(model)
    train(model, optimizer, range(STOP), rank, world)
    agree_on_buffers(model)
    save_full_state(model, optimizer, work / "first_full.safetensors")
    saved = ckptfmt.distributed.save(model, work / "first/model.safetensors", optimizer=optimizer, epoch=STOP,
                                     description="two ranks")
    report["saved"] = str(saved)
    ckptfmt.distributed.save(model, work / "first_sharded/model.safetensors", max_shard_size="20KB")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # Each rank has its own BatchNorm statistics (FSDP2 does not sync buffers): keep rank 0's, as
    # ckptfmt.distributed.save does, to compare the two.
    dcp.save({"model": model_state, "optim": optimizer_state, "extra": {"epoch": STOP, "note": "two ranks"}},
             storage_writer=dcp.FileSystemWriter(work / "dcp"),
             planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    train(model, optimizer, range(STOP, STEPS), rank, world)
    agree_on_buffers(model)
    ckptfmt.distributed.save(model, work / "straight/model.safetensors", optimizer=optimizer)
    report["exists"] = error_of(lambda: ckptfmt.distributed.save(model, work / "straight/model.safetensors"))

    # A rank that cannot write (a file-size limit of 4 KB on rank 1): the save fails on every rank,
    # naming the shard, and the previous checkpoint stays as it was.
    limited = work / "limited/model.safetensors"
    ckptfmt.distributed.save(model, limited)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the rank
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    originals = [parameter.detach().clone() for parameter in model.parameters()]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1)
    report["limited"] = error_of(lambda: ckptfmt.distributed.save(model, limited, overwrite=True))
    if rank == 1:  # room for its own shards of 4 KB, not for its rows of rank 0's 9 KB tensor
        resource.setrlimit(resource.RLIMIT_FSIZE, (6144, limit[1]))
    report["limited_rows"] = error_of(lambda: ckptfmt.distributed.save(model, limited, overwrite=True,
                                                                       max_shard_size="4KB"))
    with torch.no_grad():
        for parameter, original in zip(model.parameters(), originals):
            parameter.copy_(original)
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)

    # Resume from the first save on fresh objects: each rank reads its slices, then the optimizer.
    resumed = ckptfmt.distributed.load_model(work / "first/model.safetensors", mesh=mesh).train()
    optimizer = new_optimizer(resumed)
    report["record"] = ckptfmt.distributed.load_training_state(work / "first/model.safetensors", resumed, optimizer)
    save_full_state(resumed, optimizer, work / "reloaded_full.safetensors")
    train(resumed, optimizer, range(STOP, STEPS), rank, world)
    agree_on_buffers(resumed)
    ckptfmt.distributed.save(resumed, work / "resumed/model.safetensors", optimizer=optimizer)

    # Replicated buffers that differ between the ranks are refused, naming one; nothing is written.
    if rank == 1:
        with torch.no_grad():
            resumed.get_buffer("enc.0.1.running_mean").add_(1)
    report["disagree"] = error_of(lambda: ckptfmt.distributed.save(resumed, work / "disagree/model.safetensors"))

    # A checkpoint saved by one process (its optimizer state keyed by position) resumes here too.
    single = ckptfmt.distributed.load_model(work / "single/model.safetensors", mesh=mesh).train()
    optimizer = new_optimizer(single)
    ckptfmt.distributed.load_training_state(work / "single/model.safetensors", single, optimizer)
    agree_on_buffers(single)
    ckptfmt.distributed.save(single, work / "single_resumed/model.safetensors", optimizer=optimizer)

    # A larger model, loaded in slices: what this rank's memory and reads grew by.
    peak_restarted = restart_peak()
    before = memory()
    big = ckptfmt.distributed.load_model(work / "big/model.safetensors", mesh=mesh)
    after = memory()
    report["big_load"] = {"peak_growth": after["peak"] - before["rss"] if peak_restarted else None,
                          "read": after["read"] - before["read"],
                          "local_bytes": sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else
                                             t.numel() * t.element_size() for t in big.state_dict().values())}
    outputs(big, work / f"big_rank{rank}.safetensors")
    before = memory()
    from_shards = ckptfmt.distributed.load_model(work / "big_sharded", mesh=mesh, verify=True)
    report["verified_read"] = memory()["read"] - before["read"]
    outputs(from_shards, work / f"big_sharded_rank{rank}.safetensors")
    report["damaged"] = error_of(lambda: ckptfmt.distributed.load_model(work / "damaged", mesh=mesh, verify=True))

    # A model the user sharded, along dim 1 where FSDP2 can (even sizes): slices that are not one
    # run of bytes.
    with torch.device("meta"):
        own = MultiTaskUNet(base_filters=64, depth=3)
    fully_shard(own, mesh=mesh,
                shard_placement_fn=lambda p: Shard(1) if p.ndim > 1 and p.shape[1] % world == 0 else None)
    own.to_empty(device="cpu")
    ckptfmt.distributed.load_into(own, work / "big/model.safetensors")
    report["placements"] = sorted({str(t.placements) for t in own.state_dict().values() if hasattr(t, "placements")})
    outputs(own, work / f"own_rank{rank}.safetensors")
    ckptfmt.distributed.save(own, work / "own_saved/model.safetensors")  # dim-1 shards: assembled by DTensor

    with torch.device("meta"):
        other = MultiTaskUNet(base_filters=32, depth=3)
    fully_shard(other, mesh=mesh)
    other.to_empty(device="cpu")
    report["mismatch"] = error_of(lambda: ckptfmt.distributed.load_into(other, work / "big/model.safetensors"))
    report["legacy"] = error_of(lambda: ckptfmt.distributed.load_model(work / "single/model.pth", mesh=mesh))

    (work / f"rank{rank}.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    dist.destroy_process_group()


def save_until_killed(work: Path) -> None:
    """Save a checkpoint, say so, then save it again and again, each time with other weights, until
    the test kills a rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = MultiTaskUNet(base_filters=64, depth=3)
    ckptfmt.distributed.shard_model(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    path = work / "victim/model.safetensors"
    ckptfmt.distributed.save(model, path, max_shard_size="1MB")
    if dist.get_rank() == 0:
        (work / "saved_once").touch()
    while True:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1)
        ckptfmt.distributed.save(model, path, max_shard_size="1MB", overwrite=True)


def save_in_background(work: Path) -> None:
    """Save the state of a step in the background, and train on and save again while it is written:
    `at_call` is the same state saved by a blocking save, `trained_on` the state after."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = MultiTaskUNet(**SMALL)
    ckptfmt.distributed.shard_model(model, init_device_mesh("cpu", (world,)))
    optimizer = new_optimizer(model)
    train(model, optimizer, range(STOP), rank, world)
    agree_on_buffers(model)
    ckptfmt.distributed.save(model, work / "at_call/model.safetensors", optimizer=optimizer, epoch=STOP)
    future = ckptfmt.distributed.async_save(model, work / "background/model.safetensors", optimizer=optimizer,
                                            epoch=STOP)
    train(model, optimizer, range(STOP, STEPS), rank, world)
    agree_on_buffers(model)
    ckptfmt.distributed.save(model, work / "trained_on/model.safetensors", optimizer=optimizer)
    (work / f"rank{rank}.json").write_text(json.dumps({"background": str(future.result())}))
    # The user's teardown: the background save's own gloo group is destroyed at exit, which
    # left to the interpreter's finalization now and then aborted a rank after all was written.
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2:] == ["--save-until-killed"]:
        save_until_killed(Path(sys.argv[1]))
    elif sys.argv[2:] == ["--save-in-background"]:
        save_in_background(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
