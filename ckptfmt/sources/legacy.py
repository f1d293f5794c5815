"""Reading legacy `.pth`, `.pt` and Lightning `.ckpt` checkpoints safely.

`torch.load` is always called with `weights_only=True` passed explicitly (which also beats the
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD environment variable), unless the caller asked for
`unsafe_pickle` by name. There is no silent retry. The types training checkpoints commonly hold
beyond tensors (paths, `argparse.Namespace`, OmegaConf containers, Enum members, ...) are read
through the fixed, inert stand-ins of `standins`; no name read from a file is ever imported.
Whatever torch, zipfile or pickle raises becomes a LegacyCheckpointError naming the file; a
pickle that needs a global nothing stands in for becomes an UnsafePickleError naming it.

Only a regular file is opened (a FIFO or a device named `x.pth` is refused, not waited on),
and what was unpickled is bounded (its elements, its nesting, the bytes of its strings) before
anything walks it: a pickle's memo lets a 2 KB file describe 10^10 shared references (a
"billion laughs"), or a 2 MB file 200 GB of text, which cost nothing to unpickle and
everything to walk. Then `layouts` sorts what the file held into weights, config, training
record and companion.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import LegacyCheckpointError, Words
from ..io.background import helpers
from ..io.files import open_regular, sha256_fd
from .layouts import LegacyCheckpoint, unwrap
from .refusals import damaged, globals_named, missing_class, needs_global, unlisted_globals, unreadable
from .standins import Refused, contents, python3_name, stand_ins_for, thaw

__all__ = [
    "LEGACY_SUFFIXES", "LegacyCheckpoint", "check_bounds", "check_inflation", "file_identity", "read_legacy_checkpoint",
    "torch_serialization"]

logger = logging.getLogger("ckptfmt")

# What folder walks take for legacy checkpoints: torch.save's usual names, and Lightning's.
LEGACY_SUFFIXES = (".pth", ".pt", ".ckpt")
# torch writes its zip members stored, not compressed; a member that would inflate past this
# ratio is a zip bomb and is refused before torch inflates it.
MAX_INFLATE_RATIO = 100
# Bounds of the unpickled object graph, counting a shared reference once per place it is used:
# far above any real checkpoint (a state dict of 10,000 tensors with Adam's state is ~60,000),
# far below what a pickle built to multiply references makes.
MAX_ELEMENTS = 1_000_000
MAX_NESTING = 64
# Strings and bytes are leaves, but each becomes JSON (or is checked for it) once per place it
# is used: one 1 MiB string referenced 200,000 times is a 2 MB file and 200 GB of JSON. Their
# bytes are counted the same way, far above any real run's arguments, notes and vocabularies.
MAX_TEXT_BYTES = 64 << 20

_UNSAFE_LOAD = Words("unpickling with weights_only=False (unsafe_pickle=True): this can run code",
                     "unpickling with weights_only=False (--unsafe-pickle): this can run code")
# torch's allowlist of extra globals is one set for the whole process: one load with stand-ins
# at a time, so that one load's exit does not remove the stand-ins another is using.
_STAND_INS_IN_USE = threading.Lock()


def read_legacy_checkpoint(
    path: str | os.PathLike, *, unsafe_pickle: bool = False, hash_source: bool = True, mmap: bool = False,
) -> LegacyCheckpoint:
    """Load a `.pth`/`.pt`/`.ckpt` file safely and sort out what it holds.

    Args:
        path: the checkpoint written by `torch.save` (Lightning's included).
        unsafe_pickle: allow arbitrary pickled objects. This runs code from the file: only
            for files you trust.
        hash_source: compute the file's sha256 (on a second core, while torch unpickles);
            without it `sha256` is empty.
        mmap: map a zip file's tensors instead of reading them (`torch.load(mmap=True)`), each
            storage checked against its zip record first; `LegacyCheckpoint.file_offset` then
            says where each tensor's bytes lie.

    Raises:
        CheckpointNotFoundError, UnsafePickleError, LegacyCheckpointError.

    Example:
        >>> legacy = read_legacy_checkpoint("checkpoints/multitask_joint/best_model.pth")
        >>> legacy.training["epoch"], legacy.destinations["companion"]
        (3, ['optimizer_state_dict'])
    """
    path = Path(path)
    fd = open_regular(path, error=LegacyCheckpointError)
    identity = file_identity(fd)
    with open(fd, "rb") as f:
        if os.fstat(fd).st_size == 0:
            raise LegacyCheckpointError("is empty (0 bytes); it is not a checkpoint", path=path)
        serialization, records = _check_container(f, path)
        # A zip is mapped, not read: its tensors' bytes stay in the file until a writer copies
        # them from there, so memory does not grow with the file. Pre-1.6 pickles cannot be, nor
        # a zip whose tensor data is compressed (`records` is None): torch reads that as it is,
        # inflated into memory.
        mappable = mmap and serialization == "torch zip" and records is not None and not unsafe_pickle
        mapped_from = _same_file(fd, path) if mappable else None
        # Hash on a second core while torch unpickles; hashlib releases the GIL on large buffers.
        digest = helpers().submit(sha256_fd, fd) if hash_source else None
        try:
            obj, conversions, mapped = _load(f, path, serialization, unsafe_pickle=unsafe_pickle,
                                             mapped_from=mapped_from, records=records)
        finally:
            sha256 = digest.result() if digest else ""  # before the descriptor it reads is closed
    checkpoint = unwrap(obj, path, conversions=conversions)
    checkpoint.serialization, checkpoint.sha256, checkpoint.mapped = serialization, sha256, mapped
    checkpoint.identity = identity
    return checkpoint


def file_identity(fd: int) -> tuple[int, int, int, int]:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _same_file(fd: int, path: Path) -> str:
    """A name for the very file `fd` holds open, for torch.load's mmap (which takes a name):
    the one checked to be a regular file, whatever happens to `path` meanwhile."""
    alias = f"/proc/self/fd/{fd}"
    return alias if os.path.exists(alias) else str(path)


def torch_serialization(path: str | os.PathLike) -> str:
    """What kind of torch file `path` is ("torch zip" or "torch legacy (< 1.6)"), from its first
    bytes and its zip directory alone; anything else is a LegacyCheckpointError saying what it is."""
    path = Path(path)
    with open(open_regular(path, error=LegacyCheckpointError), "rb") as f:
        return _check_container(f, path)[0]


def _check_container(f: BinaryIO, path: Path) -> tuple[str, dict[int, int] | None]:
    """The serialization, and for a zip the offset and size of each stored data record; None
    when a data record is compressed (torch writes them stored, but reads deflated ones too), so
    the tensors cannot be mapped from the file."""
    magic = f.read(4)
    f.seek(0)
    if magic[:1] == b"\x80":  # a pickle's PROTO opcode: torch's format before 1.6
        return "torch legacy (< 1.6)", {}
    if magic != b"PK\x03\x04":
        raise LegacyCheckpointError(
            f"is not a torch checkpoint: it starts with {magic!r}, neither a zip archive (torch "
            ">= 1.6) nor a pickle (older torch)",
            path=path,
        )
    try:
        with zipfile.ZipFile(f) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise LegacyCheckpointError(
            f"is a damaged zip archive ({exc}); it may be truncated. Re-copy it from its source",
            path=path,
        ) from None
    finally:
        f.seek(0)
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
    check_inflation(members, path)
    if any("/data/" in member.filename and member.compress_type != zipfile.ZIP_STORED for member in members):
        return "torch zip", None
    return "torch zip", _data_records(f, members, path)


def check_inflation(members: list[zipfile.ZipInfo], path: Path) -> None:
    """Refuse a zip member that would inflate past MAX_INFLATE_RATIO times its compressed size
    (plus 1 MiB), from the zip directory alone: before torch inflates anything.

    Example:
        >>> check_inflation(zipfile.ZipFile("checkpoints/multitask_joint/best_model.pth").infolist(), Path("m.pth"))
    """
    for member in members:
        if member.file_size > MAX_INFLATE_RATIO * max(member.compress_size, 1) + (1 << 20):
            raise LegacyCheckpointError(
                f"zip member {member.filename!r} would inflate from {member.compress_size} to "
                f"{member.file_size} bytes; refused as a zip bomb",
                path=path,
            )


def _data_records(f: BinaryIO, members: list[zipfile.ZipInfo], path: Path) -> dict[int, int]:
    """`{offset of its bytes in the file: size}` of each stored tensor-data record, read from the
    zip's local headers (torch pads them, so the central directory alone does not say)."""
    records = {}
    size = os.fstat(f.fileno()).st_size
    for member in members:
        if "/data/" not in member.filename:
            continue
        local = os.pread(f.fileno(), 30, member.header_offset)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise LegacyCheckpointError(
                f"zip member {member.filename!r} has no local header where the directory says; the file is damaged",
                path=path,
            )
        start = member.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        if start + member.file_size > size:
            raise LegacyCheckpointError(
                f"zip member {member.filename!r} runs past the end of the file; it is truncated", path=path
            )
        records[start] = member.file_size
    return records


def _load(
    f: BinaryIO, path: Path, serialization: str, *, unsafe_pickle: bool, mapped_from: str | None = None,
    records: dict[int, int] | None = None,
) -> tuple[Any, list[str], dict[int, int]]:
    """What the file holds, bounded, with stand-ins turned into plain values; the list of those
    conversions; and, when it was mapped, where each storage's bytes lie."""
    conversions: list[str] = []
    source = mapped_from or f
    stand_ins: list = []
    if unsafe_pickle:
        logger.warning(f"{path}: " + _UNSAFE_LOAD)
        try:
            obj = _torch_load(source, path, unsafe_pickle=True, passing=(AttributeError, ImportError))
        except (AttributeError, ImportError) as exc:  # the full unpickler looked up a class
            raise missing_class(exc, globals_named(f, serialization), path) from None
    else:
        obj, stand_ins = _load_weights_only(f, source, path, serialization)
    check_bounds(obj, path)
    # mmap=True skips torch's check that each storage fits its zip record; this is that check,
    # made before anything reads a tensor's data.
    mapped = _check_records(obj, records or {}, path) if mapped_from else {}
    if not unsafe_pickle and not stand_ins:
        return obj, conversions, mapped  # only what torch's allowlist holds: nothing to thaw
    try:
        return thaw(obj, where="", conversions=conversions), conversions, mapped
    except Refused as refused:
        raise needs_global(refused.global_name, path) from None


def _load_weights_only(f: BinaryIO, source: BinaryIO | str, path: Path, serialization: str) -> tuple[Any, list]:
    """torch.load with weights_only=True, and, where the file needs more than torch's allowlist,
    the stand-ins that read it."""
    refusal = (pickle.UnpicklingError,)  # what torch's weights-only unpickler raises, and only it
    try:
        return _torch_load(source, path, unsafe_pickle=False, passing=refusal), []
    except pickle.UnpicklingError as exc:
        # Something beyond the allowlist: the pickle is scanned for the globals it names (only
        # now, most files need none). One that no stand-in reads is refused by name; for the
        # others the file is loaded again with the stand-ins, which never import or run anything.
        unlisted = unlisted_globals(f, serialization)
        stand_ins = stand_ins_for(unlisted)
        covered = {name for _, name in stand_ins}
        refused = [name for name in unlisted if name not in covered]
        if refused:
            raise needs_global(python3_name(refused[0]), path) from None
        if not stand_ins:
            raise unreadable(exc, path) from None
    with _STAND_INS_IN_USE, torch.serialization.safe_globals(stand_ins):
        try:
            return _torch_load(source, path, unsafe_pickle=False, passing=refusal), stand_ins
        except pickle.UnpicklingError as exc:
            raise unreadable(exc, path) from None


def _check_records(obj: Any, records: dict[int, int], path: Path) -> dict[int, int]:
    """Each mapped storage against the zip records: `{data pointer: file offset}`, or our error
    when a storage is not exactly one stored record (a truncated or lying file)."""
    storages: dict[int, int] = {}
    pending = [obj]
    while pending:  # bounded: check_bounds has walked this graph already
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            if value.is_meta or value.layout != torch.strided:
                continue  # no data in the file (refused by name when the state dict is sorted out)
            storage = value.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, Mapping):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend(value)
        else:
            items = contents(value)
            pending.extend(items or ())
    if not storages:
        return {}
    first = min(storages)
    for offset in sorted(records):
        base = first - offset
        if all(records.get(pointer - base) == nbytes for pointer, nbytes in storages.items()):
            return {pointer: pointer - base for pointer in storages}
    raise LegacyCheckpointError(
        "has a storage that is not exactly one of its zip records (its declared size does not fit the "
        "data stored for it); it is damaged, truncated or not a checkpoint",
        path=path,
    )


def _torch_load(source: BinaryIO | str, path: Path, *, unsafe_pickle: bool, passing: tuple[type, ...] = ()) -> Any:
    """torch.load of a file object, or memory-mapped of a name (see `_check_records`). What it
    raises becomes our LegacyCheckpointError, except the `passing` kinds, which the caller reads."""
    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about any protocol but 2, then refuses or reads
            # the file anyway; either way the warning tells the user nothing they can act on.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return torch.load(source, map_location="cpu", weights_only=not unsafe_pickle,
                              mmap=isinstance(source, str))
    except passing:
        raise
    except Exception as exc:  # torch, zipfile and pickle raise anything; all become ours
        raise damaged(exc, path) from None


def check_bounds(obj: Any, path: Path) -> None:
    """Refuse a graph with more than MAX_ELEMENTS elements, more than MAX_TEXT_BYTES of strings
    and bytes, or deeper than MAX_NESTING, walking it as the code after will (a shared reference
    counts at every place it is used), and stopping as soon as a bound is passed: time and
    memory stay bounded whatever the memo multiplies."""
    remaining = MAX_ELEMENTS
    text = MAX_TEXT_BYTES
    utf8: dict[int, int] = {}  # a shared string is encoded once, however often it is counted
    pending = [(obj, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (str, bytes, bytearray)):
            if isinstance(value, str) and not value.isascii():
                size = utf8.get(id(value))
                if size is None:
                    size = utf8[id(value)] = len(value.encode("utf-8", "surrogatepass"))
            else:
                size = len(value)
            text -= size
            if text < 0:
                raise LegacyCheckpointError(
                    f"holds more than {MAX_TEXT_BYTES >> 20} MiB of strings and bytes, counting each shared reference "
                    "where it is used: a pickle built to multiply a string, refused before it is turned into JSON",
                    path=path,
                )
            continue
        if type(value).__module__.split(".", 1)[0] == "omegaconf":
            continue  # an unsafe load's real container: walking it would resolve its interpolations
        if isinstance(value, Mapping):
            count, items = 2 * len(value), None
        elif isinstance(value, (list, tuple, set, frozenset)):
            count, items = len(value), value
        else:
            items = contents(value)
            if items is None:
                continue
            count = len(items)
        remaining -= count
        if remaining < 0:
            raise LegacyCheckpointError(
                f"holds more than {MAX_ELEMENTS:,} objects, counting each shared reference where it is used: "
                "a pickle built to multiply references (a \"billion laughs\"), refused before it is walked",
                path=path,
            )
        if depth >= MAX_NESTING and count:
            raise LegacyCheckpointError(
                f"nests containers deeper than {MAX_NESTING} levels (or in a cycle); no checkpoint does: refused",
                path=path,
            )
        if items is None:
            items = [*value.keys(), *value.values()]
        pending.extend((item, depth + 1) for item in items)
