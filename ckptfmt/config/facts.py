"""What an architecture says about a config, remembered between processes.

Checking a config against its architecture, and learning the tensors it gives, means importing
the architecture, and so torch (1.5 to 2.5 s): most of what `verify` of a small file costs, and
more than hashing a 1 GB file. The answer depends only on the config and on the architecture's
code, so it is kept in the user's cache folder, one small JSON file per (config, code), and a
later `verify` of a file of that architecture needs neither torch nor the architecture.

The code is told apart by the entry point that provides the architecture: its target, its
distribution's version, and the size and modification time of the module's file. An
architecture registered only in the running process (no entry point) is not remembered. A
cache that cannot be read or written is ignored: it only ever saves time.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..io.files import cache_folder

__all__ = ["recall", "remember"]

_VERSION = 1


def _code_identity(model_type: str) -> list | None:
    """The entry point's target and version, and its module file's size and mtime; None when
    the architecture has no entry point (registered in this process only)."""
    import importlib.util

    from .registry import _entry_points

    points = [ep for ep in _entry_points() if ep.name == model_type]
    if len(points) != 1:
        return None
    point = points[0]
    module = point.value.split(":", 1)[0]
    try:
        spec = importlib.util.find_spec(module)  # imports its parent packages, not the module
        status = os.stat(spec.origin) if spec is not None and spec.origin else None
    except (ImportError, ValueError, OSError):
        return None
    if status is None:
        return None
    return [point.value, getattr(point, "version", None), status.st_size, status.st_mtime_ns]


def _key(document: dict[str, Any]) -> str | None:
    import hashlib  # here: inspect imports this module and needs no hash

    identity = _code_identity(document.get("model_type", ""))
    if identity is None:
        return None
    text = json.dumps([_VERSION, identity, document], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def recall(document: dict[str, Any]) -> dict[str, Any] | None:
    """What was learned of this config document (as `ModelConfig.to_dict` gives it): `checked`,
    the complete config, and `state`, `{name: [shape, dtype]}`; or None."""
    from ..io.jsondoc import loads_strict

    key = _key(document)
    if key is None:
        return None
    try:
        facts = loads_strict((cache_folder() / "facts" / f"{key}.json").read_text(), what="cached facts")
    except Exception:  # missing, unreadable, damaged: learned again
        return None
    if not isinstance(facts, dict) or not isinstance(facts.get("state"), dict) or not isinstance(facts.get("checked"), dict):
        return None
    return facts


def remember(document: dict[str, Any], checked: dict[str, Any], state: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Keep what was learned of `document` for later processes; never fails."""
    from ..io.atomic import atomic_write, write_all

    key = _key(document)
    if key is None:
        return
    facts = {"checked": checked, "state": {name: [list(shape), dtype] for name, (shape, dtype) in state.items()}}
    try:
        with atomic_write(cache_folder() / "facts" / f"{key}.json", overwrite=True, durable=False) as fd:
            write_all(fd, json.dumps(facts, sort_keys=True).encode())
    except Exception:  # a read-only home, a full disk: the next verify learns it again
        pass
