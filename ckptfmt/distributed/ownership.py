"""Which rank writes which tensor, into which shard: the plan of a distributed save.

Every rank computes the same plan on its own, from what every rank knows alike: each tensor's
name, global shape and dtype (a DTensor's shape is the global one), and the model's ties (one
parameter under several names, as a tied embedding is), which the caller gives: a tie is one
entry, stored under the first of its names in sorted order and recorded as an alias, as the
writer stores ties. Owners
are given by balancing bytes: the largest tensor first, each to the rank that owns the fewest
bytes so far (the lowest rank on a tie). Each rank's tensors, in name order, fill shards of at
most `shard_bytes` (a larger tensor alone); shards are numbered rank by rank, so the file names
(`NAME-0000K-of-0000N.safetensors`) are known before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Plan", "model_ties", "plan_shards"]


@dataclass(frozen=True)
class Plan:
    """Who writes what.

    Attributes:
        owners: stored tensor name -> the rank that writes it.
        aliases: tied name -> the stored name it is written under.
        shards: one list of stored names per shard, in shard order.
        shard_owners: the rank that writes each shard.
        sizes: stored tensor name -> bytes.
        fingerprint: a digest of the names, shapes, dtypes and ties the plan was made from; two
            ranks with the same fingerprint made the same plan.
    """

    owners: dict[str, int]
    aliases: dict[str, str]
    shards: list[list[str]]
    shard_owners: list[int]
    sizes: dict[str, int]
    fingerprint: str

    def shards_of(self, rank: int) -> list[int]:
        """The indexes (0-based) of the shards `rank` writes."""
        return [number for number, owner in enumerate(self.shard_owners) if owner == rank]


def plan_shards(state: Mapping[str, Any], world: int, *, shard_bytes: int,
                ties: Mapping[str, str] | None = None) -> Plan:
    """The plan of writing `state` (tensors or DTensors) from `world` ranks; `ties` maps a
    name of `state` to the stored name it is tied to (see `model_ties`).

    Example:
        >>> plan = plan_shards(get_model_state_dict(model), dist.get_world_size(), shard_bytes=64 << 20)
        >>> plan.shards[plan.shards_of(dist.get_rank())[0]]
        ['dec.0.weight', 'enc.0.weight']
    """
    aliases = {name: stored for name, stored in (ties or {}).items() if name in state and stored in state}
    stored = [name for name in sorted(state) if name not in aliases]
    sizes = {name: math.prod(state[name].shape) * state[name].element_size() for name in stored}
    loads = [0] * world
    owners: dict[str, int] = {}
    for name in sorted(stored, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += sizes[name]
    shards: list[list[str]] = []
    shard_owners: list[int] = []
    for rank in range(world):
        size = 0
        for name in sorted(n for n in stored if owners[n] == rank):
            if not shards or shard_owners[-1] != rank or (shards[-1] and size + sizes[name] > shard_bytes):
                shards.append([])
                shard_owners.append(rank)
                size = 0
            shards[-1].append(name)
            size += sizes[name]
    described = [[name, list(state[name].shape), str(state[name].dtype), aliases.get(name)] for name in sorted(state)]
    fingerprint = hashlib.sha256(json.dumps([world, shard_bytes, described]).encode()).hexdigest()
    return Plan(owners, aliases, shards, shard_owners, sizes, fingerprint)


def model_ties(model: Any) -> dict[str, str]:
    """`{name: stored name}` for the model's tied parameters and buffers: each name of one
    object after the first (in sorted order) maps to the first. From the module tree, which is
    alike on every rank (a state dict's tensors are fresh objects for each name).

    Example:
        >>> model_ties(model)
        {'head.weight': 'embed.weight'}
    """
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name.replace("_checkpoint_wrapped_module.", ""))
    ties: dict[str, str] = {}
    for group in names.values():
        group = sorted(set(group))
        ties.update({alias: group[0] for alias in group[1:]})
    return ties
