"""Tensors in and out of .safetensors files, with torch.

The writer is our own rather than `safetensors.torch.save_file`, for three reasons: it writes
through `atomic_write` (temp file, fsync, rename, mode from the umask, where save_file writes
0600 in place); it streams each tensor's bytes straight from memory, where save_file first
copies every tensor into a bytes object (twice the memory for a 1 GB checkpoint); and it
stores tied tensors once, recording the ties in `ckptfmt.aliases`, where save_file refuses
them. The output is a plain safetensors file that `safetensors.torch.load_file` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write, write_all
from .digest import WeightsHasher
from .errors import HeaderError, IntegrityError
from .header import DTYPE_SIZES, KEY_ALIASES, KEY_WEIGHTS_SHA256, Header, read_header

__all__ = [
    "DTYPE_NAMES",
    "load_tensors",
    "split_aliases",
    "tensor_bytes",
    "weights_digest",
    "write_safetensors",
]

DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.int64: "I64", torch.uint64: "U64", torch.float64: "F64", torch.complex64: "C64",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def dtype_name(tensor: torch.Tensor, name: str) -> str:
    try:
        return DTYPE_NAMES[tensor.dtype]
    except KeyError:
        raise HeaderError(
            f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store; "
            f"cast it to one of {', '.join(str(d) for d in DTYPE_NAMES)}"
        ) from None


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes, C order, as a uint8 array (a view when already contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def split_aliases(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Separate tied tensors: views of the same memory with the same layout are stored once.

    Returns the tensors to store and `{alias: stored name}`; the stored name of a tie group is
    its first name in sorted order, so the split is the same whatever the dict's order.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise HeaderError(
                f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor; "
                "only tensors can be stored as weights"
            )
        key = None
        if tensor.numel() > 0 and tensor.device.type != "meta":
            key = (
                tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype, tensor.device,
            )
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            if key is not None:
                seen[key] = name
            stored[name] = tensor
    return stored, aliases


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The canonical digest (`ckptfmt.weights_sha256`) of a state dict held in memory.

    Example:
        >>> weights_digest(model.state_dict()) == read_header(path).weights_sha256
        True
    """
    hasher = WeightsHasher()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        data = tensor_bytes(tensor)
        hasher.begin(name, dtype_name(tensor, name), tuple(tensor.shape), data.nbytes)
        hasher.update(data)
    return hasher.hexdigest()


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
    *, overwrite: bool = False,
) -> str:
    """Write a safetensors file atomically, streaming tensor bytes from memory, and check it.

    The canonical weights digest is computed on a second core while the data is written, and
    recorded in `ckptfmt.weights_sha256` (unless `metadata` already sets it). The file is then
    fsynced on one core while the other reads it back and compares it with the tensors byte for
    byte; only a file that matches takes its name. Tied tensors (see `split_aliases`) are stored
    once and listed in `ckptfmt.aliases`. Tensors are laid out by decreasing item size, then
    name, so each starts aligned to its item size.

    Returns:
        The canonical weights digest.

    Raises:
        IntegrityError: what was read back differs from the tensors (failing disk or memory).
        OutputExistsError, WriteError: see `atomic_write`.
    """
    path = Path(path)
    stored, aliases = split_aliases(tensors)
    metadata = dict(metadata)
    if aliases:
        metadata[KEY_ALIASES] = json.dumps(aliases, sort_keys=True)
    record_digest = KEY_WEIGHTS_SHA256 not in metadata
    if record_digest:
        metadata[KEY_WEIGHTS_SHA256] = _DIGEST_PLACEHOLDER
    order = sorted(stored, key=lambda n: (-DTYPE_SIZES[dtype_name(stored[n], n)], n))
    data = {name: tensor_bytes(stored[name]) for name in order}
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        header[name] = {
            "dtype": dtype_name(stored[name], name),
            "shape": list(stored[name].shape),
            "data_offsets": [offset, offset + data[name].nbytes],
        }
        offset += data[name].nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
    data_start = 8 + len(encoded)
    with ThreadPoolExecutor(max_workers=2) as helper:
        digest = helper.submit(weights_digest, tensors)
        with atomic_write(path, overwrite=overwrite) as fd:
            write_all(fd, len(encoded).to_bytes(8, "little") + encoded)
            # fsync as we go, so the disk works while we write rather than all at the end.
            flushing, unflushed = None, 0
            for name in order:
                write_all(fd, data[name])
                unflushed += data[name].nbytes
                if unflushed >= _FLUSH_EVERY and (flushing is None or flushing.done()):
                    flushing, unflushed = helper.submit(os.fsync, fd), 0
            if flushing is not None:
                flushing.result()
            if record_digest:
                placeholder = f'"{KEY_WEIGHTS_SHA256}":"{_DIGEST_PLACEHOLDER}"'.encode()
                at = 8 + encoded.index(placeholder) + len(placeholder) - len(_DIGEST_PLACEHOLDER) - 1
                os.pwrite(fd, digest.result().encode(), at)
            synced = helper.submit(os.fsync, fd)
            _compare_written(fd, path, data_start, [data[name] for name in order])
            synced.result()
    return digest.result()


_DIGEST_PLACEHOLDER = "0" * 64
_FLUSH_EVERY = 64 << 20
_COMPARE_CHUNK = 8 << 20


def _compare_written(fd: int, path: Path, position: int, chunks: list[np.ndarray]) -> None:
    """Read the data section back and compare it with what was meant to be written."""
    buffer = np.empty(_COMPARE_CHUNK, dtype=np.uint8)
    for expected in chunks:
        done = 0
        while done < expected.nbytes:
            want = min(_COMPARE_CHUNK, expected.nbytes - done)
            got = os.preadv(fd, [memoryview(buffer)[:want]], position)
            if got != want or not np.array_equal(buffer[:want], expected[done:done + want]):
                raise IntegrityError(
                    f"reading back the written data at byte {position} gave other bytes than the "
                    "tensors; nothing was replaced. Check the disk and retry",
                    path=path,
                )
            done += want
            position += want


def load_tensors(header: Header, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a file as a state dict, ties restored as shared tensors.

    On the CPU the tensors are views into a memory map of the file: nothing is copied until
    written to, so loading costs one copy of the weights at most.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(header.path, framework="pt", device=str(device)) as f:
            state_dict = {name: f.get_tensor(name) for name in header.tensors}
    except (SafetensorError, RuntimeError, OSError) as exc:
        # read_header has already applied stricter rules; this is the file changing under us.
        raise HeaderError(f"safetensors cannot read it: {exc}", path=header.path) from None
    for alias, target in header.aliases.items():
        state_dict[alias] = state_dict[target]
    return state_dict


def read_state_dict(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a .safetensors file written by ckptfmt (or anything else) into a state dict."""
    return load_tensors(read_header(path), device=device)
