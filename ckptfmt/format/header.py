"""Reading a .safetensors header with the standard library alone.

This module never imports torch and never reads tensor data: `ckptfmt inspect` and
`ModelConfig.from_checkpoint` answer from the first few kilobytes of a file of any size.

On top of the checks safetensors makes itself (lengths, offsets, dtypes), the header is read
under stricter rules, because it is the boundary where untrusted files enter: duplicate keys,
null or non-string metadata, NUL characters, empty tensor names, oversized metadata, and, in
the embedded JSON documents, NaN, Infinity, huge integers and deep nesting are all refused.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HeaderError
from ..io.files import file_in_folder, open_regular, read_capped
from ..io.jsondoc import has_surrogate, loads_strict, shown_text
from ..io.transaction import finish_pending
from .tensor_entries import TensorInfo, check_tensor_name, check_tensors

__all__ = [
    "FORMAT_VERSION",
    "Header",
    "KEY_ALIASES",
    "KEY_CONFIG",
    "KEY_FORMAT",
    "KEY_FORMAT_VERSION",
    "KEY_SHARD",
    "KEY_OPTIMIZER",
    "KEY_TENSOR_DIGESTS",
    "KEY_PROVENANCE",
    "KEY_TRAINING",
    "KEY_WEIGHTS_SHA256",
    "TENSOR_DIGEST_BYTES",
    "check_format_version",
    "check_metadata",
    "looks_like_safetensors",
    "metadata_size",
    "read_header",
    "read_index",
    "shard_of",
]

# 2: a tied tensor's digest record names the tensor it is tied to instead of counting its bytes
# again (see digest.py). 3: the header records a digest of each stored tensor
# (`ckptfmt.tensor_digests`). Files of formats 1 and 2 are read as they are.
FORMAT_VERSION = "3"
KEY_FORMAT = "format"
KEY_FORMAT_VERSION = "ckptfmt.format_version"
KEY_CONFIG = "ckptfmt.config"
KEY_TRAINING = "ckptfmt.training"
KEY_PROVENANCE = "ckptfmt.provenance"
KEY_WEIGHTS_SHA256 = "ckptfmt.weights_sha256"
# Each stored tensor's digest, truncated to TENSOR_DIGEST_BYTES, concatenated in sorted name
# order, as one base64 string (see digest.py): about 22 bytes of metadata a tensor.
KEY_TENSOR_DIGESTS = "ckptfmt.tensor_digests"
TENSOR_DIGEST_BYTES = 16
# Tied tensors are stored once; each alias names the stored tensor it shares memory with.
KEY_ALIASES = "ckptfmt.aliases"
# Marks an optimizer-state companion file and holds its non-tensor structure.
KEY_OPTIMIZER = "ckptfmt.optimizer"

INDEX_SUFFIX = ".safetensors.index.json"
# In a shard's header: the index it belongs to, its number and how many there are.
KEY_SHARD = "ckptfmt.shard"
# An index lists one entry per tensor; a billion-parameter model has a few thousand.
MAX_INDEX_BYTES = 64 << 20

# safetensors' own header limit; a larger header is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
MAX_METADATA_BYTES = 1 << 20

@dataclass(frozen=True)
class Header:
    """A parsed, validated .safetensors header, or the index of a sharded checkpoint with the
    headers of its shards (see `read_index`).

    `tensors` is in file order; `aliases` maps a tied tensor's name to the stored tensor whose
    memory it shares (empty for files that have none); `files` are the files that hold the data.
    """

    path: Path
    file_size: int
    data_offset: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    files: tuple[Path, ...] = ()

    @property
    def data_bytes(self) -> int:
        """The bytes of tensor data, in all its files."""
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1 or (len(self.files) == 1 and self.files[0] != self.path)

    @property
    def is_ckptfmt(self) -> bool:
        return KEY_FORMAT_VERSION in self.metadata

    @property
    def format_version(self) -> str | None:
        return self.metadata.get(KEY_FORMAT_VERSION)

    @property
    def weights_sha256(self) -> str | None:
        return self.metadata.get(KEY_WEIGHTS_SHA256)

    def config_dict(self) -> dict[str, Any] | None:
        """The embedded config as a dict (not yet validated as a ModelConfig), or None."""
        return self._json(KEY_CONFIG)

    def training(self) -> dict[str, Any]:
        """The training record, checked against its schema (see `documents`)."""
        from .records import check_training

        return check_training(self._json(KEY_TRAINING) or {}, path=self.path)

    def provenance(self) -> dict[str, Any]:
        """The provenance record, checked against its schema (see `documents`)."""
        from .records import check_provenance

        return check_provenance(self._json(KEY_PROVENANCE) or {}, path=self.path)

    @property
    def aliases(self) -> dict[str, str]:
        aliases = self._json(KEY_ALIASES) or {}
        for alias, target in aliases.items():
            if not isinstance(target, str) or target not in self.tensors or alias in self.tensors:
                raise HeaderError(
                    f"metadata {KEY_ALIASES!r} ties {alias!r} to {target!r}, which is not a stored "
                    "tensor; the file is damaged, re-create it from its source",
                    path=self.path,
                )
        return aliases

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name the state dict has (aliases included) with its shape."""
        shapes = {name: info.shape for name, info in self.tensors.items()}
        shapes.update({alias: shapes[target] for alias, target in self.aliases.items()})
        return shapes

    def dtypes(self) -> dict[str, str]:
        """Every tensor name the state dict has (aliases included) with its dtype."""
        dtypes = {name: info.dtype for name, info in self.tensors.items()}
        dtypes.update({alias: dtypes[target] for alias, target in self.aliases.items()})
        return dtypes

    def _json(self, key: str) -> dict[str, Any] | None:
        text = self.metadata.get(key)
        if text is None:
            return None
        value = loads_strict(text, what=f"metadata {key!r}", path=self.path)
        if not isinstance(value, dict):
            raise HeaderError(
                f"metadata {key!r} must be a JSON object, not {type(value).__name__}; "
                "the file is damaged or was not written by ckptfmt",
                path=self.path,
            )
        return value


def looks_like_safetensors(path: str | os.PathLike) -> bool:
    """True for a `.safetensors` name or a sharded checkpoint's index, or a file that starts like
    one (a length, then a JSON object): a renamed file is told apart from a torch zip (`PK`) or a
    pickle by content."""
    if os.fspath(path).endswith((".safetensors", INDEX_SUFFIX)):
        return True
    fd = open_regular(path, error=HeaderError)
    try:
        start = os.pread(fd, 9, 0)
    finally:
        os.close(fd)
    return len(start) == 9 and start[8:9] == b"{"


def _pread_exactly(fd: int, size: int, offset: int, path: Path) -> bytes:
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            raise HeaderError("ended while its header was read; it is truncated", path=path)
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a .safetensors file, without reading tensor data.

    Args:
        path: the .safetensors file.

    Returns:
        The parsed `Header`: tensors with dtype, shape and offsets, and the metadata.

    Raises:
        CheckpointNotFoundError: no file at `path`.
        HeaderError: the header breaks a safetensors rule or one of ckptfmt's stricter ones.

    A sharded checkpoint's index (`NAME.safetensors.index.json`) is read with its shards' headers
    as one Header (see `read_index`).

    Example:
        >>> header = read_header("converted/multitask_joint/best_model.safetensors")
        >>> header.config_dict()["depth"]
        3
    """
    path = Path(path)
    # A commit of this checkpoint that a killed writer left is finished first (one lstat when
    # there is none), so that what is read is one whole set of files, the previous or the new.
    finish_pending(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _read_index(path)
    return _read_file_header(path)


def _read_file_header(path: Path) -> Header:
    """One .safetensors file's header, whatever its name: an index's shards are read here, so no
    index can lead to another (or to itself) and recurse."""
    fd = open_regular(path, error=HeaderError)
    try:
        file_size = os.fstat(fd).st_size
        if file_size < 8:
            raise HeaderError(
                f"is {file_size} bytes long, too short for a safetensors file "
                "(8-byte header length first)",
                path=path,
            )
        (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if header_len > MAX_HEADER_BYTES:
            raise HeaderError(
                f"declares a {header_len}-byte header, over the {MAX_HEADER_BYTES}-byte limit; "
                "the file is damaged or not a safetensors file",
                path=path,
            )
        if 8 + header_len > file_size:
            raise HeaderError(
                f"declares a {header_len}-byte header but the file is only {file_size} bytes; "
                "it is truncated or not a safetensors file",
                path=path,
            )
        raw = _pread_exactly(fd, header_len, 8, path)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not valid UTF-8 (byte {exc.start})", path=path) from None
    document = loads_strict(text, what="header", path=path)
    if not isinstance(document, dict):
        raise HeaderError("header is not a JSON object", path=path)
    metadata = check_metadata(document.pop("__metadata__", {}), path)
    check_format_version(metadata.get(KEY_FORMAT_VERSION), path)
    digests = _tensor_digests(metadata, document, path)
    tensors = check_tensors(document, file_size - 8 - header_len, path, 8 + header_len, digests)
    return Header(path, file_size, 8 + header_len, tensors, metadata, (path,))


def check_metadata(metadata: Any, path: Path | None) -> dict[str, str]:
    """The header's metadata rules, for the reader and the writer alike: string values, no NUL,
    valid Unicode (no lone surrogate), at most 1 MiB in all."""
    if not isinstance(metadata, dict):
        raise HeaderError("__metadata__ is not a JSON object", path=path)
    for key, value in metadata.items():
        if not isinstance(value, str):
            shown = "null" if value is None else type(value).__name__
            raise HeaderError(
                f"metadata {key!r} is {shown}; safetensors metadata values must be strings",
                path=path,
            )
        if "\x00" in key or "\x00" in value:
            raise HeaderError(f"metadata {key!r} contains a NUL character", path=path)
        if has_surrogate(key) or has_surrogate(value):
            # Python's json reads and writes "\udc80"; safetensors refuses the whole header for it.
            part = "its key" if has_surrogate(key) else f"its value {shown_text(value)}"
            raise HeaderError(
                f"metadata {shown_text(key)}: {part} is not valid Unicode (a lone surrogate), which safetensors "
                "refuses to read",
                path=path,
            )
    total = metadata_size(metadata)
    if total > MAX_METADATA_BYTES:
        raise HeaderError(
            f"metadata is {total} bytes, over the {MAX_METADATA_BYTES}-byte limit", path=path
        )
    return metadata


def metadata_size(metadata: dict[str, str]) -> int:
    """The bytes that count against the metadata cap: each key and value, UTF-8."""
    # surrogatepass: the writer sizes metadata before check_metadata refuses a lone surrogate.
    return sum(len(text.encode(errors="surrogatepass")) for item in metadata.items() for text in item)


def _tensor_digests(metadata: dict[str, str], tensors: dict[str, Any], path: Path) -> dict[str, str]:
    """Each stored tensor's own digest (hex) by name, from `ckptfmt.tensor_digests`; empty
    for a file that records none (formats 1 and 2, files not written by ckptfmt)."""
    text = metadata.get(KEY_TENSOR_DIGESTS)
    if text is None:
        return {}
    names = sorted(tensors)
    size = TENSOR_DIGEST_BYTES
    raw = b""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    if len(raw) != size * len(names) or base64.b64encode(raw).decode() != text:
        raise HeaderError(
            f"metadata {KEY_TENSOR_DIGESTS!r} is not the {len(names)} tensor digests this file's tensors need "
            f"({4 * -(-size * len(names) // 3)} base64 characters, it has {len(text)}); the file is damaged, "
            "re-create it from its source",
            path=path,
        )
    return {name: raw[i * size:(i + 1) * size].hex() for i, name in enumerate(names)}


def check_format_version(version: str | None, path: Path) -> None:
    """A newer format is refused as a newer config schema is; a malformed one is damage."""
    if version is None:
        return
    if not (version.isascii() and version.isdigit()) or version.startswith("0"):
        raise HeaderError(
            f"metadata {KEY_FORMAT_VERSION!r} is {version!r}, not a format version number; the file is "
            "damaged or was not written by ckptfmt",
            path=path,
        )
    if len(version) > 6 or int(version) > int(FORMAT_VERSION):
        raise HeaderError(
            f"written by a newer ckptfmt (format {version[:12]}); this one reads up to format "
            f"{FORMAT_VERSION}. Upgrade ckptfmt (pip install -U ckptfmt)",
            path=path,
        )


def read_index(path: str | os.PathLike) -> Header:
    """A sharded checkpoint's index and its shards' headers, as one Header.

    Raises:
        HeaderError: the index is malformed, names a shard outside its folder, or disagrees with
            what the shards hold.
    """
    path = Path(path)
    finish_pending(path)
    return _read_index(path)


def _read_index(path: Path) -> Header:
    raw = read_capped(path, limit=MAX_INDEX_BYTES, what="a checkpoint index", error=HeaderError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("is not UTF-8 text; is it really a checkpoint index?", path=path) from None
    document = loads_strict(text, what="index", path=path)
    if not isinstance(document, dict) or not isinstance(document.get("weight_map"), dict):
        raise HeaderError("is not a safetensors index: it has no \"weight_map\" object", path=path)
    metadata = dict(document.get("metadata") or {})
    total_size = metadata.pop("total_size", None)
    if total_size is not None and (type(total_size) is not int or total_size < 0):
        raise HeaderError(f"metadata total_size must be a byte count, not {total_size!r}", path=path)
    metadata = check_metadata(metadata, path)
    check_format_version(metadata.get(KEY_FORMAT_VERSION), path)
    by_shard: dict[str, list[str]] = {}
    shard_paths: dict[str, Path] = {}
    for name, shard in document["weight_map"].items():
        check_tensor_name(name, path)
        if shard not in shard_paths:
            key = f"weight_map[{name!r}]"
            shard_paths[shard] = file_in_folder(path.parent, shard, key=key, path=path, error=HeaderError)
            if shard.endswith(INDEX_SUFFIX):
                itself = " (this index itself)" if shard == path.name else ""
                raise HeaderError(f"{key} names {shard!r}, an index{itself}, not a shard; an index names the "
                                  ".safetensors files that hold its tensors", path=path)
        by_shard.setdefault(shard, []).append(name)
    tensors = {}
    files, size = [], 0
    for shard in sorted(by_shard):
        shard_path = shard_paths[shard]
        header = _read_file_header(shard_path)
        if not shard_of(header, path):
            belongs = header.metadata.get(KEY_SHARD)
            why = (f"it says it belongs to another index ({belongs[:200]})" if belongs is not None
                   else "it is a ckptfmt checkpoint of its own (its header names no index)")
            raise HeaderError(f"{shard} is not a shard of this index: {why}", path=path)
        if set(header.tensors) != set(by_shard[shard]):
            extra = sorted(set(header.tensors) ^ set(by_shard[shard]))[:3]
            raise HeaderError(
                f"shard {shard} does not hold the tensors the weight_map gives it (e.g. {', '.join(extra)}); "
                "the checkpoint is damaged or its shards come from different saves",
                path=path,
            )
        tensors.update(header.tensors)
        files.append(shard_path)
        size += header.file_size
    header = Header(path, size, 0, tensors, metadata, tuple(files))
    header.aliases  # ties to tensors that no shard holds are refused here, not when used
    return header


def shard_of(header: Header, index: Path) -> bool:
    """Whether a file whose `header` this is is a shard of `index`: it says so (`ckptfmt.shard`),
    or it is a plain safetensors file (no ckptfmt metadata), as the shards of an index written
    by someone else are. A checkpoint of its own, or a shard of another index, is not; so an
    index can neither take another checkpoint's place nor hide it from a folder's walk.

    Example:
        >>> index = Path("big/model.safetensors.index.json")
        >>> shard_of(read_header("big/model-00001-of-00002.safetensors"), index)
        True
    """
    belongs = header.metadata.get(KEY_SHARD)
    if belongs is None:
        return KEY_FORMAT_VERSION not in header.metadata
    try:
        claim = loads_strict(belongs, what=KEY_SHARD, path=header.path)
    except HeaderError:
        return False
    return isinstance(claim, dict) and claim.get("index") == index.name

