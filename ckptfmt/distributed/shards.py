"""Each rank's part of a distributed save: gather the tensors it owns, one at a time, and write
them into its shards, staged in its own transaction.

The ranks walk one schedule, the same on all of them: turns of one tensor per owner (rank 0's
first, rank 1's first, ...; then the seconds), so that every rank has a shard filling from the
start, and the transfers of a turn run at once (`gather_to_owners`). The writing
runs on a thread of each rank's own, so that a rank writing a shard still sends its pieces of
the others' tensors, and the ranks write in parallel. A tensor is written from its pieces where
they lie: the owner's own rows in its model, the others' rows in the buffers they were received
into (`gather_to_owners`). Beyond its own, a rank holds at most `budget` bytes of what it
received (the shard size; or one larger tensor's alone): before it gathers one more tensor, it
waits for its writer to finish a shard, which frees that shard's buffers.

A failed write does not stop the schedule (the other ranks are waiting for this rank's pieces):
it is kept, the rest of this rank's tensors are gathered and dropped, and the error is reported
with the staged files for rank 0 to decide (see `saving`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..format.header import INDEX_SUFFIX, KEY_SHARD
from ..format.index import shard_names
from .gathering import Piece, gather_to_owners, piece_of
from .ownership import Plan

if TYPE_CHECKING:
    import torch

    from ..io.transaction import Transaction

__all__ = ["Part", "write_owned"]


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


def write_owned(parts: list[Part], rank: int, transaction: Transaction, *, overwrite: bool,
                budget: int, group: Any = None) -> tuple[BaseException | None, dict[str, dict[str, bytes]]]:
    """Gather this rank's tensors of every part and stage its shards in `transaction`; every
    rank calls it. Rows travel through `group` (the default group when None). Returns the error
    of a failed write (the files staged before it stay staged, for rank 0 to remove) or None,
    and the full digest of each tensor written, by part (its index's name), from which rank 0
    puts the digest of the whole set together (`write_index`).

    Example:
        >>> error, digests = write_owned([weights], dist.get_rank(), transaction, overwrite=True, budget=64 << 20)
    """
    writer = _ShardWriter(transaction, overwrite, budget)
    held: dict[tuple[int, int], dict[str, _Gathered]] = {}
    try:
        for turn in _schedule(parts):
            pieces = []
            for part_number, shard, name in turn:
                part = parts[part_number]
                owner = part.plan.shard_owners[shard]
                value = part.tensors[name]
                piece = value if isinstance(value, Piece) else piece_of(value, owner)
                if owner == rank:
                    gathering = sum(tensor.extra for tensor in held.get((part_number, shard), {}).values())
                    writer.make_room(_extra(piece, part.plan.sizes[name]), gathering)
                pieces.append((piece, owner))
            for (part_number, shard, name), (piece, _), got in zip(turn, pieces, gather_to_owners(pieces, group=group)):
                if got is None:
                    continue
                part = parts[part_number]
                tensors = held.setdefault((part_number, shard), {})
                tensors[name] = _Gathered(piece.shape, got, _extra(piece, part.plan.sizes[name]))
                if len(tensors) == len(part.plan.shards[shard]):
                    writer.submit(part, shard, held.pop((part_number, shard)))
    finally:
        error = writer.finish()
    return error, writer.digests


def _schedule(parts: list[Part]) -> list[list[tuple[int, int, str]]]:
    """Turns of (part, shard, tensor name), in the order every rank gathers them: each rank's
    list of owned tensors (part by part, shard by shard, in name order), one of each rank's per
    turn, so that each turn has one tensor per owner and its transfers run at once."""
    queues: dict[int, list[tuple[int, int, str]]] = {}
    for part_number, part in enumerate(parts):
        for shard, (names, owner) in enumerate(zip(part.plan.shards, part.plan.shard_owners)):
            queues.setdefault(owner, []).extend((part_number, shard, name) for name in names)
    return [[queue[turn] for _, queue in sorted(queues.items()) if turn < len(queue)]
            for turn in range(max((len(queue) for queue in queues.values()), default=0))]


@dataclass(frozen=True)
class _Gathered:
    """A tensor on its owner: its shape, its pieces in order (`gather_to_owners`), and the bytes
    the gathering added to the rank's own (the rows received, or a whole tensor)."""

    shape: tuple[int, ...]
    pieces: list[torch.Tensor]
    extra: int


def _extra(piece: Piece, size: int) -> int:
    """What gathering the tensor of `size` bytes adds on its owner: the other ranks' rows, or
    the whole tensor (counted whole even when replicated: those are small)."""
    return size - piece.local.numel() * piece.local.element_size() if piece.rows else size


class _ShardWriter:
    """One thread writing this rank's shards in turn, and the count of gathered bytes not yet
    written, which `make_room` keeps under the budget."""

    def __init__(self, transaction: Transaction, overwrite: bool, budget: int) -> None:
        self._transaction, self._overwrite, self._budget = transaction, overwrite, budget
        self._queue: list[tuple[Part, int, dict[str, _Gathered]]] = []
        self._pending = 0  # bytes submitted and not yet written
        self._closed = False
        self.error: BaseException | None = None
        self.digests: dict[str, dict[str, bytes]] = {}  # by part's index name: each written tensor's full digest
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ckptfmt-shard-writer", daemon=True)
        self._thread.start()

    def make_room(self, size: int, gathering: int) -> None:
        """Wait until `size` more bytes fit beside those submitted and those being gathered
        (`gathering`), or nothing submitted is left to wait for."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending == 0 or self._pending + gathering + size <= self._budget)

    def submit(self, part: Part, shard: int, tensors: dict[str, _Gathered]) -> None:
        with self._changed:
            if self.error is not None:
                return  # dropped: this rank's save has failed; its pieces were still sent
            self._queue.append((part, shard, tensors))
            self._pending += sum(tensor.extra for tensor in tensors.values())
            self._changed.notify_all()

    def finish(self) -> BaseException | None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()
        return self.error

    def _run(self) -> None:
        import torch

        from ..format.writer import write_safetensors

        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                part, shard, tensors = self._queue[0]
            size = sum(tensor.extra for tensor in tensors.values())
            try:
                if self.error is None:
                    belongs = json.dumps({"index": part.index.name, "shard": shard + 1, "of": len(part.plan.shards)},
                                         sort_keys=True)
                    shapes = {name: torch.empty(tensor.shape, dtype=tensor.pieces[0].dtype, device="meta")
                              for name, tensor in tensors.items()}
                    write_safetensors(part.shard_path(shard), shapes, {**part.metadata, KEY_SHARD: belongs},
                                      overwrite=self._overwrite, transaction=self._transaction,
                                      digests=self.digests.setdefault(part.index.name, {}),
                                      pieces={name: tensor.pieces for name, tensor in tensors.items()})
            except BaseException as exc:  # reported to rank 0, which fails the save on every rank
                self.error = exc
            with self._changed:
                self._queue.pop(0)
                self._pending -= size
                del tensors
                self._changed.notify_all()
