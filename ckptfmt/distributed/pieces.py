"""What each rank holds of a tensor (its `Piece`), and a check that replicated tensors (BatchNorm
statistics, an optimizer's step) agree across ranks.

A tensor sharded along its first dimension over a one-dimensional mesh of all ranks (FSDP2's
layout, `Shard(0)`) is held as rows: each rank writes its own rows at their place in the file
(`shards`), so nothing of it travels between ranks. A replicated tensor is its owner's own
copy. Any other layout (a 2-D mesh, `Shard(1)`, tensor parallelism) is assembled on its owner
by DTensor's own `full_tensor()`, which every rank takes part in and all but the owner drop.

A background save snapshots the pieces (`piece_of`) and writes from the copies while training
goes on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Piece", "assembled", "is_replicated", "piece_of", "replica_digests", "row_bounds"]


def is_replicated(tensor: Any) -> bool:
    """Whether every rank holds the whole of `tensor`: a plain tensor, or a DTensor whose
    placements are all `Replicate`."""
    from torch.distributed.tensor import DTensor, Replicate

    return not isinstance(tensor, DTensor) or all(isinstance(p, Replicate) for p in tensor.placements)


@dataclass(frozen=True)
class Piece:
    """What one rank holds of a tensor, to write.

    Attributes:
        local: with `rows`, this rank's rows of it; otherwise the whole tensor on its owner
            (a replicated tensor, or one assembled by `full_tensor()`), None elsewhere.
        shape: the tensor's global shape.
        rows: whether `local` is a dim-0 shard (torch.chunk's split over all ranks), which
            each rank writes at its place in the owner's file.
    """

    local: torch.Tensor | None
    shape: tuple[int, ...]
    rows: bool


def piece_of(tensor: Any, owner: int) -> Piece:
    """This rank's piece of `tensor` (a tensor or a DTensor) for the rank `owner`. Every rank calls
    it, for the same tensors in the same order: a layout other than rows is assembled here, by
    DTensor's `full_tensor()`, which every rank takes part in.

    Example:
        >>> piece_of(state["dec.0.weight"], owner=1).rows    # FSDP2's Shard(0)
        True
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    shape = tuple(tensor.shape)
    if is_replicated(tensor):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return Piece(local.detach() if rank == owner else None, shape, rows=False)
    if not assembled(tensor):
        return Piece(tensor.to_local().detach(), shape, rows=True)
    whole = tensor.full_tensor()
    return Piece(whole.detach() if rank == owner else None, shape, rows=False)


def assembled(tensor: Any) -> bool:
    """Whether `piece_of` assembles `tensor` with `full_tensor()`, a collective: a DTensor neither
    replicated nor held as rows (`Shard(0)` over a one-dimensional mesh of all ranks)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    if is_replicated(tensor):
        return False
    mesh = tensor.device_mesh
    return not (mesh.ndim == 1 and mesh.mesh.tolist() == list(range(dist.get_world_size()))
                and tuple(tensor.placements) == (Shard(0),))


def row_bounds(piece: Piece, rank: int, world: int) -> list[tuple[int, int]]:
    """Each rank's rows of a dim-0 sharded tensor, as torch.chunk splits them (ceil(n / world)
    rows each, the last ones shorter or empty), checked against this rank's piece."""
    rows = piece.shape[0]
    step = -(-rows // world) if rows else 0
    bounds = [(min(r * step, rows), min((r + 1) * step, rows)) for r in range(world)]
    if piece.local.shape[0] != bounds[rank][1] - bounds[rank][0]:
        raise ConfigError(
            f"a tensor of {rows} rows is sharded {piece.local.shape[0]} rows to rank {rank}, not as torch.chunk "
            "splits it; shard it with DTensor's Shard(0) (FSDP2's fully_shard)"
        )
    return bounds


def replica_digests(state: Mapping[str, Any]) -> dict[str, str]:
    """SHA-256 of each replicated tensor's bytes, by name: what the ranks compare to agree that
    they hold the same values (`check_replicas`).

    Example:
        >>> replica_digests({"bn.running_mean": torch.zeros(4)})
        {'bn.running_mean': '...'}
    """
    from torch.distributed.tensor import DTensor

    from ..format.writer import tensor_bytes

    digests = {}
    for name, tensor in state.items():
        if is_replicated(tensor):
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            digests[name] = hashlib.sha256(tensor_bytes(local)).hexdigest()
    return digests
