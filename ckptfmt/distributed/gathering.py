"""A whole tensor on the rank that owns it, from the pieces the ranks hold; and a check that
replicated tensors (BatchNorm statistics, an optimizer's step) agree across ranks.

Only the owner receives: a tensor sharded along its first dimension over a one-dimensional mesh
of all ranks (FSDP2's layout, `Shard(0)`) comes to its owner by torch's point-to-point `send`
and `recv`, each rank's rows straight into their place in the owner's tensor, which is all the
memory it takes. torch's `gather` would do the same in one call, but its gloo backend receives
into a flat buffer of its own and copies out of it: twice the tensor at the owner (measured:
150 MB gathered cost 300 MB of peak memory, against 150 MB this way). Any other layout (a 2-D
mesh, `Shard(1)`, tensor parallelism) is assembled by DTensor's own `full_tensor()`, which
every rank takes part in and all but the owner drop. A replicated tensor is the owner's own.

What a rank contributes is its `Piece` of each tensor (`piece_of`), so that a background save can
snapshot the pieces and gather from the copies while training goes on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Piece", "gather_to_owner", "is_replicated", "piece_of", "replica_digests"]


def is_replicated(tensor: Any) -> bool:
    """Whether every rank holds the whole of `tensor`: a plain tensor, or a DTensor whose
    placements are all `Replicate`."""
    from torch.distributed.tensor import DTensor, Replicate

    return not isinstance(tensor, DTensor) or all(isinstance(p, Replicate) for p in tensor.placements)


@dataclass(frozen=True)
class Piece:
    """What one rank holds of a tensor, to send to its owner or to keep.

    Attributes:
        local: with `rows`, this rank's rows of it; otherwise the whole tensor on its owner
            (a replicated tensor, or one assembled by `full_tensor()`), None elsewhere.
        shape: the tensor's global shape.
        rows: whether `local` is a dim-0 shard (torch.chunk's split over all ranks), which
            `gather_to_owner` sends to the owner.
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
    from torch.distributed.tensor import DTensor, Shard

    rank = dist.get_rank()
    shape = tuple(tensor.shape)
    if is_replicated(tensor):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return Piece(local.detach() if rank == owner else None, shape, rows=False)
    mesh = tensor.device_mesh
    if mesh.ndim == 1 and mesh.mesh.tolist() == list(range(dist.get_world_size())) \
            and tuple(tensor.placements) == (Shard(0),):
        return Piece(tensor.to_local().detach(), shape, rows=True)
    whole = tensor.full_tensor()
    return Piece(whole.detach() if rank == owner else None, shape, rows=False)


def gather_to_owner(piece: Piece, owner: int, *, group: Any = None) -> torch.Tensor | None:
    """The whole tensor on the CPU of rank `owner`, None elsewhere. Every rank calls it, for the
    same tensors in the same order; rows travel through `group` (the default group when None),
    which spans all ranks.

    Example:
        >>> weight = gather_to_owner(piece_of(state["dec.0.weight"], owner=1), owner=1)   # on rank 1
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    if not piece.rows:
        return piece.local.to("cpu") if rank == owner else None
    return _rows_to_owner(piece, owner, rank, group)


def _rows_to_owner(piece: Piece, owner: int, rank: int, group: Any) -> torch.Tensor | None:
    """Dim-0 shards (torch.chunk's split: ceil(n / world) rows each, the last ones shorter or
    empty) sent to the owner, which receives each into its rows of the whole tensor."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    rows = piece.shape[0]
    step = -(-rows // world) if rows else 0
    bounds = [(min(r * step, rows), min((r + 1) * step, rows)) for r in range(world)]
    local = piece.local
    if local.shape[0] != bounds[rank][1] - bounds[rank][0]:
        raise ConfigError(
            f"a tensor of {rows} rows is sharded {local.shape[0]} rows to rank {rank}, not as torch.chunk splits "
            "it; shard it with DTensor's Shard(0) (FSDP2's fully_shard)"
        )
    if rank != owner:
        if local.numel():
            dist.send(local.contiguous(), dst=owner, group=group)
        return None
    whole = torch.empty(piece.shape, dtype=local.dtype)
    for source, (start, end) in enumerate(bounds):
        if start == end:
            continue
        if source == rank:
            whole[start:end].copy_(local)
        elif local.device.type == "cpu":
            dist.recv(whole[start:end], src=source, group=group)
        else:  # a GPU backend receives into device memory
            received = torch.empty((end - start, *piece.shape[1:]), dtype=local.dtype, device=local.device)
            dist.recv(received, src=source, group=group)
            whole[start:end].copy_(received)
    return whole


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
