"""The canonical weights digest, `ckptfmt.weights_sha256`, and each tensor's own digest.

SHA-256 over the state dict's tensors in sorted name order, each contributing a JSON record
`[name, dtype, shape, nbytes]` and a newline, then its own digest (format 3; formats 1 and 2:
its raw bytes). A tensor's own digest is SHA-256 over the JSON record `[dtype, shape]`, a
newline and its raw bytes, so each byte is hashed once, and the weights digest of a set of
files can be put together from their tensors' digests. A tied tensor (an alias of a
stored one, see `ckptfmt.aliases`) contributes the record `[name, dtype, shape, nbytes, stored
name]` and no bytes: its bytes are the stored tensor's, already counted, so each byte of data is
read once however many names a file ties to it. (Format 1, written by ckptfmt 0.1.0, counted an
alias's bytes again; its files are still verified by that rule, refused when their aliases would
multiply the work past the file's own size.) The file layout plays no part otherwise, so the same
weights give the same digest in any file, and a `.pth` can be compared with the `.safetensors`
made from it. Standard library only: `verify` streams a file through it without torch.

The header records each stored tensor's own digest, truncated to 16 bytes (format 3,
`ckptfmt.tensor_digests`). 128 bits keep an accidental match out of reach (2^-128 for a changed tensor) and a crafted one costly
(2^64 hashes for a colliding pair, 2^128 to match a given tensor), at 22 bytes a tensor in the
header; the weights digest stays the full-strength check of the whole file. With them, `diff`
compares two files by their headers, and a load that reads part of a file checks that part.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import HeaderError, IntegrityError
from ..io.files import open_regular
from .header import TENSOR_DIGEST_BYTES, Header
from .tensor_entries import TensorInfo

__all__ = [
    "WeightsHasher",
    "check_digest",
    "check_tensors",
    "compose_digest",
    "digest_file",
    "divide_checks",
    "encode_tensor_digests",
    "verify_read",
]

_CHUNK = 8 << 20


class WeightsHasher:
    """Feeds tensors into the canonical digest: `begin` each tensor in sorted name order,
    then `update` with its raw bytes (any bytes-like object; hashlib reads it without a copy).
    `per_tensor` (format 3) hashes each stored tensor on its own and feeds the weights digest
    its digest; `tensor_digests` gives them. Without it (formats 1 and 2) the bytes themselves
    go into the weights digest.
    """

    def __init__(self, *, per_tensor: bool = False) -> None:
        self._sha = hashlib.sha256()
        self._previous: str | None = None
        self._tensors: dict[str, hashlib._Hash] | None = {} if per_tensor else None
        self._tensor: hashlib._Hash | None = None  # the stored tensor being fed (per_tensor)

    def begin(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        self._record([name, dtype, list(shape), nbytes])
        if self._tensors is not None:
            self._tensor = self._tensors[name] = _tensor_hash(dtype, shape)

    def digested(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, digest: bytes) -> None:
        """A stored tensor given by its own full digest (`tensor_digests(full=True)` of the pass
        that read it), its bytes not fed again (`per_tensor` only)."""
        if self._tensors is None or len(digest) != hashlib.sha256().digest_size:
            raise ValueError(f"tensor {name!r}: a full per-tensor digest is fed to a per-tensor hasher only")
        self._record([name, dtype, list(shape), nbytes])
        self._sha.update(digest)

    def alias(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, stored: str) -> None:
        """A tied tensor: its record names the stored tensor, whose bytes are already counted."""
        self._record([name, dtype, list(shape), nbytes, stored])

    def _end_tensor(self) -> None:
        if self._tensor is not None:
            self._sha.update(self._tensor.digest())
            self._tensor = None

    def _record(self, record: list) -> None:
        name = record[0]
        if self._previous is not None and name <= self._previous:
            raise ValueError(f"tensors must come in sorted name order: {name!r} after {self._previous!r}")
        self._end_tensor()
        self._previous = name
        self._sha.update(json.dumps(record).encode() + b"\n")

    def update(self, data) -> None:
        (self._sha if self._tensor is None else self._tensor).update(data)

    def hexdigest(self) -> str:
        """The weights digest, once every tensor has been fed."""
        self._end_tensor()
        return self._sha.hexdigest()

    def tensor_digests(self, *, full: bool = False) -> dict[str, bytes]:
        """Each stored tensor's own digest, by name (`per_tensor` only): as the header records
        it, or `full` (32 bytes, what the weights digest is made of; see `compose_digest`)."""
        size = None if full else TENSOR_DIGEST_BYTES
        return {name: sha.digest()[:size] for name, sha in (self._tensors or {}).items()}


def _tensor_hash(dtype: str, shape: tuple[int, ...]) -> hashlib._Hash:
    return hashlib.sha256(json.dumps([dtype, list(shape)]).encode() + b"\n")


def encode_tensor_digests(digests: Mapping[str, bytes]) -> str:
    """The value of `ckptfmt.tensor_digests`: the digests in sorted name order, each cut to
    the header's length, as one base64 string, whose length depends on their count alone.

    Example:
        >>> encode_tensor_digests({"b": bytes(16), "a": bytes([255]) * 16})
        '/////////////////////wAAAAAAAAAAAAAAAAAAAAA='
    """
    return base64.b64encode(b"".join(digests[name][:TENSOR_DIGEST_BYTES] for name in sorted(digests))).decode()


def compose_digest(header: Header, digests: Mapping[str, bytes]) -> str:
    """The weights digest (format 3) of the tensors `header` lists, put together from each stored
    tensor's full digest, as the pass that wrote it computed it (`write_safetensors`' `digests`):
    no byte of data is read. The same value as `digest_file` of the files those tensors are in.

    Raises:
        ValueError: a stored tensor has no full digest in `digests`.

    Example:
        >>> digests = {}
        >>> write_safetensors("m.safetensors", tensors, metadata, digests=digests)
        >>> compose_digest(read_header("m.safetensors"), digests) == weights_digest(tensors)
        True
    """
    aliases = header.aliases
    hasher = WeightsHasher(per_tensor=True)
    for name in sorted([*header.tensors, *aliases]):
        stored = aliases.get(name, name)
        info = header.tensors[stored]
        if stored != name:
            hasher.alias(name, info.dtype, info.shape, info.nbytes, stored)
        elif name not in digests:
            raise ValueError(f"tensor {name!r} has no digest from the pass that wrote it")
        else:
            hasher.digested(name, info.dtype, info.shape, info.nbytes, digests[name])
    return hasher.hexdigest()


def digest_file(header: Header) -> str:
    """Stream the tensor data of a .safetensors file through the canonical digest.

    Each stored byte is read once, in chunks into one buffer, so memory stays flat whatever
    the file size.

    Example:
        >>> from ckptfmt.format.header import read_header
        >>> header = read_header("model.safetensors")
        >>> digest_file(header) == header.weights_sha256
        True
    """
    return _digest_pass(header).hexdigest()


def _digest_pass(header: Header) -> WeightsHasher:
    """The file's tensors fed through the digest of its format, each stored byte read once; a
    file that names none has the newest (written by `write_safetensors` with metadata of
    its own)."""
    aliases = header.aliases
    counts_alias_bytes = header.format_version == "1"
    if counts_alias_bytes:
        data_bytes = header.data_bytes
        alias_bytes = sum(header.tensors[target].nbytes for target in aliases.values())
        if alias_bytes > data_bytes:
            raise IntegrityError(
                f"ties {len(aliases)} names to stored tensors, which would make its (format 1) digest "
                f"read {alias_bytes:,} bytes again, more than the file's {data_bytes:,}; refused as "
                "crafted. Re-create it from its source",
                path=header.path,
            )
    hasher = WeightsHasher(per_tensor=header.format_version not in ("1", "2"))
    reader = _TensorReader(header)
    try:
        for name in sorted([*header.tensors, *aliases]):
            stored = aliases.get(name, name)
            info = header.tensors[stored]
            if stored != name and not counts_alias_bytes:
                hasher.alias(name, info.dtype, info.shape, info.nbytes, stored)
                continue
            hasher.begin(name, info.dtype, info.shape, info.nbytes)
            reader.feed(info, hasher.update, name)
    finally:
        reader.close()
    return hasher


class _TensorReader:
    """Streams tensors' bytes out of a checkpoint's files through one bounded buffer, keeping
    each file open once."""

    def __init__(self, header: Header) -> None:
        self._path = header.path
        largest = max((info.nbytes for info in header.tensors.values()), default=0)
        self._buffer = memoryview(bytearray(min(_CHUNK, largest)))
        self._descriptors: dict[Path, int] = {}

    def feed(self, info: TensorInfo, update, name: str) -> None:
        file = info.file or self._path
        if file not in self._descriptors:
            self._descriptors[file] = open_regular(file, error=HeaderError)
        position, end = info.base + info.start, info.base + info.end
        while position < end:
            got = os.preadv(self._descriptors[file], [self._buffer[: min(_CHUNK, end - position)]], position)
            if got == 0:
                raise HeaderError(f"ends inside tensor {name!r}; it is truncated", path=file)
            update(self._buffer[:got])
            position += got

    def close(self) -> None:
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()


def _changed_tensors(header: Header, names: Iterable[str]) -> list[str]:
    """The stored tensors among `names` whose bytes no longer match their own digests."""
    reader = _TensorReader(header)
    changed = []
    try:
        for name in sorted(set(names)):
            info = header.tensors[name]
            sha = _tensor_hash(info.dtype, info.shape)
            reader.feed(info, sha.update, name)
            if sha.digest()[:TENSOR_DIGEST_BYTES].hex() != info.digest:
                changed.append(name)
    finally:
        reader.close()
    return changed


def _named(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:3])
    return f"tensor{'s' if len(names) > 1 else ''} {shown}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_tensors(header: Header, names: Iterable[str]) -> int:
    """Read the named tensors (aliases stand for their stored tensors) and check each against
    its own digest: what a load that reads part of a file checks of that part.

    Returns:
        The bytes read.

    Raises:
        IntegrityError: a tensor's bytes differ from its digest (naming it), or a tensor has
            no digest of its own (a file of format 1 or 2: check it whole with `check_digest`).

    Example:
        >>> header = read_header("model.safetensors")
        >>> check_tensors(header, ["head.weight", "head.bias"])
        20480
    """
    aliases = header.aliases
    stored = {aliases.get(name, name) for name in names}
    missing = sorted(name for name in stored if header.tensors[name].digest is None)
    if missing:
        raise IntegrityError(f"records no digest of {_named(missing)} (format {header.format_version}); "
                             "verify it whole", path=header.path)
    changed = _changed_tensors(header, stored)
    if changed:
        raise IntegrityError(
            f"{_named(changed)} {'were' if len(changed) > 1 else 'was'} changed or corrupted: "
            f"{'their bytes do not match their digests' if len(changed) > 1 else 'its bytes do not match its digest'} "
            "in the header; restore the file from a good copy",
            path=header.path,
        )
    return sum(header.tensors[name].nbytes for name in stored)


def divide_checks(header: Header, reads: Sequence[Iterable[str]]) -> list[list[str]]:
    """Which tensors each of several readers (ranks) checks, so that every tensor one of them
    reads is checked once, by a reader that reads it, the bytes balanced among them.

    Example:
        >>> divide_checks(header, [["big", "small"], ["big", "small"]])
        [['big'], ['small']]
    """
    aliases = header.aliases
    readers: dict[str, list[int]] = {}
    for rank, names in enumerate(reads):
        for name in dict.fromkeys(aliases.get(name, name) for name in names):
            readers.setdefault(name, []).append(rank)
    loads = [0] * len(reads)
    shares: list[list[str]] = [[] for _ in reads]
    for name in sorted(readers, key=lambda n: (-header.tensors[n].nbytes, n)):  # largest first
        rank = min(readers[name], key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += header.tensors[name].nbytes
    return shares


def verify_read(header: Header, names: Iterable[str]) -> None:
    """What `verify=True` checks of a load that reads the tensors `names`: those tensors
    against their own digests when the file records them and they are not all of it, else the
    weights digest of the whole file.

    Raises:
        IntegrityError: see `check_tensors` and `check_digest`.

    Example:
        >>> verify_read(read_header("model.safetensors"), ["head.weight"])  # reads head.weight only
    """
    aliases = header.aliases
    stored = {aliases.get(name, name) for name in names}
    if stored == set(header.tensors) or any(header.tensors[name].digest is None for name in stored):
        check_digest(header)
    else:
        check_tensors(header, stored)


def check_digest(header: Header) -> str:
    """Stream the file through the digest and compare it with the one its header records.

    Returns:
        The digest.

    Raises:
        IntegrityError: no digest is recorded, or the data does not match it.
    """
    recorded = header.weights_sha256
    if recorded is None:
        raise IntegrityError(
            "records no weights digest (not written by ckptfmt), so there is nothing to verify against",
            path=header.path,
        )
    hasher = _digest_pass(header)
    actual = hasher.hexdigest()
    if actual != recorded:
        # The same pass gave each tensor's digest: what changed is named where the file records them.
        changed = sorted(name for name, digest in hasher.tensor_digests().items()
                         if header.tensors[name].digest not in (None, digest.hex()))
        raise IntegrityError(
            f"weights digest mismatch: the tensor data was changed or corrupted (recorded "
            f"{recorded[:12]}..., actual {actual[:12]}...)" + (f" in {_named(changed)}" if changed else "")
            + "; restore the file from a good copy",
            path=header.path,
        )
    return actual
