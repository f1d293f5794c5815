"""Tensors in and out of .safetensors files, with torch.

The writer is our own rather than `safetensors.torch.save_file`, for three reasons: it writes
through `atomic_write`, or stages it in a checkpoint's `Transaction` (temp file, fsync, rename,
mode from the umask, where save_file writes 0600 in place); it streams each tensor's bytes straight from memory, where save_file first
copies every tensor into a bytes object (twice the memory for a 1 GB checkpoint); and it
stores tied tensors once, recording the ties in `ckptfmt.aliases`, where save_file refuses
them. The output is a plain safetensors file that `safetensors.torch.load_file` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HeaderError, IntegrityError
from ..io.atomic import atomic_write, write_all
from ..io.background import helpers
from ..io.transaction import Transaction
from .digest import WeightsHasher, encode_tensor_digests
from .header import (
    KEY_ALIASES,
    KEY_TENSOR_DIGESTS,
    KEY_WEIGHTS_SHA256,
    MAX_METADATA_BYTES,
    TENSOR_DIGEST_BYTES,
    Header,
    check_metadata,
    metadata_size,
    read_header,
)
from .tensor_entries import DTYPE_SIZES, check_tensor_name

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
    stored, aliases = split_aliases(state_dict)
    hasher = WeightsHasher(per_tensor=True)
    for name in sorted(state_dict):
        tensor = state_dict[name]
        nbytes = tensor.numel() * tensor.element_size()
        if name in aliases:
            hasher.alias(name, dtype_name(tensor, name), tuple(tensor.shape), nbytes, aliases[name])
            continue
        data = tensor_bytes(tensor)
        hasher.begin(name, dtype_name(tensor, name), tuple(tensor.shape), data.nbytes)
        hasher.update(data)
    return hasher.hexdigest()


def placeholder(length: int = 64) -> str:
    """A unique stand-in for a metadata value that is only known once the data is written, as
    long as that value will be (a sha256 hex digest by default; see `write_safetensors`'
    `fill_in`)."""
    return os.urandom(length // 2 + 1).hex()[:length]


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
    *, overwrite: bool = False, fill_in: Mapping[str, Future] | None = None,
    sources: Mapping[str, tuple[int, int]] | None = None, sync_folder: bool = True,
    transaction: Transaction | None = None, digests: dict[str, bytes] | None = None,
) -> str:
    """Write a safetensors file atomically, streaming tensor bytes, and check it.

    The data of a large file is fsynced as it is written (a small one once, at its close). Then,
    while the last of it goes to disk, it is read back once (`read_back`): compared byte for byte
    with what it was written from, and each stored tensor hashed on its own; those digests go into `ckptfmt.tensor_digests` (where they fit in the
    metadata cap) and make the canonical weights digest, which goes into
    `ckptfmt.weights_sha256` (unless `metadata` already sets it). Only a file that matches takes
    its name. Tied tensors (see `split_aliases`) are stored once and listed in
    `ckptfmt.aliases`. Tensors are laid out by decreasing item size, then name, so each starts
    aligned to its item size.

    Args:
        fill_in: placeholders (from `placeholder()`) that occur once in `metadata`'s values,
            each with a future of its value (as long as the placeholder), written into the
            header once the data is: lets a caller hash its source while this writes.
        sources: for tensors whose bytes lie contiguous in another file (a memory-mapped
            `.pth`), `{name: (descriptor, offset)}`: their bytes are copied from there by the
            kernel and compared with it, and their memory is never touched, so converting a
            file costs bounded memory whatever its size.
        sync_folder: see `atomic_write`.
        transaction: stage the file in this checkpoint's transaction, to take its name when the
            transaction commits; with None it is written on its own (`atomic_write`).
        digests: a dict to receive each stored tensor's full (32-byte) digest from the
            read-back, by name: what the digest of a set of shards is put together from
            (`digest.compose_digest`, `index.write_index`) without reading them again.

    Returns:
        The canonical weights digest of what was written.

    Raises:
        IntegrityError: what was read back differs from the source (failing disk or memory).
        OutputExistsError, WriteError: see `atomic_write`.
    """
    layout = layout_file(path, tensors, metadata, fill_in=fill_in)
    stored = layout.tensors
    sources = {name: span for name, span in (sources or {}).items() if name in stored}
    if layout.size <= _READ_CHUNK:
        # A small file is written from memory and read back in one read: copying each tensor from
        # its source file by the kernel (`sources`) saves memory only for large ones, and costs
        # three system calls a tensor.
        sources = {}
    data = {name: sources.get(name) or [tensor_bytes(stored[name])] for name in layout.order}
    opened = atomic_write(path, overwrite=overwrite, sync_folder=sync_folder) if transaction is None \
        else transaction.stage(path, overwrite=overwrite)
    with opened as fd:
        write_all(fd, layout.head)
        syncing: list[Future] = []
        try:
            _write_data(fd, layout.order, data, layout.sizes, syncing)
            digest, tensor_digests = read_back(fd, layout, data)
            if digests is not None:
                digests.update(tensor_digests)
        finally:
            for future in syncing:  # none may outlive the descriptor it syncs
                future.result()
        fill_in_header(fd, layout, digest, tensor_digests,
                       {stand_in: future.result() for stand_in, future in (fill_in or {}).items()})
    return digest


@dataclass(frozen=True)
class Layout:
    """Where everything of a safetensors file goes, known before a byte of its data is written:
    what `write_safetensors` writes in one go, and what the ranks of a distributed save write
    into one file in parts (`distributed.shards`).

    Attributes:
        path: the file's final name (for messages).
        head: the file's first bytes: the header's length and the header, holding placeholders
            for what is only known once the data is written.
        tensors: the stored tensors (ties removed), by name; only their dtype and shape matter here.
        order: the stored tensors' names as laid out in the file.
        spans: stored name -> (the file offset of its data, its header entry).
        sizes: stored name -> bytes.
        aliases: tied name -> stored name.
        positions: placeholder -> its file offset.
        stand_ins: metadata key -> the placeholder of the value the read-back computes
            (`ckptfmt.weights_sha256`, `ckptfmt.tensor_digests`).
    """

    path: Path
    head: bytes
    tensors: dict[str, torch.Tensor]
    order: list[str]
    spans: dict[str, tuple[int, dict]]
    sizes: dict[str, int]
    aliases: dict[str, str]
    positions: dict[str, int]
    stand_ins: dict[str, str]

    @property
    def size(self) -> int:
        """The file's size once written."""
        return len(self.head) + sum(self.sizes.values())


def layout_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                fill_in: Mapping[str, Future] | None = None) -> Layout:
    """The layout of a safetensors file of `tensors` and `metadata` (see `write_safetensors`),
    checked as the reader checks a file: nothing is written that it, and so `verify`, would
    refuse. `fill_in`: the caller's placeholders in `metadata`'s values.

    Example:
        >>> layout = layout_file("m.safetensors", {"w": torch.empty(2, 3, device="meta")}, {})
        >>> layout.spans["w"][0] == len(layout.head)
        True
    """
    path = Path(path)
    for name in tensors:
        check_tensor_name(name, path)
    stored, aliases = split_aliases(tensors)
    metadata, stand_ins = _metadata_to_write(metadata, aliases, len(stored))
    check_metadata(metadata, path)
    order = sorted(stored, key=lambda n: (-DTYPE_SIZES[dtype_name(stored[n], n)], n))
    sizes = {name: stored[name].numel() * stored[name].element_size() for name in order}
    header, encoded = _encoded_header(metadata, stored, order, sizes)
    positions = _placeholder_positions(encoded, [*(fill_in or {}), *stand_ins.values()])
    data_start = 8 + len(encoded)
    spans = {name: (data_start + header[name]["data_offsets"][0], header[name]) for name in order}
    return Layout(path, len(encoded).to_bytes(8, "little") + encoded, stored, order, spans, sizes, aliases,
                  positions, stand_ins)


def fill_in_header(fd: int, layout: Layout, digest: str, tensor_digests: dict[str, bytes],
                   values: Mapping[str, str]) -> None:
    """Write into the header of `fd` the digests the read-back computed and the caller's `values`
    of its other placeholders (each as long as its placeholder)."""
    computed = {KEY_WEIGHTS_SHA256: digest, KEY_TENSOR_DIGESTS: encode_tensor_digests(tensor_digests)}
    values = {**values, **{stand_in: computed[key] for key, stand_in in layout.stand_ins.items()}}
    for stand_in, value in values.items():
        if len(value) != len(stand_in):
            raise ValueError(f"the value filled in for placeholder {stand_in!r} is not as long as it")
        os.pwrite(fd, value.encode(), layout.positions[stand_in])


def _metadata_to_write(metadata: Mapping[str, str], aliases: dict[str, str],
                       stored: int) -> tuple[dict[str, str], dict[str, str]]:
    """`metadata` with the ties recorded and placeholders for the digests it does not set
    (returned too, by key: the digests are only known once the data is read back). The
    tensors' digests, whose length follows from their count, are left out where they would
    take the metadata past its cap (tens of thousands of tensors in one file): the weights
    digest still covers them."""
    metadata = dict(metadata)
    if aliases:
        metadata[KEY_ALIASES] = json.dumps(aliases, sort_keys=True)
    stand_ins = {}
    if KEY_WEIGHTS_SHA256 not in metadata:
        metadata[KEY_WEIGHTS_SHA256] = stand_ins[KEY_WEIGHTS_SHA256] = placeholder()
    length = 4 * -(-stored * TENSOR_DIGEST_BYTES // 3)  # base64's
    fits = metadata_size(metadata) + len(KEY_TENSOR_DIGESTS) + length <= MAX_METADATA_BYTES
    if KEY_TENSOR_DIGESTS not in metadata and fits:
        if stored:
            stand_ins[KEY_TENSOR_DIGESTS] = placeholder(length)
        metadata[KEY_TENSOR_DIGESTS] = stand_ins.get(KEY_TENSOR_DIGESTS, "")
    return metadata, stand_ins


def _encoded_header(metadata: dict[str, str], stored: Mapping[str, torch.Tensor], order: list[str],
                    sizes: dict[str, int]) -> tuple[dict, bytes]:
    """The header, each tensor's entry placed in `order`, and its encoding as the file holds it."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        header[name] = {
            "dtype": dtype_name(stored[name], name),
            "shape": list(stored[name].shape),
            "data_offsets": [offset, offset + sizes[name]],
        }
        offset += sizes[name]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
    return header, encoded


def _placeholder_positions(encoded: bytes, stand_ins: list[str]) -> dict[str, int]:
    """Where in the file each placeholder's value is to be written."""
    positions = {}
    for stand_in in stand_ins:
        if len(stand_in) < 16 or encoded.count(stand_in.encode()) != 1:
            raise ValueError(f"fill_in placeholder {stand_in!r} must be 16 characters or more and occur once")
        positions[stand_in] = 8 + encoded.index(stand_in.encode())
    return positions


def _write_data(fd: int, order: list[str], data: dict[str, Any], sizes: dict[str, int], syncing: list[Future]) -> None:
    """Append the tensors' bytes in `order`, fsyncing as it goes, so the disk works while we write
    rather than all at the end. Each fsync goes into `syncing`, which the caller waits for.
    Tensors in memory go out together, up to `_WRITEV_BYTES` in one `writev`: a file of many
    small tensors is one system call, not one a tensor."""
    unflushed = total = 0
    batch: list[memoryview] = []
    batched = 0
    for name in order:
        if isinstance(data[name], tuple):
            _writev_all(fd, batch)
            batch, batched = [], 0
            _copy_range(data[name], fd, sizes[name])
        else:
            batch.extend(memoryview(piece).cast("B") for piece in data[name] if piece.nbytes)
            batched += sizes[name]
            if batched >= _WRITEV_BYTES or len(batch) >= _WRITEV_BUFFERS:
                _writev_all(fd, batch)
                batch, batched = [], 0
        unflushed += sizes[name]
        total += sizes[name]
        if unflushed >= _FLUSH_EVERY and (not syncing or syncing[-1].done()):
            _writev_all(fd, batch)
            batch, batched = [], 0
            syncing.append(helpers().submit(os.fsync, fd))
            unflushed = 0
    _writev_all(fd, batch)
    # The file's closing fsync (`write_temp`, after the header is filled in) syncs every byte
    # before it can take its name; this one only lets a large file's data go to disk while it is
    # read back. Below one flush's worth it would be a second journal commit for nothing.
    if total >= _FLUSH_EVERY:
        syncing.append(helpers().submit(os.fsync, fd))


def _writev_all(fd: int, views: list[memoryview]) -> None:
    """Write the buffers one after another, however many calls it takes."""
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first:first + _WRITEV_BUFFERS])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


_WRITEV_BYTES = 8 << 20
_WRITEV_BUFFERS = 512  # under every system's IOV_MAX (1024 on Linux)
_FLUSH_EVERY = 64 << 20
_READ_CHUNK = 8 << 20


def _copy_range(source: tuple[int, int], fd: int, size: int) -> None:
    """Append `size` bytes of another file, from its offset, to `fd`: by the kernel where it
    can (copy_file_range), else through one bounded buffer."""
    source_fd, offset = source
    done = 0
    try:
        while done < size:
            copied = os.copy_file_range(source_fd, fd, size - done, offset + done)
            if copied == 0:
                break
            done += copied
    except OSError:
        pass  # another file system, an old kernel: the buffered way below
    buffer = memoryview(bytearray(min(_READ_CHUNK, max(size - done, 1))))
    while done < size:
        got = os.preadv(source_fd, [buffer[: min(len(buffer), size - done)]], offset + done)
        if got == 0:
            raise IntegrityError("the source ended inside a tensor it declares; it was truncated while being read")
        write_all(fd, buffer[:got])
        done += got


def read_back(fd: int, layout: Layout, data: Mapping[str, Any]) -> tuple[str, dict[str, bytes]]:
    """Read every tensor of `layout` back from `fd` in name order: compare it with what it was
    written from, and hash it (see `WeightsHasher`). Each stored byte is read once, in chunks
    into a bounded buffer (a small file's data in one read). `data[name]`: the source file's
    `(descriptor, offset)`, or the tensor's segments in order, each an array of the bytes
    written (compared) or a count of bytes that another process wrote and checked (hashed
    only). Returns the weights digest and each stored tensor's full one.

    Raises:
        IntegrityError: a compared byte differs.
    """
    hasher = WeightsHasher(per_tensor=True)
    reader = _Reader(fd, layout.path, sum(layout.sizes.values()), start=len(layout.head))
    original = np.empty(_READ_CHUNK, dtype=np.uint8) if any(isinstance(d, tuple) for d in data.values()) else None
    for name in sorted([*layout.spans, *layout.aliases]):
        stored = layout.aliases.get(name, name)
        position, entry = layout.spans[stored]
        size = layout.sizes[stored]
        if stored != name:
            hasher.alias(name, entry["dtype"], tuple(entry["shape"]), size, stored)
            continue
        hasher.begin(name, entry["dtype"], tuple(entry["shape"]), size)
        expected = data[stored]
        if isinstance(expected, tuple):
            source_fd, offset = expected
            done = 0
            while done < size:
                want = min(_READ_CHUNK, size - done)
                got = os.preadv(source_fd, [memoryview(original)[:want]], offset + done)
                chunk = reader.read(position + done, want, stored)
                if got != want or not _same_bytes(chunk, original[:want]):
                    raise _differs(layout.path, stored)
                hasher.update(chunk)
                done += want
        else:
            for chunk in reader.checked(position, expected, stored):
                hasher.update(chunk)
    return hasher.hexdigest(), hasher.tensor_digests(full=True)


def write_at(fd: int, position: int, pieces: Sequence[np.ndarray]) -> None:
    """Write the pieces one after another into `fd` from `position`, however many calls it takes:
    how a rank writes its rows into a file another rank laid out (`distributed.shards`)."""
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while view:
            written = os.pwrite(fd, view[:_READ_CHUNK], position)
            view, position = view[written:], position + written


def check_written(fd: int, position: int, pieces: Sequence[np.ndarray], path: Path, name: str) -> None:
    """Read back what `write_at` wrote and compare it with the pieces.

    Raises:
        IntegrityError: a byte differs (naming tensor `name` of the file `path`).
    """
    for _ in _Reader(fd, path, sum(piece.nbytes for piece in pieces)).checked(position, pieces, name):
        pass


class _Reader:
    """Reads a written file back for checking: a region of at most `_READ_CHUNK` bytes from
    `start` in one read, up front (a small file's data: one system call rather than one a
    tensor), anything else chunk by chunk into one buffer of its own."""

    def __init__(self, fd: int, path: Path, size: int, *, start: int | None = None) -> None:
        self.fd, self.path = fd, path
        self.buffer = np.empty(min(size, _READ_CHUNK), dtype=np.uint8)
        self.start = start if start is not None and size <= _READ_CHUNK else None
        if self.start is not None:
            self.got = os.preadv(fd, [memoryview(self.buffer)], self.start)

    def read(self, position: int, want: int, name: str) -> np.ndarray:
        """`want` bytes from `position` (at most `_READ_CHUNK`)."""
        if self.start is not None:
            offset = position - self.start
            if offset < 0 or offset + want > self.got:
                raise _differs(self.path, name)
            return self.buffer[offset:offset + want]
        if os.preadv(self.fd, [memoryview(self.buffer)[:want]], position) != want:
            raise _differs(self.path, name)
        return self.buffer[:want]

    def checked(self, position: int, segments: Sequence[np.ndarray | int], name: str) -> Iterator[np.ndarray]:
        """The bytes of `segments` as read back from `position` on, chunk by chunk (each chunk
        within one segment), each array segment's compared with them."""
        for segment in segments:
            size = segment if isinstance(segment, int) else segment.nbytes
            done = 0
            while done < size:
                want = min(len(self.buffer), size - done)
                chunk = self.read(position + done, want, name)
                if not isinstance(segment, int) and not _same_bytes(chunk, segment[done:done + want]):
                    raise _differs(self.path, name)
                yield chunk
                done += want
            position += size


def _differs(path: Path, name: str) -> IntegrityError:
    return IntegrityError(
        f"reading back the written data of tensor {name!r} gave other bytes than were written; nothing was "
        "replaced. Check the disk and retry",
        path=path,
    )


def _same_bytes(read: np.ndarray, expected: np.ndarray) -> bool:
    """Whether two uint8 arrays of one length hold the same bytes: compared as 8-byte words where
    the length allows, which takes a third of the CPU of comparing byte by byte."""
    if read.nbytes % 8 == 0:
        return np.array_equal(read.view(np.uint64), expected.view(np.uint64))
    return np.array_equal(read, expected)


def load_tensors(header: Header, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a file (or of a sharded checkpoint's shards) as a state dict, ties restored
    as shared tensors.

    On the CPU the tensors are views into a memory map of each file: nothing is copied until
    written to, so loading costs one copy of the weights at most.
    """
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name, info in header.tensors.items():
        by_file.setdefault(info.file or header.path, []).append(name)
    state_dict = {}
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                state_dict.update({name: f.get_tensor(name) for name in names})
        except (SafetensorError, RuntimeError, OSError) as exc:
            # read_header has already applied stricter rules; this is the file changing under us.
            raise HeaderError(f"safetensors cannot read it: {exc}", path=file) from None
    for alias, target in header.aliases.items():
        state_dict[alias] = state_dict[target]
    return state_dict


def read_state_dict(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a .safetensors file written by ckptfmt (or anything else) into a state dict."""
    return load_tensors(read_header(path), device=device)
