"""Reading legacy `.pth` checkpoints safely.

`torch.load` is always called with `weights_only=True` passed explicitly (which also beats the
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD environment variable), unless the caller asked for
`unsafe_pickle` by name. There is no silent retry. Whatever torch, zipfile or pickle raises
becomes a LegacyCheckpointError naming the file; a pickle that needs a global the weights-only
unpickler refuses becomes an UnsafePickleError naming that global.

The many layouts users have are unwrapped here: a bare state dict, or a dict holding it under
`state_dict`, `model_state_dict`, `model`, `net`, ... beside epoch, metrics and optimizer
state; `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes are stripped.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import logging
import math
import os
import re
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointNotFoundError, LegacyCheckpointError, UnsafePickleError

__all__ = ["LegacyCheckpoint", "read_legacy_checkpoint", "sha256_file"]

logger = logging.getLogger("ckptfmt")

STATE_DICT_KEYS = (
    "state_dict", "model_state_dict", "model", "net", "network", "model_state", "weights",
    "params", "module", "generator",
)
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim", "optimizer_state", "opt")
PREFIXES = ("module.", "_orig_mod.")
# torch writes its zip members stored, not compressed; a member that would inflate past this
# ratio is a zip bomb and is refused before torch inflates it.
MAX_INFLATE_RATIO = 100

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# Only `convert` takes --unsafe-pickle on the command line: a trusted pickle is converted once,
# and everything after works on the safe file.
_UNSAFE_FIX = "convert it with `ckptfmt convert --unsafe-pickle` (in Python: unsafe_pickle=True)"


@dataclass
class LegacyCheckpoint:
    """What a `.pth` file held, unwrapped: the state dict and everything beside it."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    serialization: str  # "torch zip" or "torch legacy (< 1.6)"
    sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    wrapper_key: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # keys that could not be carried over


def sha256_file(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = memoryview(bytearray(8 << 20))
        while got := f.readinto(buffer):
            sha.update(buffer[:got])
    return sha.hexdigest()


def read_legacy_checkpoint(
    path: str | os.PathLike, *, unsafe_pickle: bool = False, hash_source: bool = True
) -> LegacyCheckpoint:
    """Load a `.pth`/`.pt` file safely and unwrap its state dict.

    Args:
        path: the checkpoint written by `torch.save`.
        unsafe_pickle: allow arbitrary pickled objects. This runs code from the file: only
            for files you trust.
        hash_source: compute the file's sha256 (on a second core, while torch unpickles);
            without it `sha256` is empty.

    Raises:
        CheckpointNotFoundError, UnsafePickleError, LegacyCheckpointError.

    Example:
        >>> legacy = read_legacy_checkpoint("checkpoints/multitask_joint/best_model.pth")
        >>> legacy.training["epoch"]
        3
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise LegacyCheckpointError("is not a regular file", path=path)
        raise CheckpointNotFoundError("no such file", path=path)
    if path.stat().st_size == 0:
        raise LegacyCheckpointError("is empty (0 bytes); it is not a checkpoint", path=path)
    serialization = _check_container(path)

    # Hash on a second core while torch unpickles; hashlib releases the GIL on large buffers.
    with ThreadPoolExecutor(max_workers=1) as helper:
        digest = helper.submit(sha256_file, path) if hash_source else None
        obj = _torch_load(path, unsafe_pickle=unsafe_pickle)
    checkpoint = _unwrap(obj, path)
    checkpoint.serialization = serialization
    checkpoint.sha256 = digest.result() if digest else ""
    return checkpoint


def _check_container(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:1] == b"\x80":  # a pickle's PROTO opcode: torch's format before 1.6
        return "torch legacy (< 1.6)"
    if magic != b"PK\x03\x04":
        raise LegacyCheckpointError(
            f"is not a torch checkpoint: it starts with {magic!r}, neither a zip archive (torch "
            ">= 1.6) nor a pickle (older torch)",
            path=path,
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise LegacyCheckpointError(
            f"is a damaged zip archive ({exc}); it may be truncated. Re-copy it from its source",
            path=path,
        ) from None
    names = [m.filename for m in members]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise LegacyCheckpointError(
            "is a TorchScript archive (torch.jit.save), which holds code as well as weights. "
            "Load it where you trust it and torch.save(model.state_dict()) to convert that",
            path=path,
        )
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise LegacyCheckpointError(
            "is a zip archive but not a torch checkpoint (it has no data.pkl)", path=path
        )
    for member in members:
        if member.file_size > MAX_INFLATE_RATIO * max(member.compress_size, 1) + (1 << 20):
            raise LegacyCheckpointError(
                f"zip member {member.filename!r} would inflate from {member.compress_size} to "
                f"{member.file_size} bytes; refused as a zip bomb",
                path=path,
            )
    return "torch zip"


def _torch_load(path: Path, *, unsafe_pickle: bool) -> Any:
    if unsafe_pickle:
        logger.warning("%s: unpickling with weights_only=False (--unsafe-pickle): this can run code", path)
    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about any protocol but 2, then refuses or reads
            # the file anyway; either way the warning tells the user nothing they can act on.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            # Not mmap=True: it would skip torch's check that each storage fits its zip record.
            return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as exc:  # torch, zipfile and pickle raise anything; all become ours
        text = str(exc)
        found = _GLOBAL.search(text)
        if found and not unsafe_pickle:
            raise UnsafePickleError(
                f"refused to unpickle: it needs the global {_python3_name(found.group(1))}, which "
                "the safe (weights-only) loader does not allow because unpickling it can run code. "
                f"If you trust this file, {_UNSAFE_FIX}",
                path=path,
            ) from None
        if "Weights only load failed" in text:
            detail = re.search(r"Unsupported operand \d+|Trying to [^\n.]*", text)
            raise UnsafePickleError(
                "refused to unpickle: the safe (weights-only) loader cannot read it"
                f"{f' ({detail.group(0)})' if detail else ''}; it may be a plain pickle rather "
                f"than a torch.save file. If you trust this file, {_UNSAFE_FIX}",
                path=path,
            ) from None
        first_line = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LegacyCheckpointError(
            f"cannot be read as a torch checkpoint ({type(exc).__name__}: {first_line}); "
            "it is damaged, truncated or not a checkpoint",
            path=path,
        ) from None


def _python3_name(name: str) -> str:
    """The name as Python 3 resolves it: protocol-2 pickles spell `subprocess.call` as
    `commands.call` and torch prints builtins bare (`exec`)."""
    module, _, attribute = name.rpartition(".")
    if not module:
        return f"builtins.{attribute}"
    module, attribute = _compat_pickle.NAME_MAPPING.get((module, attribute), (module, attribute))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attribute}"


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _unwrap(obj: Any, path: Path) -> LegacyCheckpoint:
    if _is_state_dict(obj):
        state_dict, wrapper, rest = dict(obj), None, {}
    elif isinstance(obj, dict):
        candidates = [k for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))]
        if not candidates:
            candidates = [k for k, v in obj.items() if _is_state_dict(v)]
        if not candidates:
            keys = ", ".join(repr(k) for k in list(obj)[:10])
            raise LegacyCheckpointError(
                f"holds a dict with no state dict in it (keys: {keys}); expected tensors by name, "
                f"or under one of {', '.join(STATE_DICT_KEYS)}",
                path=path,
            )
        wrapper = candidates[0]
        state_dict = dict(obj[wrapper])
        rest = {k: v for k, v in obj.items() if k != wrapper}
    else:
        raise LegacyCheckpointError(
            f"holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead",
            path=path,
        )
    checkpoint = LegacyCheckpoint(path, state_dict, "", "", wrapper_key=wrapper)
    checkpoint.stripped_prefixes = _strip_prefixes(checkpoint.state_dict)
    for key, value in rest.items():
        if key in OPTIMIZER_KEYS and isinstance(value, dict) and checkpoint.optimizer_state is None:
            checkpoint.optimizer_state = value
            continue
        plain = _plain(value)
        if plain is _NOT_PLAIN:
            checkpoint.dropped.append(str(key))
        elif key == "epoch" or key == "metrics":
            checkpoint.training[key] = plain
        else:
            checkpoint.training.setdefault("extra", {})[str(key)] = plain
    return checkpoint


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> list[str]:
    stripped = []
    while state_dict:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            return stripped
        items = [(k[len(prefix):], v) for k, v in state_dict.items()]
        state_dict.clear()
        state_dict.update(items)
        stripped.append(prefix)
    return stripped


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """`value` as plain JSON data (0-d tensors become numbers), or _NOT_PLAIN."""
    if isinstance(value, torch.Tensor):
        return _plain(value.item()) if value.dim() == 0 else _NOT_PLAIN
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NOT_PLAIN
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else items
    if isinstance(value, dict):
        items = {str(k): _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items.values()) else items
    return _NOT_PLAIN

