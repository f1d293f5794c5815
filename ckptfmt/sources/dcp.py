"""Reading a torch.distributed.checkpoint (DCP) folder, `.metadata` + `*.distcp`, without
running code from it, for `convert`.

DCP's `.metadata` is a pickle, and torch's own ways of opening a folder run whatever it holds:
`FileSystemReader.read_metadata` calls plain `pickle.load`, and every non-tensor value goes
through `torch.load(weights_only=False)` (`DefaultLoadPlanner.load_bytes`, `dcp_to_torch_save`,
`torch_save_to_dcp`, `BroadcastingTorchSaveReader`). None of them is used here:

- `.metadata` is unpickled with an allow-list: DCP's metadata classes, torch.Size, dtypes,
  layouts, paths and OrderedDict. Any other global (`os.system`, ...) is refused by name
  before anything is called; so is a persistent id.
- What it unpickled is checked before it is used: exact types; each tensor's chunks are boxes
  inside it that tile it exactly; each stored item names a plain file in the folder (no `../`,
  no separator), a regular file, and a byte range inside it; stream transforms (compression),
  which this reader does not undo, are refused. No two storage records share a byte or a
  place, and each chunk needs a record of its own: a pickle can refer to one record many times
  at no cost. A tensor is only allocated once its stored chunks are known to hold at least its
  bytes, so memory is bounded by the files' real size, not by what the metadata declares.
- Each tensor chunk and each non-tensor value is a `torch.save` blob, read with
  `torch.load(weights_only=True)`.

The flat keys DCP stores (`model.conv.weight`, `optim.param_groups.0.lr`) are put back in
their nested places with the paths DCP records, bounded and checked (see `keypaths`), and what
the folder held is then sorted into weights, training record and companion exactly as a legacy
`.pth` is (see `layouts`).
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import CkptfmtError, LegacyCheckpointError, UnsafePickleError
from ..io.files import file_in_folder, files_sha256, open_regular, read_capped
from .keypaths import check_key_paths, crafted, nest

__all__ = [
    "DCP_METADATA",
    "SERIALIZATION",
    "dcp_folder_sha256",
    "is_dcp_folder",
    "read_dcp_checkpoint",
    "read_dcp_metadata",
    "read_dcp_state_dict",
]

DCP_METADATA = ".metadata"
SERIALIZATION = "torch.distributed.checkpoint"
# A .metadata holds one record per tensor chunk: a few MB for a large model saved on many ranks.
MAX_METADATA_BYTES = 1 << 30


def is_dcp_folder(path: str | os.PathLike) -> bool:
    """True for a folder that holds a DCP checkpoint (its `.metadata` file)."""
    path = Path(path)
    try:
        return path.is_dir() and (path / DCP_METADATA).is_file()
    except OSError:
        return False  # it cannot even be looked at: reading it says why, by name


def dcp_folder_sha256(folder: str | os.PathLike) -> str:
    """The source digest of a DCP folder, as provenance records it: SHA-256 over its
    `.metadata` and `*.distcp` files in name order, each as the JSON record `[name, size]`, a
    newline, and its bytes.

    Example:
        >>> dcp_folder_sha256("runs/step_1000")  # doctest: +SKIP
        '5d41402a...'
    """
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name == DCP_METADATA or p.name.endswith(".distcp"))
    return files_sha256([folder / name for name in names], error=LegacyCheckpointError)


def _allowed() -> dict[tuple[str, str], Any]:
    import torch
    from torch.distributed.checkpoint import metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo  # what .metadata names, private or not

    allowed: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
        for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "MetadataIndex", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    # torch pickles a layout as a call of this with its name; it looks the name up, nothing more.
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    # StorageMeta.checkpoint_id: a path is data.
    allowed.update({("pathlib", name): getattr(pathlib, name)
                    for name in ("Path", "PosixPath", "PurePath", "PurePosixPath", "PureWindowsPath", "WindowsPath")})
    allowed[("collections", "OrderedDict")] = OrderedDict
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self._allowed = _allowed()
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"needs the global {module}.{name}, which a DCP .metadata never holds (only DCP's metadata "
                "classes, torch.Size, dtypes and paths); refused without running it. The folder was crafted "
                "or damaged; re-save it with torch.distributed.checkpoint",
                path=self._path,
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("uses a persistent id, which a DCP .metadata never does; refused", path=self._path)


def read_dcp_metadata(folder: str | os.PathLike) -> Any:
    """A DCP folder's `.metadata`, unpickled with an allow-list and checked (see the module).

    Returns:
        torch.distributed.checkpoint.metadata.Metadata.

    Raises:
        UnsafePickleError: it needs a global outside the allow-list (named).
        LegacyCheckpointError: it is malformed, or names a file outside the folder or a byte
            range outside its file.

    Example:
        >>> metadata = read_dcp_metadata("runs/step_1000")
        >>> metadata.state_dict_metadata["model.fc.weight"].size
        torch.Size([10, 256])
    """
    folder = Path(folder)
    path = folder / DCP_METADATA
    raw = read_capped(path, limit=MAX_METADATA_BYTES, what="a DCP .metadata", error=LegacyCheckpointError)
    try:
        metadata = _RestrictedUnpickler(raw, path).load()
    except CkptfmtError:
        raise
    except Exception as exc:  # a truncated or malformed pickle, or a class refusing its state
        raise LegacyCheckpointError(
            f"is not a readable DCP metadata pickle ({type(exc).__name__}: {str(exc)[:200]}); it is damaged",
            path=path,
        ) from None
    _check_metadata(metadata, folder, path)
    return metadata


def _check_metadata(metadata: Any, folder: Path, path: Path) -> None:
    """What `.metadata` unpickled, checked before anything uses it: DCP's own types exactly, each
    stored item a byte range inside a regular file of the folder, each tensor tiled exactly once
    by chunks whose stored bytes can hold them."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    if type(metadata) is not Metadata:
        raise crafted(f"holds a {type(metadata).__name__}, not DCP's Metadata", path)
    entries = metadata.state_dict_metadata
    if type(entries) is not dict or not all(type(key) is str for key in entries):
        raise crafted("state_dict_metadata is not a dict keyed by name", path)
    storage = metadata.storage_data
    if type(storage) is not dict:
        raise crafted("storage_data is not a dict", path)
    items = _stored_items(storage, folder, path)
    chunks = 0
    for fqn, entry in entries.items():
        if type(entry) is BytesStorageMetadata:
            if (fqn, None) not in items:
                raise crafted(f"value {fqn!r} has no stored bytes", path)
            continue
        size = _tensor_size(fqn, entry, path)
        # Counted before the chunks are walked: a pickle can make one list of chunks many times,
        # but each chunk needs a storage record (and bytes) of its own.
        chunks += len(entry.chunks)
        if chunks > len(items):
            raise crafted(f"describes more tensor chunks than it has storage records ({len(items):,})", path)
        _check_chunks(fqn, entry, size, items, path)
    check_key_paths(metadata.planner_data, path)


def _sizes(value: Any, where: str, path: Path) -> tuple[int, ...]:
    """`value` as a tuple, when it is a torch.Size of non-negative ints."""
    import torch

    if type(value) is not torch.Size or not all(type(v) is int and v >= 0 for v in value):
        raise crafted(f"{where} is not a size (non-negative ints): {str(value)[:100]}", path)
    return tuple(value)


def _stored_items(storage: dict, folder: Path, path: Path) -> dict[tuple[str, tuple[int, ...] | None], Any]:
    """The storage records by (name, chunk offset; None for a non-tensor value), each checked to
    be an untransformed byte range inside a regular file of the folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    files: dict[str, int] = {}
    items: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise crafted(f"storage_data maps a {type(index).__name__} to a {type(info).__name__}", path)
        name = file_in_folder(folder, info.relative_path, key=f"the file of {index.fqn!r}", path=path,
                              error=LegacyCheckpointError).name
        if name not in files:
            fd = open_regular(folder / name, error=LegacyCheckpointError)
            files[name] = os.fstat(fd).st_size
            os.close(fd)
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0 \
                or info.offset + info.length > files[name]:
            raise crafted(f"{index.fqn!r} is stored at bytes {info.offset}+{info.length}, outside {name} "
                          f"({files[name]} bytes)", path)
        if info.transform_descriptors:
            raise LegacyCheckpointError(
                f"{index.fqn!r} is stored through {list(info.transform_descriptors)[:3]} (a compressed or "
                "transformed stream), which ckptfmt does not read; re-save it without stream transforms",
                path=path,
            )
        offset = None if index.offset is None else _sizes(index.offset, f"the offset of {index.fqn!r}", path)
        if (index.fqn, offset) in items:
            raise crafted(f"storage_data holds two records for {_place_name(index.fqn, offset)}", path)
        items[(index.fqn, offset)] = info
    _check_disjoint(items, path)
    return items


def _check_disjoint(items: dict[tuple[str, tuple[int, ...] | None], Any], path: Path) -> None:
    """No two storage records share a byte: each item DCP writes has bytes of its own, and a
    record reused for many tensors would make a small folder fill memory many times over."""
    spans = sorted((info.relative_path, info.offset, info.length, fqn, offset)
                   for (fqn, offset), info in items.items() if info.length)
    for (name, start, length, fqn, offset), (other_name, other_start, _, other, other_offset) in zip(spans, spans[1:]):
        if name == other_name and other_start < start + length:
            raise crafted(f"{_place_name(fqn, offset)} and {_place_name(other, other_offset)} are stored in the "
                          f"same bytes of {name} (from byte {other_start}); each stored item has bytes of its own",
                          path)


def _place_name(fqn: str, offset: tuple[int, ...] | None) -> str:
    return repr(fqn) if offset is None else f"the chunk of {fqn!r} at {list(offset)}"


def _tensor_size(fqn: str, entry: Any, path: Path) -> tuple[int, ...]:
    """The size of the tensor `entry` describes, once its record's types and dtype are checked."""
    from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

    from ..format.writer import DTYPE_NAMES

    if type(entry) is not TensorStorageMetadata or type(entry.properties) is not TensorProperties:
        raise crafted(f"entry {fqn!r} is a {type(entry).__name__}", path)
    if entry.properties.dtype not in DTYPE_NAMES:
        raise crafted(f"tensor {fqn!r} has dtype {entry.properties.dtype}, which safetensors cannot store", path)
    size = _sizes(entry.size, f"the size of {fqn!r}", path)
    if type(entry.chunks) is not list:
        raise crafted(f"the chunks of {fqn!r} are not a list", path)
    return size


def _check_chunks(fqn: str, entry: Any, size: tuple[int, ...], items: dict, path: Path) -> None:
    """Each chunk of a tensor a box inside it with stored bytes enough for it, and the boxes
    covering the tensor exactly once."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    boxes, seen = [], set()
    itemsize = torch.empty((), dtype=entry.properties.dtype).element_size()
    for chunk in entry.chunks:
        if type(chunk) is not ChunkStorageMetadata:
            raise crafted(f"a chunk of {fqn!r} is a {type(chunk).__name__}", path)
        offsets = _sizes(chunk.offsets, f"a chunk offset of {fqn!r}", path)
        sizes = _sizes(chunk.sizes, f"a chunk size of {fqn!r}", path)
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + s > n for o, s, n in zip(offsets, sizes, size)):
            raise crafted(f"a chunk of {fqn!r} at {list(offsets)} of size {list(sizes)} is outside its size "
                          f"{list(size)}", path)
        if offsets in seen:
            raise crafted(f"{fqn!r} has two chunks at {list(offsets)}", path)
        seen.add(offsets)
        info = items.get((fqn, offsets))
        if info is None:
            raise crafted(f"the chunk of {fqn!r} at {list(offsets)} has no stored bytes", path)
        if info.length < math.prod(sizes) * itemsize:
            raise crafted(f"the chunk of {fqn!r} at {list(offsets)} needs {math.prod(sizes) * itemsize} bytes but "
                          f"its record holds {info.length}", path)
        boxes.append((offsets, sizes))
    if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(size) or _overlap(boxes):
        raise crafted(f"the chunks of {fqn!r} do not cover it exactly once", path)


def _overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether any two boxes share an element: a sweep along the dimension with the most
    distinct starts, so chunks cut along one dimension (as DCP's are) cost a sort."""
    boxes = [box for box in boxes if all(box[1])]
    if len(boxes) < 2:
        return False
    sweep = max(range(len(boxes[0][0])), key=lambda d: len({o[d] for o, _ in boxes}))
    boxes.sort(key=lambda box: box[0][sweep])
    for i, (offsets, sizes) in enumerate(boxes):
        for other, other_sizes in boxes[i + 1:]:
            if other[sweep] >= offsets[sweep] + sizes[sweep]:
                break
            if all(o < p + q and p < o + s for o, s, p, q in zip(offsets, sizes, other, other_sizes)):
                return True
    return False


def read_dcp_state_dict(folder: str | os.PathLike) -> dict[str, Any]:
    """Everything a DCP folder holds, nested as it was saved: full tensors (the chunks of every
    rank put together) and non-tensor values as plain data.

    Example:
        >>> saved = read_dcp_state_dict("runs/step_1000")   # dcp.save({"model": ..., "optim": ...})
        >>> saved["model"]["fc.weight"].shape, saved["optim"]["param_groups"][0]["lr"]
        (torch.Size([10, 256]), 0.001)
    """
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    metadata = read_dcp_metadata(folder)
    path = folder / DCP_METADATA
    stored = {(index.fqn, None if index.offset is None else tuple(index.offset)): info
              for index, info in metadata.storage_data.items()}
    descriptors: dict[str, int] = {}
    flat: dict[str, Any] = {}
    try:
        for fqn, entry in metadata.state_dict_metadata.items():
            if type(entry) is not TensorStorageMetadata:
                flat[fqn] = _load_blob(_read(descriptors, folder, stored[(fqn, None)]), fqn, path, tensor=False)
                continue
            tensor = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                piece = _load_blob(_read(descriptors, folder, stored[(fqn, offsets)]), fqn, path, tensor=True)
                if tuple(piece.shape) != sizes or piece.dtype != tensor.dtype:
                    raise LegacyCheckpointError(
                        f"the chunk of {fqn!r} at {list(offsets)} holds a {piece.dtype} tensor of shape "
                        f"{list(piece.shape)}, not the {tensor.dtype} {list(sizes)} its metadata says; it is damaged",
                        path=path,
                    )
                tensor[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = piece
            flat[fqn] = tensor
    finally:
        for fd in descriptors.values():
            os.close(fd)
    return nest(flat, metadata.planner_data or {}, path)


def _read(descriptors: dict[str, int], folder: Path, info: Any) -> bytes:
    name = info.relative_path
    if name not in descriptors:
        descriptors[name] = open_regular(folder / name, error=LegacyCheckpointError)
    data = os.pread(descriptors[name], info.length, info.offset)
    if len(data) != info.length:
        raise LegacyCheckpointError(f"ends inside a stored item (at byte {info.offset}); it was truncated",
                                    path=folder / name)
    return data


def _load_blob(data: bytes, fqn: str, path: Path, *, tensor: bool) -> Any:
    import torch

    from .legacy import check_bounds, check_inflation  # a legacy file's bounds, for each blob

    if data[:4] == b"PK\x03\x04":  # a zip, as torch.save writes: its members may not inflate past their bytes
        try:
            check_inflation(zipfile.ZipFile(io.BytesIO(data)).infolist(), path)
        except LegacyCheckpointError as exc:
            raise exc.at(problem=f"the stored bytes of {fqn!r}: {exc.problem}") from None
        except (zipfile.BadZipFile, ValueError, EOFError):
            pass  # not a readable zip: torch.load says so below, as for any damaged blob
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UnsafePickleError(
            f"value {fqn!r} is a pickle that torch's weights-only loader refuses ({detail}); refused without "
            "running it",
            path=path,
        ) from None
    except Exception as exc:
        raise LegacyCheckpointError(
            f"the stored bytes of {fqn!r} are not a torch.save blob ({type(exc).__name__}: {str(exc)[:200]}); "
            "the folder is damaged, or was saved in a format other than DCP's default (torch.save)",
            path=path,
        ) from None
    if tensor and not isinstance(value, torch.Tensor):
        raise LegacyCheckpointError(f"the stored chunk of {fqn!r} is a {type(value).__name__}, not a tensor", path=path)
    if not tensor:
        check_bounds(value, path)
    return value


def read_dcp_checkpoint(folder: str | os.PathLike, *, hash_source: bool = True) -> Any:
    """A DCP folder, read safely and sorted as `convert` sorts a legacy file: the state dict
    (under `model`, `state_dict` or another of `layouts.STATE_DICT_KEYS`, or the whole of it),
    training record, companion (an optimizer state saved beside it, with torch's
    `get_state_dict`, keyed by parameter name).

    Returns:
        A `layouts.LegacyCheckpoint` whose serialization is "torch.distributed.checkpoint".

    Example:
        >>> checkpoint = read_dcp_checkpoint("runs/step_1000")
        >>> checkpoint.destinations
        {'weights': ['model'], 'companion': ['optim'], 'training': ['extra']}
    """
    from .layouts import unwrap

    folder = Path(folder)
    checkpoint = unwrap(read_dcp_state_dict(folder), folder)
    checkpoint.serialization = SERIALIZATION
    checkpoint.sha256 = dcp_folder_sha256(folder) if hash_source else ""
    return checkpoint
