"""Building a signature index: every model of a library built once, in fresh worker processes.

Each worker imports torch and the library (3 to 5 s) and then builds its share of the models on
the meta device, answering one JSON line per model; the caller shows progress on stderr at each
tenth of the way. Workers are fresh interpreters, never forked from the user's process and never
spawned through its __main__, and they import only the adapters of a fixed table (`ADAPTERS`).
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ckptfmt.errors import ArchitectureNotRecognisedError

__all__ = ["ADAPTERS", "index_all", "index_worker"]

# The adapters a worker may import, by the library name their index is kept under: a fixed table,
# so that a worker imports nothing named from outside.
ADAPTERS = {"timm": "timm", "torchvision": "torchvision", "smp": "smp"}
# One worker per core, as many as help: each imports torch and the library (3 to 5 s) first.
MAX_INDEX_WORKERS = 8
NAMES_PER_WORKER = 16


def index_all(library: str, names: list[str], *, version: str, what: str, path: Path) -> list[dict[str, Any]]:
    """The index entries of every model named, said on stderr as it goes.

    Raises:
        ArchitectureNotRecognisedError: a worker failed; nothing is cached.

    Example:
        >>> index_all("torchvision", ["resnet18"], version="0.29.1", what="models", path=index.path)
        [{'name': 'resnet18', 'keys': '...', ...}]
    """
    # A worker costs a few seconds of imports before its first model: a few names need one.
    workers = max(1, min(MAX_INDEX_WORKERS, len(os.sched_getaffinity(0)), len(names) // NAMES_PER_WORKER))
    what = f"{library} {what}"
    print(
        f"ckptfmt: indexing the {len(names)} {what} ({library} {version}) to identify weights by "
        f"their tensors; once per version, with {workers} worker process{'es' if workers > 1 else ''}, "
        f"cached in {path}",
        file=sys.stderr, flush=True,
    )
    started = time.monotonic()
    entries, failed = _run_index_workers(library, names, workers, progress=_progress(len(names), what))
    skipped = (f"; {len(failed)} could not be built, so they are not identified: {', '.join(failed[:5])}"
               + (" ..." if len(failed) > 5 else "")) if failed else ""
    print(f"ckptfmt: indexed {len(names) - len(failed)} {what} in {time.monotonic() - started:.0f} s{skipped}",
          file=sys.stderr, flush=True)
    return entries


def _progress(total: int, what: str) -> Callable[[int], None]:
    """Says how far the build is at each tenth of the way."""
    shown = {"tenths": 0}

    def progress(done: int) -> None:
        tenths = 10 * done // total
        if tenths > shown["tenths"] and done < total:
            shown["tenths"] = tenths
            print(f"ckptfmt: indexed {done}/{total} {what}", file=sys.stderr, flush=True)

    return progress


def _run_index_workers(
    library: str, names: list[str], workers: int, *, progress: Callable[[int], None],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every model's entries, computed by `workers` fresh interpreters (each given every n-th
    name on stdin, answering one JSON line per model on stdout)."""
    lines: queue.Queue = queue.Queue()
    processes = []
    for worker in range(workers):
        # stderr to a file: a pipe nobody reads while the worker runs could fill and block it.
        errors = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(
            [sys.executable, "-c", f"from ckptfmt.models._index_workers import index_worker; index_worker({library!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        )
        process.stdin.write(json.dumps(names[worker::workers]))
        process.stdin.close()
        processes.append((process, errors))
        threading.Thread(target=_forward_lines, args=(process.stdout, lines), daemon=True).start()
    entries: list[dict[str, Any]] = []
    failed: list[str] = []
    done, finished = 0, 0
    while finished < workers:
        line = lines.get()
        if line is None:
            finished += 1
            continue
        answer = json.loads(line)
        if "error" in answer:
            failed.append(answer["name"])
        entries += answer.get("entries", [])
        done += 1
        progress(done)
    for process, errors in processes:
        if process.wait() != 0:
            errors.seek(0)
            last = (errors.read().strip().splitlines() or ["no message"])[-1][:300]
            raise ArchitectureNotRecognisedError(
                f"building the {library} index failed in a worker process ({last}); nothing was cached, "
                "so the next identification tries again"
            )
        errors.close()
    if done != len(names):
        raise ArchitectureNotRecognisedError(f"building the {library} index answered for {done} of {len(names)} models")
    return entries, sorted(failed)


def _forward_lines(stream: IO[str], lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def index_worker(library: str) -> None:
    """The body of one index worker process: names on stdin, one JSON line per name on stdout.

    Example:
        $ echo '["resnet18"]' | python -c "from ckptfmt.models._index_workers import index_worker; index_worker('timm')"
    """
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adapter = importlib.import_module(f"ckptfmt.models.{ADAPTERS[library]}")
    for name in json.loads(sys.stdin.read()):
        try:
            answer = {"name": name, "entries": adapter.index_entries(name)}
        except Exception as exc:  # a model that cannot be built is not indexed, and is said so
            answer = {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
