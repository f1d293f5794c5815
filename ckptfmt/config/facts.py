"""What an architecture says about a config, remembered between processes.

Checking a config against its architecture, and learning the tensors it gives, means importing
the architecture, and so torch (1.5 to 2.5 s): most of what `verify` of a small file costs, and
more than hashing a 1 GB file. Remembered, a later `verify` of a file of that architecture needs
neither torch nor the architecture: ten times faster and more (`tools/bench.py`, verify_facts).

An answer is given back only while the code that gave it is unchanged: it is stored with every
module loaded in the process that worked it out (the architecture's package, the model library,
torch, ckptfmt, whatever they imported; the standard library counts by Python's version), each
by its file's identity (size, modification and change times, inode). An edit to any module of
a plugin, an upgrade, a reinstall: the next `verify` asks the architecture again. Nothing is
remembered when a module's file changed after this process started, for the code in memory may
then not be the file's. An architecture registered only in the running process (no entry point)
is not remembered. A cache that cannot be read or written is ignored: it only ever saves time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from ..io.files import cache_folder, read_capped
from .entry_points import installed_entry_points

__all__ = ["recall", "remember"]

_VERSION = 2
_MAX_BYTES = 64 << 20
_IMPORTED_NS = time.time_ns()


def recall(document: dict[str, Any]) -> dict[str, Any] | None:
    """What was learned of this config document (as `ModelConfig.to_dict` gives it) by the
    code installed now: `{"state": {name: [shape, dtype]}}`; or None.

    Example:
        >>> facts = recall(config.to_dict())
        >>> facts["state"]["fc.weight"] if facts else "ask the architecture"
        [[3, 1], 'F32']
    """
    key = _key(document)
    if key is None:
        return None
    try:
        facts = json.loads(read_capped(cache_folder() / "facts" / f"{key}.json", limit=_MAX_BYTES, what="cached facts"))
        if not isinstance(facts.get("state"), dict):
            return None
        for file, *identity in facts["modules"]:
            if _identity(file) != identity:
                return None
    except Exception:  # missing, damaged, a module gone: learned again
        return None
    return facts


def remember(document: dict[str, Any], state: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Keep what this process's code says `document`'s tensors are, for later processes; never
    fails.

    Example:
        >>> remember(config.to_dict(), {"fc.weight": ((3, 1), "F32"), "fc.bias": ((3,), "F32")})
    """
    from ..io.atomic import atomic_write, write_all

    key = _key(document)
    modules = _loaded_modules()
    if key is None or modules is None:
        return
    facts = {"modules": modules, "state": {name: [list(shape), dtype] for name, (shape, dtype) in state.items()}}
    try:
        with atomic_write(cache_folder() / "facts" / f"{key}.json", overwrite=True, durable=False) as fd:
            write_all(fd, json.dumps(facts, sort_keys=True).encode())
    except Exception:  # a read-only home, a full disk: the next verify learns it again
        pass


def _key(document: dict[str, Any]) -> str | None:
    """The config, the entry point that provides its architecture, and the Python that runs it;
    None when no one entry point provides it (registered in this process only)."""
    import hashlib  # here: inspect imports what imports this module, and needs no hash

    points = [point.value for point in installed_entry_points() if point.name == document.get("model_type")]
    if len(points) != 1:
        return None
    text = json.dumps([_VERSION, sys.version, points[0], document], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _identity(file: str) -> list[int]:
    found = os.stat(file)
    return [found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino]


def _loaded_modules() -> list[list] | None:
    """`[file, *identity]` of each module loaded in this process outside the standard library,
    sorted; None when one's file is gone or changed after this process started."""
    started = _process_start_ns()
    found: dict[str, list[int]] = {}
    for name, module in list(sys.modules.items()):
        try:
            file = module.__dict__.get("__file__")  # not getattr: a lazy module would import on it
        except AttributeError:
            continue
        if not isinstance(file, str) or name.partition(".")[0] in sys.stdlib_module_names:
            continue
        file = os.path.abspath(file)
        if file not in found:
            try:
                found[file] = _identity(file)
            except OSError:
                return None
            if found[file][2] >= started:
                return None
    return sorted([file, *identity] for file, identity in found.items())


def _process_start_ns() -> int:
    """When this process started, by the system clock: on Linux from /proc (the boot time in
    whole seconds, so never later than it did, plus the start since boot); elsewhere, when this
    module was imported (later, for the modules a program loaded before ckptfmt's)."""
    try:
        with open("/proc/self/stat") as file:
            ticks = int(file.read().rpartition(")")[2].split()[19])  # field 22, starttime
        with open("/proc/stat") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith("btime "))
        return boot * 10**9 + ticks * 10**9 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_NS
