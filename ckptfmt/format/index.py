"""Sharded checkpoints, as Hugging Face lays them out.

A model too large for one file is written as `NAME-00001-of-0000N.safetensors`, ... and an index
`NAME.safetensors.index.json`: `{"metadata": {"total_size": ..., ...}, "weight_map": {tensor:
shard}}`, which transformers, accelerate and `huggingface_hub.load_torch_model` read. ckptfmt's
metadata (format, config, training record, provenance, and the digest of the whole state dict)
is in the index's `metadata`; each shard's header carries `format: pt`, the config and its own
digest, and `ckptfmt.shard` says which index it belongs to, so that one shard alone still says
what it is part of. A tie is stored once, in the shard of its stored tensor; the index records
it in `ckptfmt.aliases`.

Read back (`header.read_index`, which `read_header` calls for an index), an index becomes one
`Header` whose tensors know the shard that holds them, so that loading, `inspect`, `verify` and
`diff` treat a sharded checkpoint as one file. The shard names an index gives are plain names in
its folder, checked like every name read from a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, CkptfmtError, ConfigError, HeaderError, Words
from ..io.files import read_capped
from .header import (
    INDEX_SUFFIX,
    KEY_ALIASES,
    KEY_FORMAT_VERSION,
    KEY_SHARD,
    KEY_WEIGHTS_SHA256,
    MAX_INDEX_BYTES,
    Header,
    check_metadata,
    read_header,
    shard_of,
)

__all__ = [
    "find_checkpoint",
    "is_foreign_index",
    "is_index",
    "parse_size",
    "resolve_checkpoint_path",
    "shard_names",
    "without_shards",
    "write_sharded",
]

logger = logging.getLogger("ckptfmt")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size such as "2GB" (10**9, as transformers reads it) or "512MiB".

    Example:
        >>> parse_size("2GB"), parse_size("1.5GiB"), parse_size(4096)
        (2000000000, 1610612736, 4096)
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None or float(match.group(1)) <= 0:
        must = f" must be a positive number of bytes or a size such as '2GB', not {size!r}"
        raise ConfigError(Words("max_shard_size" + must, "--max-shard-size" + must))
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def shard_names(stem: str, count: int) -> list[str]:
    """`stem-00001-of-0000N.safetensors`, ..., as transformers names them."""
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def is_index(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(INDEX_SUFFIX)


def is_foreign_index(path: Path) -> bool:
    """Whether `path` is the index of a sharded checkpoint that ckptfmt did not write (no ckptfmt
    metadata): a source to convert, as a .pth is. A broken index says so when it is read."""
    if not is_index(path) or not path.is_file():
        return False
    try:
        document = json.loads(read_capped(path, limit=MAX_INDEX_BYTES, what="a checkpoint index", error=HeaderError))
        return KEY_FORMAT_VERSION not in (document.get("metadata") or {})
    except (HeaderError, ValueError, AttributeError):
        return True


def find_checkpoint(folder: Path) -> Path:
    """The checkpoint a folder holds: its one index, or its one .safetensors (optimizer and
    other companions aside)."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes:
        files = [p for p in sorted(folder.glob("*.safetensors"))
                 if not re.search(r"-\d{5}-of-\d{5}\.safetensors$", p.name) and p.name.count(".") == 1]
        if len(files) == 1:
            return files[0]
    found = ", ".join(p.name for p in indexes) or "no checkpoint"
    raise CheckpointNotFoundError(
        f"is a folder holding {found}; give the checkpoint file or index inside it", path=folder,
    )


def without_shards(paths: list[Path]) -> list[Path]:
    """`paths` less the shards of an index among them: a folder walk then sees a sharded
    checkpoint once, as its index. A file leaves the list only when it is a shard of that index
    (`header.shard_of`): an index that names itself, another index or a checkpoint of its own
    hides none of them, and each is still checked on its own."""
    listed, named = set(paths), set()
    for path in paths:
        if is_index(path):
            try:
                document = json.loads(read_capped(path, limit=MAX_INDEX_BYTES, what="a checkpoint index", error=HeaderError))
                shards = {path.parent / shard for shard in document["weight_map"].values() if isinstance(shard, str)}
            except (HeaderError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a broken index is reported when it is read; its shards stay listed
            named.update(shard for shard in shards if shard in listed and _is_shard_of(shard, path))
    return [path for path in paths if path not in named]


def _is_shard_of(path: Path, index: Path) -> bool:
    if is_index(path) or path.parent != index.parent:
        return False
    try:
        return shard_of(read_header(path), index)
    except CkptfmtError:
        return False  # a file that cannot be read as a shard is reported on its own


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """The file to read. `NAME.pth` that was saved as `NAME.safetensors` (as
    save_model_with_config does), or as shards with `NAME.safetensors.index.json`, is found
    there, so the seed's paths keep working; a folder gives the one checkpoint it holds."""
    path = Path(path)
    try:
        if path.is_dir():
            return find_checkpoint(path)
        if path.exists() or path.is_symlink():  # a link loop too: opening it says what it is
            return path
    except OSError:
        return path  # it cannot even be looked at (a folder on its way is locked): opening it says so, by name
    if path.suffix in (".pth", ".pt"):
        for saved_as in (path.with_suffix(".safetensors"), path.with_suffix(".safetensors.index.json")):
            if saved_as.exists():
                logger.info("%s: reading %s, which it was saved as", path, saved_as)
                return saved_as
    raise CheckpointNotFoundError("no such file", path=path)


def write_sharded(
    path: Path, state_dict: Mapping[str, Any], metadata: Mapping[str, str], *, max_shard_size: int,
    overwrite: bool = False, fill_in: Mapping[str, Any] | None = None,
    sources: Mapping[str, tuple[int, int]] | None = None, sync_folder: bool = True,
) -> str:
    """Write a state dict as shards of at most `max_shard_size` bytes (a tensor larger than that
    gets a shard of its own) and their index at `path` (NAME.safetensors.index.json).

    Each shard is written as every ckptfmt file is (atomically, read back and compared); the
    index is written last, so a crash leaves no index that names a missing shard, and the
    shards this call wrote are removed when it fails. Shards of an earlier save of the same
    name that the new index does not name are removed once it is written.

    `fill_in` and `sources` are as for `write_safetensors`: each shard gets them, and the index
    the filled-in values. The whole state dict's digest is computed from the shards as written,
    so memory stays bounded when the tensors are copied from a mapped source.

    Returns:
        The canonical digest of the whole state dict (in the index's metadata).
    """
    from ..io.atomic import atomic_write, check_writable, write_all
    from .digest import digest_file
    from .writer import split_aliases, write_safetensors

    stem = path.name[: -len(INDEX_SUFFIX)]
    stored, aliases = split_aliases(state_dict)
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in stored.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    names = shard_names(stem, len(groups))
    check_writable(path, overwrite=overwrite)
    for name in names:
        check_writable(path.parent / name, overwrite=overwrite)
    shard_metadata = {key: value for key, value in metadata.items() if key not in (KEY_WEIGHTS_SHA256, KEY_ALIASES)}
    written: list[Path] = []
    try:
        weight_map = {}
        for number, (name, group) in enumerate(zip(names, groups), start=1):
            belongs = json.dumps({"index": path.name, "shard": number, "of": len(groups)}, sort_keys=True)
            write_safetensors(path.parent / name, {n: stored[n] for n in group},
                              {**shard_metadata, KEY_SHARD: belongs}, overwrite=overwrite, sync_folder=sync_folder,
                              fill_in={k: v for k, v in (fill_in or {}).items() if k in json.dumps(shard_metadata)},
                              sources={n: span for n, span in (sources or {}).items() if n in group})
            written.append(path.parent / name)
            weight_map.update({tensor: name for tensor in group})
        index_metadata = dict(metadata)
        for stand_in, future in (fill_in or {}).items():
            index_metadata = {key: value.replace(stand_in, future.result()) for key, value in index_metadata.items()}
        if aliases:
            index_metadata[KEY_ALIASES] = json.dumps(aliases, sort_keys=True)
        written_header = Header(path, 0, 0, {t: info for shard in written for t, info in read_header(shard).tensors.items()},
                                {**index_metadata, KEY_WEIGHTS_SHA256: ""}, tuple(written))
        digest = index_metadata[KEY_WEIGHTS_SHA256] = digest_file(written_header)
        check_metadata(index_metadata, path)
        total = sum(t.numel() * t.element_size() for t in stored.values())
        document = {"metadata": {"total_size": total, **index_metadata}, "weight_map": dict(sorted(weight_map.items()))}
        with atomic_write(path, overwrite=overwrite, sync_folder=sync_folder) as fd:
            write_all(fd, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    except BaseException:
        for shard in written:
            shard.unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f"{_glob_escape(stem)}-*-of-*.safetensors"):
        if stale.name not in names and re.fullmatch(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.safetensors", stale.name):
            stale.unlink(missing_ok=True)
    return digest


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", text)
