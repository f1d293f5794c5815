"""The per-tensor digests row of tools/bench.py: `ckptfmt diff` of two ~1 GB checkpoints that
differ in one tensor, which it tells from their headers, against reading one of them whole.

    python tools/bench.py --only digests
"""

from __future__ import annotations

from pathlib import Path

CHANGED = "bottleneck.0.weight"


def _changed_copy(path: Path) -> Path:
    """The same checkpoint with one tensor changed, its other tensors and metadata as they are."""
    from safetensors.torch import load_file

    from ckptfmt import read_header
    from ckptfmt.format.writer import write_safetensors

    other = path.with_name(path.stem + ".changed.safetensors")
    if other.exists():  # a --workdir kept from an earlier run
        return other
    state_dict = load_file(path)
    state_dict[CHANGED] = state_dict[CHANGED] + 1
    computed = ("ckptfmt.weights_sha256", "ckptfmt.tensor_digests")
    metadata = {key: value for key, value in read_header(path).metadata.items() if key not in computed}
    write_safetensors(other, state_dict, metadata)
    return other


DIFF_IN_PROCESS = """
    import json, sys, time
    import ckptfmt.resolve
    from ckptfmt.compare import diff
    start = time.perf_counter()
    differing = diff(sys.argv[1], sys.argv[2])["differing"]
    print(json.dumps({"in_process_s": time.perf_counter() - start, "differing": differing}))
"""

# The floor of any reading of a file: into one buffer, nothing done with the bytes.
READ_IN_PROCESS = """
    import json, sys, time
    start = time.perf_counter()
    buffer = memoryview(bytearray(8 << 20))
    with open(sys.argv[1], "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    print(json.dumps({"in_process_s": time.perf_counter() - start}))
"""


def bench_digests(work: Path, repeats: int, architecture: tuple[int, int]) -> list[dict]:
    """diff from the headers against reading one of the files: `ckptfmt verify` of it (which
    reads and hashes it whole), whole processes; and diff() against a plain read of the file,
    in-process (the page cache warm: the floor of any read)."""
    from tools.benchmarks.measure import PYTHON, gb, make_unet_files, measure, median_of, python_child, row

    _, a = make_unet_files(work, *architecture)
    b = _changed_copy(a)
    size = a.stat().st_size
    # diff exits 1 when the checkpoints differ, as diff(1) does; any other status is a failure.
    cli = ["sh", "-c", f'"{PYTHON}" -m ckptfmt diff "{a}" "{b}"; test $? -eq 1']
    ours, verify, in_process, read = measure(
        cli, [PYTHON, "-m", "ckptfmt", "verify", str(a)],
        python_child(DIFF_IN_PROCESS) + [str(a), str(b)], python_child(READ_IN_PROCESS) + [str(a)],
        repeats=repeats,
    )
    if f"differs     {CHANGED}" not in ours["stdout"].splitlines() or CHANGED not in in_process["stdout"]:
        raise RuntimeError(f"diff did not name the changed tensor:\n{ours['stdout'][-2000:]}")
    for result in (in_process, read):
        result["in_process_s"] = median_of(result, "in_process_s")
    what = f"of two {gb(size)} checkpoints differing in one tensor (from their headers)"
    return [
        row("digests_diff", f"`ckptfmt diff` {what} vs `ckptfmt verify` of one (reads and hashes it whole): whole "
            "processes", ours, verify, "wall", target=("<=", 0.1)),
        row("digests_diff_in_process", f"`diff()` {what} vs a plain read of one (page cache warm): in-process",
            in_process, read, "in_process", target=("<=", 0.1)),
        row("digests_diff_read", "`ckptfmt diff` vs a plain read of one: whole processes", ours, read, "wall"),
    ]
