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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, CkptfmtError, ConfigError, HeaderError, Words, WriteError
from ..io.files import read_capped
from ..io.transaction import Transaction, finish_pending
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
    "check_shard_names",
    "find_checkpoint",
    "is_foreign_index",
    "is_index",
    "parse_size",
    "resolve_checkpoint_path",
    "shard_names",
    "without_shards",
    "write_index",
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
    # An optimizer's companion written as shards has an index too (companion.OPTIMIZER_SUFFIX): not a checkpoint.
    indexes = [p for p in sorted(folder.glob(f"*{INDEX_SUFFIX}")) if not p.name.endswith(".optimizer" + INDEX_SUFFIX)]
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
    there, so the seed's paths keep working; so is `NAME.safetensors` saved as shards (as
    `ckptfmt.distributed.save` saves it). A folder gives the one checkpoint it holds."""
    path = Path(path)
    try:
        if path.is_dir():
            return find_checkpoint(path)
        if path.exists() or path.is_symlink():  # a link loop too: opening it says what it is
            return path
        # A first save killed past its commit point has not renamed its main file yet (it goes last).
        finish_pending(path)
        if path.exists():
            return path
    except OSError:
        return path  # it cannot even be looked at (a folder on its way is locked): opening it says so, by name
    if path.suffix in (".pth", ".pt", ".safetensors"):
        for saved_as in (path.with_suffix(".safetensors"), path.with_suffix(".safetensors.index.json")):
            finish_pending(saved_as)
            if saved_as.exists():
                logger.info("%s: reading %s, which it was saved as", path, saved_as)
                return saved_as
    raise CheckpointNotFoundError("no such file", path=path)


def write_sharded(
    path: Path, state_dict: Mapping[str, Any], metadata: Mapping[str, str], *, max_shard_size: int,
    overwrite: bool = False, fill_in: Mapping[str, Any] | None = None,
    sources: Mapping[str, tuple[int, int]] | None = None, sync_folder: bool = True,
    transaction: Transaction | None = None,
) -> str:
    """Write a state dict as shards of at most `max_shard_size` bytes (a tensor larger than that
    gets a shard of its own) and their index at `path` (NAME.safetensors.index.json).

    Each shard is written as every ckptfmt file is (read back and compared), and the shards and
    the index take their names together, in one transaction: `transaction`, the checkpoint's,
    or one of their own when it is None. With `overwrite`, the shards that the previous index
    of the same name named and the new one does not are removed with the commit; no other file
    is ever removed.

    `fill_in` and `sources` are as for `write_safetensors`: each shard gets them, and the index
    the filled-in values. The whole state dict's digest is computed from the shards as written,
    so memory stays bounded when the tensors are copied from a mapped source.

    Returns:
        The canonical digest of the whole state dict (in the index's metadata).
    """
    from ..io.atomic import check_writable
    from .writer import split_aliases, write_safetensors

    if transaction is None:
        with Transaction(path.parent, path.name) as own:
            return write_sharded(path, state_dict, metadata, max_shard_size=max_shard_size, overwrite=overwrite,
                                 fill_in=fill_in, sources=sources, transaction=own)
    digests: dict[str, bytes] = {}
    stem = path.name[: -len(INDEX_SUFFIX)]
    stored, aliases = split_aliases(state_dict)
    groups = _groups(stored, max_shard_size)
    names = shard_names(stem, len(groups))
    check_shard_names(path, names)
    check_writable(path, overwrite=overwrite)
    for name in names:
        check_writable(path.parent / name, overwrite=overwrite)
    shard_metadata = {key: value for key, value in metadata.items() if key not in (KEY_WEIGHTS_SHA256, KEY_ALIASES)}
    written: list[tuple[Path, str]] = []
    for number, (name, group) in enumerate(zip(names, groups), start=1):
        belongs = json.dumps({"index": path.name, "shard": number, "of": len(groups)}, sort_keys=True)
        write_safetensors(path.parent / name, {n: stored[n] for n in group},
                          {**shard_metadata, KEY_SHARD: belongs}, overwrite=overwrite, transaction=transaction,
                          fill_in={k: v for k, v in (fill_in or {}).items() if k in json.dumps(shard_metadata)},
                          sources={n: span for n, span in (sources or {}).items() if n in group}, digests=digests)
        written.append((transaction.staged[-1][0], name))
    index_metadata = dict(metadata)
    for stand_in, future in (fill_in or {}).items():
        index_metadata = {key: value.replace(stand_in, future.result()) for key, value in index_metadata.items()}
    return write_index(path, written, index_metadata, digests=digests, aliases=aliases, overwrite=overwrite,
                       transaction=transaction)


def write_index(
    path: Path, shards: Sequence[tuple[Path, str]], metadata: Mapping[str, str], *, transaction: Transaction,
    digests: Mapping[str, bytes], aliases: Mapping[str, str] | None = None, overwrite: bool = False,
) -> str:
    """Stage the index at `path` of shards already staged in `transaction`, each given as (the
    file it is staged as, its name in the set): its weight map, total size and metadata, with
    the ties recorded and the digest of the whole state dict, put together from `digests`, the
    full digest of each stored tensor that the shards' writers computed as they read them back
    (`write_safetensors`' `digests`): only the shards' headers are read.
    With `overwrite`, the shards of the previous index of the same name that the new set does
    not name are removed with the commit. The shards may have been staged by other processes
    (the ranks of `ckptfmt.distributed.save`) and adopted.

    Returns:
        The canonical digest of the whole state dict (in the index's metadata).

    Example:
        >>> write_index(folder / "m.safetensors.index.json", [(temp, "m-00001-of-00001.safetensors")],
        ...             metadata, digests=digests, transaction=transaction)
        '3b1f...'
    """
    from ..io.atomic import write_all
    from .digest import compose_digest

    names = [name for _, name in shards]
    stale = [path.parent / name for name in _previous_shards(path) if name not in names] if overwrite else []
    headers = [(read_header(file), name) for file, name in shards]
    tensors = {tensor: info for header, _ in headers for tensor, info in header.tensors.items()}
    weight_map = {tensor: name for header, name in headers for tensor in header.tensors}
    index_metadata = dict(metadata)
    if aliases:
        index_metadata[KEY_ALIASES] = json.dumps(dict(aliases), sort_keys=True)
    written_header = Header(path, 0, 0, tensors, {**index_metadata, KEY_WEIGHTS_SHA256: ""},
                            tuple(file for file, _ in shards))
    digest = index_metadata[KEY_WEIGHTS_SHA256] = compose_digest(written_header, digests)
    check_metadata(index_metadata, path)
    total = sum(info.nbytes for info in tensors.values())
    document = {"metadata": {"total_size": total, **index_metadata}, "weight_map": dict(sorted(weight_map.items()))}
    with transaction.stage(path, overwrite=overwrite) as fd:
        write_all(fd, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    for shard in stale:
        transaction.remove(shard)
    return digest


def _groups(stored: Mapping[str, Any], max_shard_size: int) -> list[list[str]]:
    """Tensor names in shards of at most `max_shard_size` bytes, a larger tensor alone."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in stored.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def check_shard_names(index: Path, names: Sequence[str] = ()) -> None:
    """Refuse, before anything is written, an index or shard name over the file system's limit:
    those names follow Hugging Face's convention, which other tools rely on, so they are not
    shortened as ckptfmt's hidden names are."""
    from ..io.folder import NAME_MAX, name_fits

    stem = index.name[: -len(INDEX_SUFFIX)]
    longest = max([index.name, *names, *shard_names(stem, 1)], key=lambda n: len(os.fsencode(n)))
    if not name_fits(longest):
        over = len(os.fsencode(longest)) - NAME_MAX
        raise WriteError(
            f"its shards would be named like {longest[:40]}..., {len(os.fsencode(longest))} bytes, over the file "
            f"system's limit of {NAME_MAX}",
            path=index.with_name(stem + ".safetensors"),
            fix=f"give it a name at least {over} bytes shorter, or write it unsharded",
        )


def _previous_shards(index: Path) -> list[str]:
    """The shard names that the index at `index` names (none when there is no readable one):
    the only files of the previous set that a new save of it may remove."""
    try:
        document = json.loads(read_capped(index, limit=MAX_INDEX_BYTES, what="a checkpoint index", error=HeaderError))
        shards = document["weight_map"].values()
    except (CheckpointNotFoundError, HeaderError, ValueError, KeyError, TypeError, AttributeError, OSError):
        return []
    return sorted({shard for shard in shards if isinstance(shard, str) and re.fullmatch(
        rf"{re.escape(index.name[: -len(INDEX_SUFFIX)])}-\d{{5}}-of-\d{{5}}\.safetensors", shard)})
