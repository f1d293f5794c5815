"""Each rank's part of a distributed save: every rank writes what it holds of each tensor straight
into the shard that tensor belongs to, and each shard's owner checks and seals its files.

Three steps, on every rank:
1. Lay out: each shard's owner lays its file out (`writer.layout_file`: the header, holding
   placeholders for the digests, and each tensor's place), stages it in its transaction at its
   full size, and the ranks tell each other where every file and tensor is (one
   `all_gather_object`).
2. Write: every rank writes its rows of each sharded tensor (FSDP2's `Shard(0)`) at their place
   in the tensor's file, and the tensors it owns whole (a replicated one); it reads back and
   compares what it wrote into files it does not own, and closes them before the exchange that
   ends the step, which is what a network file system's close-to-open consistency asks for the
   owner to read them. Nothing travels between
   ranks and nothing is gathered, so a rank holds no more than its own pieces, however many
   ranks there are. A tensor of another layout is assembled on its owner by DTensor
   (`full_tensor()`, in the same order on every rank), written, checked and dropped, one at a
   time. The ranks start at different files, so that they do not queue on one.
3. Seal: once every rank has written (one `all_gather_object` of failures), each owner reads
   its files back once, comparing its own pieces and hashing every tensor (the per-tensor
   digests, and the file's weights digest, filled into its header), and fsyncs them: every
   rank's bytes, as an fsync writes out a file's data whoever wrote it.

A failed step on one rank is reported at the next exchange and the ranks give up together; the
error and the staged files go to rank 0 (see `saving`), which fails the save on every rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..format.header import INDEX_SUFFIX, KEY_SHARD
from ..format.index import shard_names
from ..io.folder import is_temp
from .ownership import Plan
from .pieces import Piece, assembled, piece_of, row_bounds

if TYPE_CHECKING:
    import numpy as np

    from ..format.writer import Layout
    from ..io.transaction import Transaction

__all__ = ["Part", "write_shards"]

_Key = tuple[int, int]  # (part number, shard number)


@dataclass
class Part:
    """One sharded file set of a save: the weights, or the optimizer's companion.

    Attributes:
        index: the index the shards belong to (`NAME.safetensors.index.json`).
        tensors: name -> tensor or DTensor, as the ranks hold them, or this rank's `Piece` of
            it (a background save's snapshot).
        plan: who writes which shard (`plan_shards`).
        metadata: each shard's header metadata (its `ckptfmt.shard` is added).
    """

    index: Path
    tensors: Mapping[str, Any]
    plan: Plan
    metadata: dict[str, str]
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = shard_names(self.index.name.removesuffix(INDEX_SUFFIX), len(self.plan.shards))

    def shard_path(self, number: int) -> Path:
        return self.index.parent / self.names[number]


def write_shards(parts: list[Part], rank: int, transaction: Transaction, *, overwrite: bool,
                 group: Any = None) -> tuple[BaseException | None, dict[str, dict[str, bytes]]]:
    """Write this rank's pieces of every part and stage the shards it owns in `transaction`, in
    the three steps of the module's docstring; every rank calls it, and the ranks exchange
    through `group` (the default group when None). Returns this rank's error (the files it
    staged stay staged, for rank 0 to remove) or None, and the full digest of each tensor of its
    shards, by part (its index's name), from which rank 0 puts the digest of the whole set
    together (`write_index`).

    Example:
        >>> error, digests = write_shards([weights], dist.get_rank(), transaction, overwrite=True)
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    owned: dict[_Key, Layout] = {}
    error = None
    try:
        _lay_out(parts, rank, transaction, overwrite, owned)
    except BaseException as exc:  # reported to rank 0, which fails the save on every rank
        error = exc
    temps = {final: temp.name for temp, final in transaction.staged}
    mine = {key: (temps[layout.path], {name: position for name, (position, _) in layout.spans.items()})
            for key, layout in owned.items()}
    reports = _exchange((error is not None, mine), group)
    if any(failed for failed, _ in reports):
        return error, {}
    places = {key: place for _, theirs in reports for key, place in theirs.items()}
    writing = _Writing(parts, rank, world, transaction.folder, places, owned)
    error = writing.run()
    if any(_exchange(error is not None, group)):
        return error, {}
    digests: dict[str, dict[str, bytes]] = {}
    try:
        writing.seal(digests)
    except BaseException as exc:
        error = exc
    return error, digests


def _exchange(mine: Any, group: Any) -> list[Any]:
    import torch.distributed as dist

    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine, group=group)
    return reports


def _lay_out(parts: list[Part], rank: int, transaction: Transaction, overwrite: bool, owned: dict[_Key, Layout]) -> None:
    """Step 1 on this rank: lay out the shards it owns and stage each, its header written and its
    size set (the data a hole for the ranks to fill), into `owned`."""
    import torch

    from ..format.writer import layout_file
    from ..io.atomic import write_all

    for number, part in enumerate(parts):
        for shard in part.plan.shards_of(rank):
            belongs = json.dumps({"index": part.index.name, "shard": shard + 1, "of": len(part.plan.shards)},
                                 sort_keys=True)
            shapes = {}
            for name in part.plan.shards[shard]:
                value = part.tensors[name]
                dtype = value.local.dtype if isinstance(value, Piece) else value.dtype
                shapes[name] = torch.empty(tuple(value.shape), dtype=dtype, device="meta")
            layout = layout_file(part.shard_path(shard), shapes, {**part.metadata, KEY_SHARD: belongs})
            with transaction.stage(layout.path, overwrite=overwrite, durable=False) as fd:
                write_all(fd, layout.head)
                os.ftruncate(fd, layout.size)
            owned[(number, shard)] = layout


class _Writing:
    """Steps 2 (`run`) and 3 (`seal`) on this rank. `places`: every shard's temp file name and
    tensors' file offsets; `owned`: the layouts of this rank's own shards."""

    def __init__(self, parts: list[Part], rank: int, world: int, folder: Path, places: dict[_Key, tuple],
                 owned: dict[_Key, Layout]) -> None:
        self.parts, self.rank, self.world, self.folder = parts, rank, world, folder
        self.places, self.owned = places, owned
        # For the owner's read-back: each tensor of its shards as segments in file order, the
        # bytes it wrote itself (compared) or the count of bytes another rank wrote and checked.
        self.segments: dict[_Key, dict[str, list[np.ndarray | int]]] = {key: {} for key in owned}

    def run(self) -> BaseException | None:
        """Step 2: this rank's pieces written into their files; returns the first error (the
        collectives of assembling go on after one, as the other ranks wait in them)."""
        error = self._write_assembled()
        keys = [(number, shard) for number, part in enumerate(self.parts) for shard in range(len(part.plan.shards))]
        first = len(keys) * self.rank // self.world
        for key in keys[first:] + keys[:first]:
            if error is not None:
                break
            try:
                self._write_held(key)
            except BaseException as exc:
                error = self._failure(exc, key)
        return error

    def seal(self, digests: dict[str, dict[str, bytes]]) -> None:
        """Step 3: read back each of this rank's shards, compare its own pieces, hash every
        tensor, fill the digests into the header, fsync. The disk writes a file out while it is
        read back (its fsync starts first), and the fsync after the fill-in has a page left."""
        from ..format.writer import fill_in_header, read_back
        from ..io.background import helpers

        syncing = []
        try:
            for key, layout in self.owned.items():
                try:
                    fd = self._open(key)
                    try:
                        writing_out = helpers().submit(os.fsync, fd)
                        try:
                            digest, tensor_digests = read_back(fd, layout, self.segments[key])
                        finally:
                            writing_out.result()
                        fill_in_header(fd, layout, digest, tensor_digests, {})
                    except BaseException:
                        os.close(fd)
                        raise
                except BaseException as exc:
                    raise self._failure(exc, key) from None
                syncing.append((key, helpers().submit(_sync_and_close, fd)))
                digests.setdefault(self.parts[key[0]].index.name, {}).update(tensor_digests)
        finally:
            for key, future in syncing:
                try:
                    future.result()
                except OSError as exc:
                    raise self._failure(exc, key) from None

    def _write_assembled(self) -> BaseException | None:
        """The tensors of other layouts, in plan order on every rank: assembled on the owner,
        written, checked and dropped there."""
        from ..format.writer import check_written, tensor_bytes, write_at

        error = None
        for number, part in enumerate(self.parts):
            for shard, (names, owner) in enumerate(zip(part.plan.shards, part.plan.shard_owners)):
                for name in names:
                    value = part.tensors[name]
                    if isinstance(value, Piece) or not assembled(value):
                        continue
                    piece = piece_of(value, owner)  # every rank takes part
                    if owner != self.rank or error is not None:
                        continue
                    self.segments[(number, shard)][name] = [part.plan.sizes[name]]  # checked here
                    try:
                        fd = self._open((number, shard))
                        try:
                            data = tensor_bytes(piece.local)
                            write_at(fd, self.places[(number, shard)][1][name], [data])
                            check_written(fd, self.places[(number, shard)][1][name], [data], part.shard_path(shard),
                                          name)
                        finally:
                            os.close(fd)
                    except BaseException as exc:
                        error = self._failure(exc, (number, shard))
                    del piece
        return error

    def _write_held(self, key: _Key) -> None:
        """Write this rank's pieces of the tensors of one shard, and check them in a file of
        another rank (its owner checks its own in `seal`, and fsyncs the file: what every rank
        wrote into it)."""
        from ..format.writer import check_written, tensor_bytes, write_at

        number, shard = key
        part = self.parts[number]
        owner = part.plan.shard_owners[shard]
        positions = self.places[key][1]
        fd = None
        try:
            for name in part.plan.shards[shard]:
                value = part.tensors[name]
                if not isinstance(value, Piece) and assembled(value):
                    continue
                piece = value if isinstance(value, Piece) else piece_of(value, owner)
                if piece.local is None:
                    continue
                data = tensor_bytes(piece.local)
                offset = 0
                if piece.rows and piece.shape[0]:
                    start, _ = row_bounds(piece, self.rank, self.world)[self.rank]
                    offset = start * (part.plan.sizes[name] // piece.shape[0])
                if owner == self.rank:
                    after = part.plan.sizes[name] - offset - data.nbytes
                    self.segments[key][name] = [segment for segment in (offset, data, after)
                                                if not isinstance(segment, int) or segment]
                if not data.nbytes:
                    continue
                fd = self._open(key) if fd is None else fd
                write_at(fd, positions[name] + offset, [data])
                if owner != self.rank:  # checked while its bytes are at hand (a copy, when not contiguous)
                    check_written(fd, positions[name] + offset, [data], part.shard_path(shard), name)
        finally:
            if fd is not None:
                os.close(fd)

    def _failure(self, exc: BaseException, key: _Key) -> BaseException:
        """What to report of `exc`, raised writing the shard `key`: an OSError said as a
        WriteError about the shard, anything else as it is."""
        from ..errors import WriteError
        from ..io.atomic import write_error

        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            return write_error(exc, self.parts[key[0]].shard_path(key[1]), "writing failed")
        return exc

    def _open(self, key: _Key) -> int:
        """The staged file of a shard, by the temp name its owner sent: a temp file of the folder."""
        temp = self.places[key][0]
        if os.path.basename(temp) != temp or not is_temp(temp):
            raise ValueError(f"{temp!r} is not a ckptfmt temp file name")
        return os.open(self.folder / temp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
