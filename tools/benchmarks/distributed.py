"""The distributed measurements of `tools/bench.py` (`--only distributed`): ranks on the CPU
(gloo), each a fresh process started as torchrun starts them.

- load: `ckptfmt.distributed.load_model`, each rank reading its slices, against each rank
  loading the full state dict (torch's `set_model_state_dict` with `full_state_dict=True`).
- save: `ckptfmt.distributed.save` (each rank writing its part of every tensor into the shard
  the tensor belongs to, each shard's owner reading it back and digesting it, rank 0
  committing) against DCP's own `dcp.save` (each rank writing its shards to its own file), on
  2 and 4 ranks: the peak RSS of the largest rank and the time of the slowest, and how the
  peak above a rank's start (its share of the model and what the save adds) goes from 2 to 4
  ranks.

Each rank restarts its peak (VmHWM) just before the timed part, so that the peak is the save's
or the load's, not the setup's.

    python tools/bench.py --only distributed --repeats 3
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

# One rank. `sliced`, `full`: the loads; `save_ours`, `save_dcp`: the saves, from a model
# sharded and filled first. Prints the rank's seconds, peak RSS during the timed part, and RSS
# after start-up (before any of the model).
DISTRIBUTED_RANK = """
import json, sys, time
from pathlib import Path
import torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
import ckptfmt.distributed
from ckptfmt.models.multitask_unet import MultiTaskUNet

def status(key):
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in lines if line.startswith(key)).split()[1]) * 1024

mode, path, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
base = status("VmRSS:")
config = ckptfmt.read_header(path).config_dict()
with torch.device("meta"):
    model = MultiTaskUNet(base_filters=config["base_filters"], depth=config["depth"])
if mode.startswith("save"):
    ckptfmt.distributed.shard_model(model, mesh)
    model.to_empty(device="cpu")
    ckptfmt.distributed.load_into(model, path)
dist.barrier()
Path("/proc/self/clear_refs").write_text("5")
start = time.perf_counter()
if mode == "sliced":
    model = ckptfmt.distributed.load_model(path, mesh=mesh)
elif mode == "full":
    ckptfmt.distributed.shard_model(model, mesh)
    model.to_empty(device="cpu")
    set_model_state_dict(model, load_file(path), options=StateDictOptions(full_state_dict=True))
elif mode == "save_ours":
    ckptfmt.distributed.save(model, out / "model.safetensors", overwrite=True)
else:
    dcp.save(get_model_state_dict(model), storage_writer=dcp.FileSystemWriter(out / "dcp", overwrite=True))
seconds = time.perf_counter() - start
dist.barrier()
print(json.dumps({"rank": dist.get_rank(), "s": seconds, "peak": status("VmHWM:"), "base": base}), flush=True)
dist.destroy_process_group()
"""

# Starts the ranks as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), without
# importing torch itself, and prints their reports: the slowest rank's seconds, the largest
# rank's peak RSS, and the largest peak above its rank's start.
DISTRIBUTED_LAUNCH = """
import json, os, socket, subprocess, sys
script, world, *arguments = sys.argv[1:]
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
env = {**os.environ, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
ranks = [subprocess.Popen([sys.executable, script, *arguments], stdout=subprocess.PIPE, env={**env, "RANK": str(rank)})
         for rank in range(int(world))]
reports = [json.loads(rank.communicate(timeout=600)[0].decode().splitlines()[-1]) for rank in ranks]
if any(rank.returncode for rank in ranks):
    sys.exit(1)
print(json.dumps({"in_process_s": max(r["s"] for r in reports), "rank_peaks": [r["peak"] for r in reports],
                  "rank_peak": max(r["peak"] for r in reports),
                  "rank_growth": max(r["peak"] - r["base"] for r in reports)}))
"""


def bench_distributed(work: Path, repeats: int, architecture: tuple[int, int]) -> list[dict]:
    """The rows: loads on 2 ranks, saves on 2 and 4 ranks, each beside its baseline."""
    import torch
    from ckptfmt.models.multitask_unet import MultiTaskUNet

    import ckptfmt
    from tools.benchmarks.measure import gb, measure, median_of, python_child, row

    path = work / f"distributed_{architecture[0]}_{architecture[1]}/model.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        ckptfmt.save(MultiTaskUNet(*architecture), path)
    script = work / "distributed_rank.py"
    script.write_text(textwrap.dedent(DISTRIBUTED_RANK))
    out = work / "distributed_out"
    out.mkdir(exist_ok=True)
    size = gb(path.stat().st_size)

    def ranks(world: int, mode: str) -> list[str]:
        return python_child(DISTRIBUTED_LAUNCH) + [str(script), str(world), mode, str(path), str(out)]

    def summarised(results: list[dict]) -> list[dict]:
        for result in results:
            reports = [json.loads(stdout) for stdout in result["stdouts"]]
            result["in_process_s"] = median_of(result, "in_process_s")
            result["peak_rss_bytes"] = max(report["rank_peak"] for report in reports)
            result["growth"] = {"peak_rss_bytes": max(report["rank_growth"] for report in reports),
                                "walls_s": result["walls_s"]}
        return results

    sliced, full = summarised(measure(ranks(2, "sliced"), ranks(2, "full"), repeats=repeats))
    rows = [
        row("distributed_load_rss", f"2-rank load of a {size} U-Net, each rank its slices, vs each rank loading the "
            "full state dict: peak RSS of the larger rank", sliced, full, "rss", target=("<=", 0.6)),
        row("distributed_load_wall", "the same: load time of the slower rank", sliced, full, "in_process"),
    ]
    saves = {}
    for world in (2, 4):
        ours, own = saves[world] = summarised(measure(ranks(world, "save_ours"), ranks(world, "save_dcp"),
                                                      repeats=repeats))
        rows += [
            row(f"distributed_save_rss_{world}", f"{world}-rank save of the {size} U-Net, each rank writing its part of "
                "every shard, vs DCP's own dcp.save: peak RSS of the largest rank", ours, own, "rss",
                target=("<=", 1.2)),
            row(f"distributed_save_wall_{world}", f"the same on {world} ranks: save time of the slowest rank", ours, own,
                "in_process", target=("<=", 1.5)),
        ]
    for index, who in ((0, "ckptfmt.distributed.save"), (1, "dcp.save")):
        rows.append(row(f"distributed_save_scaling_{'ours' if index == 0 else 'dcp'}",
                        f"{who}: peak RSS above the rank's start, 4 ranks vs 2 (its share halves)",
                        saves[4][index]["growth"], saves[2][index]["growth"], "rss",
                        target=("<=", 0.6) if index == 0 else None))
    return rows
