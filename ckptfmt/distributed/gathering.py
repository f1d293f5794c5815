"""A whole tensor on the rank that owns it, from the pieces the ranks hold; and a check that
replicated tensors (BatchNorm statistics, an optimizer's step) agree across ranks.

Only the owner receives: a tensor sharded along its first dimension over a one-dimensional mesh
of all ranks (FSDP2's layout, `Shard(0)`) comes to its owner by torch's point-to-point `isend`
and `irecv`, as its rows in order: the owner's own where they lie, the rows before them and
those after each received straight into one buffer, which is all the memory it takes (half the
tensor on two ranks); the writer writes the pieces one after another (`write_safetensors`'
`pieces`), so the whole tensor is never assembled. Tensors of different owners travel at once. torch's `gather` would do the same
in one call, but its gloo backend receives into a flat buffer of its own and copies out of it:
twice the tensor at the owner (measured: 150 MB gathered cost 300 MB of peak memory, against
150 MB this way). Any other layout (a 2-D
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

__all__ = ["Piece", "gather_to_owners", "is_replicated", "piece_of", "replica_digests"]


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
            `gather_to_owners` sends to the owner.
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


def gather_to_owners(pieces: list[tuple[Piece, int]], *, group: Any = None) -> list[list[torch.Tensor] | None]:
    """Each (piece, owner) as the whole tensor's pieces, in order, on its owner (see the module's
    docstring; a tensor of another layout is one piece), None elsewhere. Every rank
    calls it with the same tensors, in the same order; their transfers run at once (each owner
    receiving its own, every rank sending its rows to each owner), so give it tensors of
    different owners. Rows travel through `group` (the default group, when None), which spans
    all ranks.

    Example:
        >>> gather_to_owners([(piece_of(state["a"], owner=0), 0), (piece_of(state["b"], owner=1), 1)])
        [[tensor([...]), tensor([...])], None]                  # on rank 0: its rows, rank 1's
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results: list[list[torch.Tensor] | None] = []
    transfers = []
    for piece, owner in pieces:
        if not piece.rows:
            results.append([piece.local] if rank == owner else None)
            continue
        bounds = _row_bounds(piece, rank, world)
        if rank != owner:
            if piece.local.numel():
                transfers.append(dist.isend(piece.local.contiguous(), dst=owner, group=group))
            results.append(None)
            continue
        own_start, own_end = bounds[rank]
        rows = piece.shape[0]
        # The rows before the owner's and those after: each one buffer, on the device they travel to.
        received = [torch.empty((end - start, *piece.shape[1:]), dtype=piece.local.dtype, device=piece.local.device)
                    for start, end in ((0, own_start), (own_end, rows))]
        for source, (start, end) in enumerate(bounds):
            if start != end and source != rank:
                buffer, offset = (received[0], 0) if start < own_start else (received[1], own_end)
                transfers.append(dist.irecv(buffer[start - offset:end - offset], src=source, group=group))
        results.append([received[0], piece.local, received[1]])
    for transfer in transfers:
        transfer.wait()
    return results


def _row_bounds(piece: Piece, rank: int, world: int) -> list[tuple[int, int]]:
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
