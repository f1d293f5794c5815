"""The canonical weights digest, `ckptfmt.weights_sha256`.

SHA-256 over the state dict's tensors in sorted name order, each contributing a JSON record
`[name, dtype, shape, nbytes]` and a newline, then its raw bytes. A tied tensor (an alias of a
stored one, see `ckptfmt.aliases`) contributes the record `[name, dtype, shape, nbytes, stored
name]` and no bytes: its bytes are the stored tensor's, already counted, so each byte of data is
read once however many names a file ties to it. (Format 1, written by ckptfmt 0.1.0, counted an
alias's bytes again; its files are still verified by that rule, refused when their aliases would
multiply the work past the file's own size.) The file layout plays no part otherwise, so the same
weights give the same digest in any file, and a `.pth` can be compared with the `.safetensors`
made from it. Standard library only: `verify` streams a file through it without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import HeaderError, IntegrityError
from ..io.files import open_regular
from .header import Header

__all__ = ["WeightsHasher", "check_digest", "digest_file"]

_CHUNK = 8 << 20


class WeightsHasher:
    """Feeds tensors into the canonical digest: `begin` each tensor in sorted name order,
    then `update` with its raw bytes (any bytes-like object; hashlib reads it without a copy).
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._previous: str | None = None

    def begin(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        self._record([name, dtype, list(shape), nbytes])

    def alias(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, stored: str) -> None:
        """A tied tensor: its record names the stored tensor, whose bytes are already counted."""
        self._record([name, dtype, list(shape), nbytes, stored])

    def _record(self, record: list) -> None:
        name = record[0]
        if self._previous is not None and name <= self._previous:
            raise ValueError(f"tensors must come in sorted name order: {name!r} after {self._previous!r}")
        self._previous = name
        self._sha.update(json.dumps(record).encode() + b"\n")

    def update(self, data) -> None:
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


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
    hasher = WeightsHasher()
    largest = max((info.nbytes for info in header.tensors.values()), default=0)
    buffer = memoryview(bytearray(min(_CHUNK, largest)))
    descriptors: dict[Path, int] = {}
    try:
        for name in sorted([*header.tensors, *aliases]):
            stored = aliases.get(name, name)
            info = header.tensors[stored]
            if stored != name and not counts_alias_bytes:
                hasher.alias(name, info.dtype, info.shape, info.nbytes, stored)
                continue
            hasher.begin(name, info.dtype, info.shape, info.nbytes)
            file = info.file or header.path
            if file not in descriptors:
                descriptors[file] = open_regular(file, error=HeaderError)
            position, end = info.base + info.start, info.base + info.end
            while position < end:
                got = os.preadv(descriptors[file], [buffer[: min(_CHUNK, end - position)]], position)
                if got == 0:
                    raise HeaderError(f"ends inside tensor {name!r}; it is truncated", path=file)
                hasher.update(buffer[:got])
                position += got
    finally:
        for fd in descriptors.values():
            os.close(fd)
    return hasher.hexdigest()


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
    actual = digest_file(header)
    if actual != recorded:
        raise IntegrityError(
            f"weights digest mismatch: the tensor data was changed or corrupted (recorded "
            f"{recorded[:12]}..., actual {actual[:12]}...); restore the file from a good copy",
            path=header.path,
        )
    return actual
