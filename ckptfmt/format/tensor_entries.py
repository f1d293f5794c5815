"""The tensor entries of a .safetensors header and their rules, for the reader and the writer
alike: which dtypes there are and their sizes, what a tensor's name may be, and how shapes and
data offsets must tile the data section. Standard library only, like the header it serves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HeaderError
from ..io.jsondoc import has_surrogate, shown_text

__all__ = ["DTYPE_SIZES", "TensorInfo", "check_tensor_name", "check_tensors"]

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it. Offsets are relative to the data section, which
    starts at byte `base` of `file` (for a sharded checkpoint, the shard that holds it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: Path | None = None
    base: int = 0
    digest: str | None = None  # its own digest (hex, see digest.py) where the file records one

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def check_tensors(document: dict[str, Any], data_size: int, path: Path, data_start: int,
                  digests: dict[str, str]) -> dict[str, TensorInfo]:
    """The tensor entries of a file's header, checked: each name, dtype, shape and offsets, and
    the offsets together tiling the data section exactly (no overlap, no gap, no trailing bytes).

    Example:
        >>> check_tensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, path, 100, {})
        {'w': TensorInfo(name='w', dtype='F32', shape=(2,), start=0, end=8, ...)}
    """
    entries = []
    numbers: list = []  # every size and offset of every tensor, checked at once: thousands of tensors cost ~1 ms
    for name, entry in document.items():
        check_tensor_name(name, path)
        if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
            raise HeaderError(f"tensor {name!r} must have exactly dtype, shape and data_offsets", path=path)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
        if size is None:
            raise HeaderError(
                f"tensor {name!r} has unknown dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}", path=path
            )
        if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
            _refuse_numbers(name, shape, offsets, path)
        numbers += shape
        numbers += offsets
        entries.append((name, dtype, size, shape, offsets))
    if numbers and not (_INT_ONLY.issuperset(map(type, numbers)) and min(numbers) >= 0 and max(numbers) <= _MAX_SIZE):
        for name, _, _, shape, offsets in entries:
            _refuse_numbers(name, shape, offsets, path)
    infos = []
    for name, dtype, size, shape, (start, end) in entries:
        if start > end:
            _refuse_numbers(name, shape, [start, end], path)
        expected = math.prod(shape) * size
        if end - start != expected:
            raise HeaderError(
                f"tensor {name!r}: shape {list(shape)} of {dtype} needs {expected} bytes but its "
                f"data_offsets span {end - start}",
                path=path,
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), start, end, path, data_start, digests.get(name)))
    position = 0
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        if info.start != position:
            problem = "overlaps the tensor before it" if info.start < position else "leaves a gap"
            raise HeaderError(
                f"tensor {info.name!r} {problem} (starts at byte {info.start}, expected "
                f"{position}); the data offsets are corrupt",
                path=path,
            )
        position = info.end
    if position != data_size:
        problem = "trailing bytes after the last tensor" if position < data_size else "truncated"
        raise HeaderError(
            f"tensor data is {data_size} bytes but the header describes {position}: {problem}",
            path=path,
        )
    return {info.name: info for info in infos}


def check_tensor_name(name: str, path: Path | None) -> None:
    """The tensor-name rule, for the reader and the writer alike."""
    if not name or "\x00" in name:
        raise HeaderError(f"tensor {name!r}: tensor names must be non-empty and free of NUL", path=path)
    if has_surrogate(name):
        # Python's json reads and writes "\udc80"; safetensors refuses the whole header for it.
        raise HeaderError(
            f"tensor {shown_text(name)}: tensor names must be valid Unicode, and this one holds a lone surrogate, "
            "which safetensors refuses to read",
            path=path,
        )
    if name == "__metadata__":
        raise HeaderError("tensor '__metadata__': safetensors reserves that name for the metadata", path=path)


_MAX_SIZE = (1 << 63) - 1  # what a safetensors reader (Rust's u64/usize, torch's int64) can hold


def _sizes(values: list) -> bool:
    return all(type(v) is int for v in values) and (not values or 0 <= min(values) and max(values) <= _MAX_SIZE)


_INT_ONLY = frozenset({int})  # not bool, which is an int to isinstance


def _refuse_numbers(name: str, shape: Any, offsets: Any, path: Path) -> None:
    """The error for a tensor whose shape or data_offsets break the rules, if they do: each an
    int (not a bool), none negative or past int64, offsets two and in order."""
    if type(shape) is not list or not _sizes(shape):
        raise HeaderError(f"tensor {name!r} has an invalid shape {shape!r}", path=path)
    if type(offsets) is not list or len(offsets) != 2 or not _sizes(offsets) or offsets[0] > offsets[1]:
        raise HeaderError(f"tensor {name!r} has invalid data_offsets {offsets!r}", path=path)
