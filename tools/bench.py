"""Benchmarks, each ckptfmt figure beside its baseline, run side by side on the same machine.

Every measurement is a fresh process, repeated; the median wall time is reported, and the peak
RSS of that process (from wait4). Each figure is a ratio to its baseline, measured in the same
run. Prints a table and writes JSON.

    python tools/bench.py                 # the full run: 1 GB files, 5 repeats (a few minutes)
    python tools/bench.py --quick         # a smoke run: small files, 2 repeats
    python tools/bench.py --only predict --device cuda --predict-config 64,4 --batch 32

Targets (issues #7 and #13) are checked in the table's last column; nothing here is a test
assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Run as a script, this file's folder is on sys.path, not the repository that holds `tools`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.benchmarks.digests import bench_digests  # noqa: E402
from tools.benchmarks.distributed import bench_distributed  # noqa: E402
from tools.benchmarks.measure import (  # noqa: E402
    ENV,
    PYTHON,
    ROOT,
    gb,
    make_unet_files,
    measure,
    median_of,
    python_child,
    row,
    run_once,
)
from tools.benchmarks.training import bench_training  # noqa: E402

# The measurements, in the order they run; `--only` picks some.
STEPS = ("inspect", "load", "convert", "cast", "verify", "predict", "startup", "distributed", "many", "folder",
         "sharded", "signatures", "digests", "training")
def bench_inspect(work: Path, files: dict, repeats: int) -> list[dict]:
    pth, st = files["big"]
    ours, torch_look, import_torch = measure(
        [PYTHON, "-m", "ckptfmt", "inspect", str(st)],
        python_child(f"""
            import torch
            state_dict = torch.load({str(pth)!r}, map_location="cpu", weights_only=True)
            for name, tensor in state_dict.items():
                print(name, tuple(tensor.shape))
        """),
        [PYTHON, "-c", "import torch"],
        repeats=repeats,
    )
    size = st.stat().st_size
    return [
        row("inspect", f"inspect {gb(size)} .safetensors vs torch.load + print shapes", ours, torch_look,
            "wall", target=("<=", 1 / 20)),
        row("inspect_vs_import_torch", "inspect, whole process, vs python -c 'import torch'", ours, import_torch,
            "wall", target=("<=", 0.1)),
    ]


# Both sides import their libraries before the clock starts (torch for the naive path;
# ckptfmt.load_model and safetensors, which ckptfmt imports lazily, for ours); whole-process
# wall time counts every import.
LOAD_OURS = """
    import json, sys, time
    import torch, safetensors.torch
    import ckptfmt.models.multitask_unet
    from ckptfmt import load_model
    x = torch.zeros(1, 1, 64, 64)
    start = time.perf_counter()
    model = load_model(sys.argv[1])
    with torch.inference_mode():
        model(x)
    print(json.dumps({"in_process_s": time.perf_counter() - start}))
"""

LOAD_NAIVE = """
    import json, sys, time
    import torch
    import ckptfmt, ckptfmt.models.multitask_unet
    x = torch.zeros(1, 1, 64, 64)
    start = time.perf_counter()
    model = ckptfmt.models.multitask_unet.MultiTaskUNet(base_filters=int(sys.argv[2]), depth=int(sys.argv[3]))
    model.load_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True))
    model.eval()
    with torch.inference_mode():
        model(x)
    print(json.dumps({"in_process_s": time.perf_counter() - start}))
"""


def bench_load(work: Path, files: dict, repeats: int, architecture: tuple[int, int]) -> list[dict]:
    pth, st = files["load"]
    ours, naive = measure(
        python_child(LOAD_OURS) + [str(st)],
        python_child(LOAD_NAIVE) + [str(pth), *map(str, architecture)],
        repeats=repeats,
    )
    for result in (ours, naive):
        result["in_process_s"] = median_of(result, "in_process_s")
    what = f"load_model (base_filters={architecture[0]}, depth={architecture[1]}) to first forward vs construct + torch.load + load_state_dict"
    return [
        row("load_wall", what + ": whole process", ours, naive, "wall", target=("<=", 0.7)),
        row("load_in_process", what + ": in-process", ours, naive, "in_process", target=("<=", 0.2)),
        row("load_rss", what + ": peak RSS", ours, naive, "rss", target=("<=", 0.65)),
    ]


MINIMAL_CONVERT = """
    import sys, torch
    from safetensors.torch import save_file
    save_file(torch.load(sys.argv[1], map_location="cpu", weights_only=True), sys.argv[2])
"""


def bench_convert(work: Path, files: dict, repeats: int) -> list[dict]:
    """Convert at three sizes against the minimal script; peak RSS should stay flat."""
    out = work / "converted"
    out.mkdir(exist_ok=True)
    (torch_only,) = measure(python_child("import torch, ckptfmt.converter, ckptfmt.models.multitask_unet"), repeats=repeats)
    rows, by_size = [], {}
    for label, (pth, _) in files["convert"].items():
        size = gb(pth.stat().st_size)
        ours, minimal = measure(
            [PYTHON, "-m", "ckptfmt", "convert", str(pth), "-o", str(out / f"ours_{label}.safetensors"), "--force"],
            python_child(MINIMAL_CONVERT) + [str(pth), str(out / f"minimal_{label}.safetensors")],
            repeats=repeats,
        )
        by_size[label] = ours
        what = f"convert {size} .pth (mapped, copied by offset, read back and compared, digest, fsync) vs torch.load + save_file"
        rows.append(row(f"convert_rss_{label}", what + ": peak RSS", ours, minimal, "rss",
                        target=("<=", 0.15) if label == "3GB" else None))
        rows.append(row(f"convert_wall_{label}", what + ": wall", ours, minimal, "wall",
                        target=("<=", 0.8) if label in ("1GB", "3GB") else None))
        for name in ("ours", "minimal"):
            (out / f"{name}_{label}.safetensors").unlink(missing_ok=True)
    smallest, largest = min(by_size, key=lambda k: float(k[:-2])), max(by_size, key=lambda k: float(k[:-2]))
    rows.append(row("convert_rss_flat", f"convert peak RSS at {largest} vs at {smallest} (flat in file size)",
                    by_size[largest], by_size[smallest], "rss", target=("<=", 1.1)))
    rows.append(row("convert_rss_over_torch", f"convert peak RSS at {largest} vs importing torch and ckptfmt",
                    by_size[largest], torch_only, "rss"))
    return rows


def bench_cast(work: Path, files: dict, repeats: int) -> list[dict]:
    """convert --dtype fp16 (every tensor checked for values the cast would make inf, a chunk at
    a time, then cast) vs the same convert without a cast, at the largest size."""
    out = work / "cast"
    out.mkdir(exist_ok=True)
    label, (pth, _) = max(files["convert"].items(), key=lambda item: float(item[0][:-2]))
    cast, plain = measure(
        [PYTHON, "-m", "ckptfmt", "convert", str(pth), "-o", str(out / "fp16.safetensors"), "--dtype", "fp16", "--force"],
        [PYTHON, "-m", "ckptfmt", "convert", str(pth), "-o", str(out / "same.safetensors"), "--force"],
        repeats=repeats,
    )
    shutil.rmtree(out, ignore_errors=True)
    what = f"convert {gb(pth.stat().st_size)} .pth --dtype fp16 (overflow check and cast) vs convert without a cast"
    return [row("cast_wall", what + ": wall", cast, plain, "wall"), row("cast_rss", what + ": peak RSS", cast, plain, "rss")]


def bench_many(work: Path, repeats: int, count: int) -> list[dict]:
    """The per-file cost of converting a folder of small checkpoints, against a minimal loop in
    one process; each side's start-up (an empty folder) is taken off before dividing."""
    import torch
    from ckptfmt.models.multitask_unet import MultiTaskUNet

    folder, empty = work / "many", work / "many_empty"
    empty.mkdir(exist_ok=True)
    if not folder.exists():
        folder.mkdir()
        state_dict = MultiTaskUNet(base_filters=4, depth=2).state_dict()
        for index in range(count):
            torch.save(state_dict, folder / f"m{index:04d}.pth")
    loop = """
        import sys, pathlib, torch
        from safetensors.torch import save_file
        for p in sorted(pathlib.Path(sys.argv[1]).glob("*.pth")):
            save_file(torch.load(p, map_location="cpu", weights_only=True), p.with_suffix(".minimal.safetensors"))
    """
    clean = [PYTHON, "-c", f"import pathlib; [p.unlink() for p in pathlib.Path({str(folder)!r}).iterdir() if p.suffix != '.pth']"]

    def ours(path: Path) -> list[str]:  # a fresh conversion each time: no [SKIP] of what a round before wrote
        return [PYTHON, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:-1]); "
                "subprocess.run([sys.executable, '-m', 'ckptfmt', 'convert', sys.argv[-1], '--force'], check=True, "
                "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)", *clean, str(path)]

    ours_run, loop_run, ours_empty, loop_empty = measure(
        ours(folder), python_child(loop) + [str(folder)], ours(empty), python_child(loop) + [str(empty)],
        repeats=repeats,
    )
    for result, start in ((ours_run, ours_empty), (loop_run, loop_empty)):
        result["per_file_s"] = (result["wall_s"] - start["wall_s"]) / count
    return [row("convert_per_file", f"convert of {count} small .pth files, per file, vs a minimal loop in one process",
                ours_run, loop_run, "per_file", target=("<=", 1.5))]


def bench_inspect_folder(work: Path, repeats: int, counts: tuple[int, ...]) -> list[dict]:
    """inspect of folders of 500, 1,000 and 2,000 .safetensors: linear in the file count, and
    against reading the same headers in a plain loop."""
    import torch
    from ckptfmt.models.multitask_unet import MultiTaskUNet

    import ckptfmt

    model = MultiTaskUNet(base_filters=4, depth=2)
    plain = """
        import json, pathlib, struct, sys
        for p in sorted(pathlib.Path(sys.argv[1]).rglob("*.safetensors")):
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                json.loads(f.read(n))
    """
    rows, results = [], {}
    for count in counts:
        folder = work / f"inspect_{count}"
        if not folder.exists():
            source = ckptfmt.save(model, work / "inspect_source/model.safetensors", overwrite=True)
            for index in range(count):
                target = folder / f"run{index // 50:03d}" / f"m{index:04d}.safetensors"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                if index % 50 == 0:
                    shutil.copyfile(source.parent / "model_config.json", target.parent / "model_config.json")
        ours, loop = measure([PYTHON, "-m", "ckptfmt", "inspect", str(folder)], python_child(plain) + [str(folder)],
                             repeats=repeats)
        results[count] = ours
        rows.append(row(f"inspect_folder_{count}", f"inspect of a folder of {count:,} .safetensors vs reading their "
                        "headers in a plain loop", ours, loop, "wall", target=("<=", 2.0) if count == max(counts) else None))
    low, high = min(counts), max(counts)
    # The runs above find each summary in the cache folder after the untimed round, as a user's
    # second look at a folder does; a cache folder that cannot be created gives every run cold.
    # The summary cache earns its place only by its gain, warm against none, side by side.
    folder = work / f"inspect_{high}"
    warm, cold, loop = measure([PYTHON, "-m", "ckptfmt", "inspect", str(folder)],
                               ["env", "CKPTFMT_CACHE_DIR=/dev/null/no-cache", PYTHON, "-m", "ckptfmt", "inspect", str(folder)],
                               python_child(plain) + [str(folder)], repeats=repeats)
    rows.append(row(f"inspect_folder_{high}_cold", f"the same, {high:,} files, with no cache (a first look)", cold, loop,
                    "wall"))
    rows.append(row("inspect_folder_cache", f"inspect of {high:,} files, the summary cache warm vs none", warm, cold,
                    "wall", target=("<=", 0.5)))
    scaled = dict(results[low], wall_s=results[low]["wall_s"] * high / low)
    rows.append(row("inspect_folder_linear", f"inspect of {high:,} files vs {high // low} x inspect of {low:,} "
                    "(linear in the file count)", results[high], scaled, "wall", target=("<=", 1.1)))
    _ = torch
    return rows


def bench_verify(work: Path, files: dict, repeats: int) -> list[dict]:
    _, st = files["big"]
    ours, sha = measure(
        [PYTHON, "-m", "ckptfmt", "verify", str(st), "--json"],
        python_child(f"""
            import hashlib
            with open({str(st)!r}, "rb") as f:
                hashlib.file_digest(f, "sha256")
        """),
        repeats=repeats,
    )
    size = st.stat().st_size
    ours["gb_per_s"] = statistics.median(json.loads(out)[0]["gb_per_s"] for out in ours["stdouts"])
    # The facts cache earns its place only by its gain, warm against none, side by side.
    small = files["small"]
    warm, cold = measure([PYTHON, "-m", "ckptfmt", "verify", str(small)],
                         ["env", "CKPTFMT_CACHE_DIR=/dev/null/no-cache", PYTHON, "-m", "ckptfmt", "verify", str(small)],
                         repeats=repeats)
    return [
        row("verify_wall", f"verify of {gb(size)}, whole process, vs hashlib.sha256 of the file in a fresh process",
            ours, sha, "wall", target=("<=", 1.5)),
        row("verify_facts", f"verify of {gb(small.stat().st_size)}, what the architecture said of its config "
            "remembered vs asked again (torch and the architecture imported)", warm, cold, "wall", target=("<=", 0.5)),
    ]


def bench_sharded(work: Path, files: dict, repeats: int) -> list[dict]:
    """load_model of a sharded checkpoint against the same weights in one file."""
    import ckptfmt

    _, single = files["load"]
    sharded = work / "sharded/model.safetensors.index.json"
    if not sharded.exists():
        # Four shards, whatever the size (a 0.5 GB model in shards of 128 MB, as models of tens
        # of GB come in shards of a few GB).
        ckptfmt.save(ckptfmt.load_model(single), sharded.parent / "model.safetensors",
                     max_shard_size=single.stat().st_size // 4 + 1)
    ours, one = measure(python_child(LOAD_OURS) + [str(sharded)], python_child(LOAD_OURS) + [str(single)],
                        repeats=repeats)
    for result in (ours, one):
        result["in_process_s"] = median_of(result, "in_process_s")
    shards = len(list(sharded.parent.glob("model-*.safetensors")))
    what = f"load_model of {gb(single.stat().st_size)} in {shards} shards vs in one file"
    return [
        row("sharded_load_rss", what + ": peak RSS", ours, one, "rss", target=("<=", 1.1)),
        row("sharded_load_wall", what + ": load to first forward, in-process", ours, one, "in_process", target=("<=", 1.1)),
    ]


PREDICT = """
    import json, sys, time
    import numpy as np, torch
    from ckptfmt import MultiTaskPredictor
    path, device, precision, batch, side, rounds, compiled = sys.argv[1:8]
    predictor = MultiTaskPredictor(path, device=device, precision=precision, batch_size=int(batch))
    if compiled == "compile":
        predictor.model = torch.compile(predictor.model)
    images = np.random.default_rng(0).random((int(batch), 1, int(side), int(side)), dtype=np.float32)
    predictor.predict(images)  # warm-up: cudnn.benchmark, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(int(rounds)):
        predictor.predict(images)
    if device == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"images_per_s": int(rounds) * int(batch) / (time.perf_counter() - start)}))
"""


def bench_predict(work: Path, files: dict, repeats: int, device: str, batch: int, side: int, rounds: int,
                  compiled: bool) -> list[dict]:
    _, st = files["predict"]

    def command(precision: str, mode: str) -> list[str]:
        return python_child(PREDICT) + [str(st), device, precision, str(batch), str(side), str(rounds), mode]

    what = f"predict images/s, {side}x{side}, batch {batch}, {files['predict_arch']}, {device}"
    runs = [("fp32", "eager")] if device != "cuda" else [("fp32", "eager"), ("fp16", "eager")]
    if device == "cuda" and compiled:
        runs.append(("fp16", "compile"))
    results = measure(*(command(*run) for run in runs), repeats=repeats)
    for result in results:
        result["images_per_s"] = median_of(result, "images_per_s")
    if device != "cuda":
        return [row("predict_cpu", what + ": fp32", results[0], None, "ips")]
    rows = [row("predict_fp16_vs_fp32", what + ": fp16 vs fp32", results[1], results[0], "ips", target=(">=", 2.0))]
    if compiled:
        rows.append(row("predict_fp16_compiled", what + ": fp16 + torch.compile vs fp32", results[2], results[0], "ips"))
    return rows


def bench_startup(work: Path, files: dict, repeats: int) -> list[dict]:
    _, st = files["predict"]
    (probe,) = measure(python_child("""
        import sys
        from ckptfmt.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        print("torch" in sys.modules)
    """), repeats=1)
    help_run, inspect_run, baseline = measure(
        [PYTHON, "-m", "ckptfmt", "--help"], [PYTHON, "-m", "ckptfmt", "inspect", str(st)], [PYTHON, "-c", "pass"],
        repeats=repeats,
    )
    imports_torch = probe["stdout"].strip().splitlines()[-1] == "True"
    return [
        row("help_startup", f"ckptfmt --help vs python -c pass (imports torch: {imports_torch})", help_run, baseline, "wall"),
        row("inspect_startup", "ckptfmt inspect (small file) vs python -c pass", inspect_run, baseline, "wall"),
    ]


def bench_signatures(work: Path, repeats: int) -> list[dict]:
    """ckptfmt convert of a bare timm state dict, which identifies it through the libraries'
    signature indexes: with them cached, against the first run, which builds them (timm's, and
    torchvision's, which a bare .pth is asked of too). Skipped, saying so, without timm."""
    if subprocess.run([PYTHON, "-c", "import timm"], capture_output=True).returncode != 0:
        print("signatures: skipped, timm does not import here (see the README's \"The field's libraries\")",
              file=sys.stderr)
        return []
    folder = work / "signatures"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "cache").mkdir(parents=True)
    pth = folder / "model.pth"
    subprocess.run(python_child(f"""
        import timm, torch
        torch.save(timm.create_model("test_convnext", num_classes=3).state_dict(), {str(pth)!r})
    """), check=True, cwd=ROOT, env=ENV)
    # `env` execs the command, so the launcher measures ckptfmt's own process.
    convert = ["env", f"CKPTFMT_CACHE_DIR={folder / 'cache'}", PYTHON, "-m", "ckptfmt", "convert", str(pth),
               "-o", str(folder / "model.safetensors"), "--force"]
    wall, rss, _ = run_once(convert, folder)  # once: it builds the indexes (minutes)
    cold = {"wall_s": wall, "walls_s": [round(wall, 4)], "peak_rss_bytes": rss}
    (warm,) = measure(convert, repeats=repeats)
    if "model_name=\"test_convnext\"" not in warm["stdout"]:
        raise RuntimeError(f"the timm model was not identified:\n{warm['stdout'][-2000:]}")
    indexes = ", ".join(sorted(p.name for p in (folder / "cache/signatures").iterdir()))
    return [
        row("signatures_identify", f"convert of a bare timm .pth (test_convnext), its signature indexes cached ({indexes}), "
            "vs the first convert, which builds them", warm, cold, "wall", target=("<=", 0.5)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small files, 2 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, help="fresh processes per measurement (default 5, quick 2)")
    parser.add_argument("--only", help=f"comma-separated: {','.join(STEPS)}")
    parser.add_argument("--device", default="cpu", help="device for the predict benchmark")
    parser.add_argument("--predict-config", default=None, help="base_filters,depth for predict (default 64,4; quick 8,3)")
    parser.add_argument("--compile", action="store_true", help="also time predict with torch.compile (CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="predict batch size (default 8 on CPU, 32 on CUDA)")
    parser.add_argument("--json", dest="json_path", type=Path, default=ROOT / "bench-results/bench.json")
    parser.add_argument("--workdir", type=Path, help="where the test files go (default: a temp folder)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    repeats = args.repeats or (2 if args.quick else 5)
    selected = set(args.only.split(",") if args.only else STEPS)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckptfmt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"files in {work}", file=sys.stderr)

    big = (32, 4) if args.quick else (90, 5)          # ~1 GB at full size
    load_arch = (16, 4) if args.quick else (64, 5)     # 124M parameters at full size
    predict_arch = tuple(map(int, args.predict_config.split(","))) if args.predict_config else ((8, 3) if args.quick else (64, 4))
    batch = args.batch or (32 if args.device == "cuda" else (2 if args.quick else 8))
    side = 64 if args.quick else 256
    files = {}
    if selected & {"inspect", "verify"}:
        print(f"making U-Net base_filters={big[0]}, depth={big[1]} files ...", file=sys.stderr)
        files["big"] = make_unet_files(work, *big)
        files["small"] = make_unet_files(work, 8, 3)[1]
    if selected & {"convert", "cast"}:
        # ~0.1, 1 and 3 GB: the parameters grow with base_filters squared.
        sizes = {"0.1GB": (10, 5), "0.4GB": (20, 5)} if args.quick else {"0.1GB": (29, 5), "1GB": (90, 5), "3GB": (157, 5)}
        files["convert"] = {label: make_unet_files(work, *arch) for label, arch in sizes.items()}
    if selected & {"load", "sharded"}:
        files["load"] = files["big"] if load_arch == big and "big" in files else make_unet_files(work, *load_arch)
    if selected & {"predict", "startup"}:
        files["predict"] = make_unet_files(work, *predict_arch)
        files["predict_arch"] = f"base_filters={predict_arch[0]}, depth={predict_arch[1]}"


    rows = []
    steps = [
        ("inspect", lambda: bench_inspect(work, files, repeats)),
        ("load", lambda: bench_load(work, files, repeats, load_arch)),
        ("convert", lambda: bench_convert(work, files, repeats)),
        ("cast", lambda: bench_cast(work, files, repeats)),
        ("verify", lambda: bench_verify(work, files, repeats)),
        ("predict", lambda: bench_predict(work, files, min(repeats, 3), args.device, batch, side,
                                          2 if args.quick or args.device != "cuda" else 10, args.compile)),
        ("startup", lambda: bench_startup(work, files, repeats)),
        ("distributed", lambda: bench_distributed(work, repeats, (64, 3) if args.quick else (256, 3))),
        ("many", lambda: bench_many(work, repeats, 50 if args.quick else 500)),
        ("folder", lambda: bench_inspect_folder(work, repeats, (50, 100, 200) if args.quick else (500, 1000, 2000))),
        ("sharded", lambda: bench_sharded(work, files, repeats)),
        ("signatures", lambda: bench_signatures(work, repeats)),
        ("digests", lambda: bench_digests(work, repeats, big)),
        ("training", lambda: bench_training(work, min(repeats, 3), (32, 4) if args.quick else (90, 5))),
    ]
    for name, step in steps:
        if name in selected:
            print(f"measuring {name} ...", file=sys.stderr)
            rows += step()

    machine = {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "repeats": repeats, "quick": args.quick,
    }
    import torch

    machine["torch"] = torch.__version__
    if args.device == "cuda" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    print(f"\nMachine: {machine}\n")
    print("| measurement | ours | baseline | ratio | target | met |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        baseline = f"{r['baseline']:g} {r['unit']}" if r["baseline"] is not None else "-"
        ratio = f"{r['ratio']:.3f}x" if r["ratio"] is not None else "-"
        print(f"| {r['what']} | {r['ours']:g} {r['unit']} | {baseline} | {ratio} | {r['target'] or ''} | {met} |")
    args.json_path.parent.mkdir(parents=True, exist_ok=True)
    args.json_path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.json_path}", file=sys.stderr)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
