"""Saving a sharded model without gathering it (`save`): every rank writes what it holds of each
tensor into the shard that tensor belongs to, in parallel, and rank 0 commits the set.

1. Every rank takes torch's sharded state dicts (`get_model_state_dict`, and
   `get_optimizer_state_dict` when an optimizer is given) and makes the same plan on its own
   (`ownership.plan_shards`: owners by balanced bytes, shard names known in advance). The
   ranks check with one `all_gather_object` that their plans agree and that their replicated
   tensors (BatchNorm statistics, an optimizer's step) hold the same values, a digest of each.
2. Rank 0 decides the config, the training record and the provenance, and checks what a save
   checks before writing (shapes against the config, existing files, the sidecar); its
   verdict reaches every rank (`broadcast_object_list`), so a refusal is raised everywhere.
3. Every rank writes what it holds of each tensor (its rows of a sharded one) straight into the
   shard the tensor belongs to, which the shard's owner laid out and staged in a `Transaction`
   of its own; then each owner reads its shards back once, compares and digests them, and
   fsyncs them (`shards.write_shards`). Nothing is gathered.
4. `gather_object` brings rank 0 every rank's staged temp names and errors. Rank 0 adopts the
   temps into its transaction, writes the companion's index, the index (whose digest of the
   whole state is put together from the per-tensor digests each rank's writer computed in its
   read-back, sent with the temp names, as `write_sharded` puts it together) and the
   sidecar, and commits: a kill of any rank before the commit record leaves the previous
   checkpoint as it was, and one after it is rolled forward by the next reader or writer.

The folder must be one that every rank sees (a shared file system, or one host). The ranks
write into each other's staged files; each fsyncs and closes what it wrote before the owners read
it back, as a network file system's close-to-open consistency asks.
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CkptfmtError, CkptfmtWarning, ConfigError
from ..format.header import FORMAT_VERSION, INDEX_SUFFIX, KEY_FORMAT, KEY_FORMAT_VERSION
from ..format.index import check_shard_names, parse_size
from ..io.transaction import Transaction
from .ownership import model_ties, plan_shards
from .pieces import Piece, piece_of, replica_digests
from .rank_zero import on_rank0, shared
from .shards import Part, write_shards

if TYPE_CHECKING:
    import torch

__all__ = ["async_save", "save"]

# As huggingface_hub's save_torch_state_dict. The shard size costs no memory (each rank writes its
# pieces where they belong); every rank writes one shard at least.
DEFAULT_SHARD_BYTES = 5 * 10**9


def save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    config: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    **fields: Any,
) -> Path:
    """Save a sharded model as one self-describing sharded checkpoint, each rank writing the
    tensors it owns: `NAME-0000K-of-0000N.safetensors` and `NAME.safetensors.index.json`.

    Call it on every rank. No rank holds more than its own pieces: each writes its rows of every
    tensor straight into the tensor's shard, and the owner of each shard checks and digests it
    (see the module's docstring for the steps). The checkpoint
    is what `ckptfmt.save` writes for a sharded model: config from the arguments the model was
    built with, training record, digest of the whole state, sidecar, and the optimizer's state
    in companion shards (`NAME.optimizer-0000K-of-0000N.safetensors` and their index, keyed by
    parameter name), all committed together. Replicated tensors (BatchNorm statistics) must
    agree across ranks; the owner's copy is written.

    Args:
        model: a model sharded with FSDP2 (or DTensor), or any model held alike on every rank.
        path: where to write, on a file system every rank sees: `NAME.safetensors` (the index
            is `NAME.safetensors.index.json`) or the index's name itself.
        optimizer: its sharded state goes to the companion shards, for `load_training_state`
            on any number of ranks (or `ckptfmt.load_training_state` in one process).
        max_shard_size: at most this many bytes per shard ("2GB", "500MiB", an int; a larger
            tensor gets a shard of its own); 5 GB by default, as huggingface_hub's. Each rank
            writes one shard at least. It does not change the memory a save takes.
        config, scheduler, scaler, epoch, metrics, overwrite, fields: as for `ckptfmt.save`.

    Returns:
        The index written, on every rank.

    Raises:
        ConfigError: the ranks' replicated tensors differ (named), or they hold different models.
        Whatever `ckptfmt.save` raises, on every rank.

    Example:
        >>> ckptfmt.distributed.save(model, "runs/step_1000.safetensors", optimizer=optimizer, epoch=3)
        PosixPath('runs/step_1000.safetensors.index.json')
    """
    import torch.distributed as dist

    job = _prepare_save(model, path, config=config, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        epoch=epoch, metrics=metrics, overwrite=overwrite, max_shard_size=max_shard_size, fields=fields)
    error, digests = write_shards(job.parts, dist.get_rank(), job.transaction, overwrite=overwrite)
    return _commit_save(job, error, digests)


def async_save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    config: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    wait: bool = True,
    **fields: Any,
) -> Future[Path]:
    """`save` in the background: return once each rank has copied its pieces of the state into
    host memory; writing, read-back, digests, fsync and the commit run on a thread.

    Call it on every rank, as `save`. The caller is blocked while the ranks agree on the plan
    and rank 0 checks the save (as `save` does, so a refusal is raised here), then while each
    rank copies what it holds of each tensor (its rows of a sharded one, its owned replicated
    ones) into a staging buffer that the next save reuses (pinned for CUDA tensors): about its
    share of the state, as DCP's own `async_save` copies. Train on at once: the checkpoint holds
    the state at the call. The background part talks through a process group of its own (gloo),
    so it never mixes with the training's collectives; background saves run one after another,
    in the order they were called, on every rank.

    This is `ckptfmt.async_save`'s mechanism (`saving_async.in_background`): at most one save
    in flight per path (a second call waits, or raises WriteError with `wait=False`), an error
    on `.result()` and again at the next save if nobody asked, and the interpreter waits at exit.
    Wait for the futures before `dist.destroy_process_group()`.

    Args:
        wait: for a save to the same path still in flight: wait for it (True) or raise.
        the others: as for `save`.

    Returns:
        A `concurrent.futures.Future` whose `result()` is the index written, on every rank.

    Example:
        >>> future = ckptfmt.distributed.async_save(model, "runs/step_1000.safetensors", optimizer=optimizer)
        >>> train_step(model, optimizer)      # the checkpoint holds the weights of the call
        >>> future.result()
        PosixPath('runs/step_1000.safetensors.index.json')
    """
    import torch.distributed as dist

    from ..saving_async import in_background

    job = _prepare_save(model, path, config=config, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        epoch=epoch, metrics=metrics, overwrite=overwrite, max_shard_size=max_shard_size, fields=fields)
    group = _background_group()
    pieces = [{name: piece_of(part.tensors[name], owner) for names, owner in zip(part.plan.shards, part.plan.shard_owners)
               for name in names} for part in job.parts]
    with _order:
        previous = _last[0] if _last else None

        def write(copy: dict[str, Any]) -> Path:
            if previous is not None:  # the same order on every rank: one background save at a time
                wait_for([previous])
            parts = [replace(part, tensors={name: Piece(copy[str(number)][name], piece.shape, piece.rows)
                                            for name, piece in pieces[number].items()})
                     for number, part in enumerate(job.parts)]
            error, digests = write_shards(parts, dist.get_rank(), job.transaction, overwrite=overwrite, group=group)
            return _commit_save(job, error, digests, group=group)

        state = {str(number): {name: piece.local for name, piece in table.items()} for number, table in enumerate(pieces)}
        future = in_background(job.index, state, write, wait=wait)
        _last[:] = [future]
    return future


_order = threading.Lock()
_last: list[Future] = []  # the latest background save of this process, which the next one waits for
_groups: dict[Any, Any] = {}


def _background_group() -> Any:
    """The gloo group that background saves talk through, one per default group, made (by every
    rank, as any group is) at the first background save."""
    import torch.distributed as dist

    world = dist.group.WORLD
    if world not in _groups:
        if not _groups:
            atexit.register(_release_groups)
        _groups[world] = dist.new_group(backend="gloo")
    return _groups[world]


def _release_groups() -> None:
    """At exit, once the saves in flight are done (`in_background` waits for them before any
    atexit function runs): destroy the background groups torch still holds, and drop this
    module's references. A gloo group left to the interpreter's finalization, after
    `dist.destroy_process_group()` or without it, now and then aborted the process there
    ("terminate called without an active exception"), after all was written."""
    import torch.distributed as dist

    for group in list(_groups.values()):
        if dist.is_initialized() and group in dist.distributed_c10d._world.pg_map:
            dist.destroy_process_group(group)
    _groups.clear()


@dataclass
class _SaveJob:
    """What the ranks agreed to write: the parts (weights, companion), each rank's transaction,
    and on rank 0 what it needs to write the indexes and the sidecar."""

    index: Path
    parts: list[Part]
    transaction: Transaction
    overwrite: bool
    decided: tuple | None  # rank 0: (config, training record, provenance, companion JSON text)


def _prepare_save(model: torch.nn.Module, path: str | os.PathLike, *, config: Any, optimizer: Any, scheduler: Any,
                  scaler: Any, epoch: Any, metrics: Any, overwrite: bool, max_shard_size: Any,
                  fields: dict[str, Any]) -> _SaveJob:
    """Steps 1 and 2 of a save (see the module's docstring), on every rank.

    Example:
        >>> job = _prepare_save(model, "m.safetensors", config=None, optimizer=None, scheduler=None, scaler=None,
        ...                    epoch=None, metrics=None, overwrite=False, max_shard_size=None, fields={})
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from ..config.registry import unwrap_model
    from ..format.companion import companion_for, training_document

    index = _index_path(Path(path))
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_SHARD_BYTES
    world = dist.get_world_size()
    weights = get_model_state_dict(model)
    sections = {name: state.state_dict() for name, state in (("scheduler", scheduler), ("scaler", scaler))
                if state is not None}
    if optimizer is not None:
        sections = {"optimizer": get_optimizer_state_dict(model, optimizer), **sections}
    plans = {"weights": plan_shards(weights, world, shard_bytes=shard_bytes, ties=model_ties(unwrap_model(model)))}
    companion = companion_for(index)
    text, moments = training_document(sections, path=companion) if sections else (None, {})
    if sections:
        plans["companion"] = plan_shards(moments, world, shard_bytes=shard_bytes)
    _check_ranks_agree({"weights": weights, "companion": moments}, plans, index)

    def decide() -> tuple:
        return _decide(model, index, companion if sections else None, weights, plans, config=config, epoch=epoch,
                       metrics=metrics, overwrite=overwrite, fields=fields)

    result, shard_metadata = on_rank0(decide, share=lambda result: result[-1])
    decided = (*result[:-1], text) if dist.get_rank() == 0 else None
    parts = [Part(index, weights, plans["weights"], shard_metadata)]
    if sections:
        companion_index = companion.with_name(companion.name + ".index.json")
        parts.append(Part(companion_index, moments, plans["companion"],
                          {KEY_FORMAT: "pt", KEY_FORMAT_VERSION: FORMAT_VERSION}))
    return _SaveJob(index, parts, Transaction(index.parent, index.name), overwrite, decided)


def _index_path(path: Path) -> Path:
    """The index to write for `path`: `NAME.safetensors.index.json` (a `.pth` name is written
    as `.safetensors`, with a warning, as `ckptfmt.save` does)."""
    if path.name.endswith(INDEX_SUFFIX):
        return path
    if path.suffix != ".safetensors":
        real = path.with_suffix(".safetensors")
        warnings.warn(f"{path}: checkpoints are written as safetensors, not pickled; writing {real}",
                      CkptfmtWarning, stacklevel=4)
        path = real
    return path.with_name(path.name + ".index.json")


def _check_ranks_agree(states: dict[str, Mapping[str, Any]], plans: dict, index: Path) -> None:
    """One `all_gather_object` of each rank's plans and replicated-tensor digests: the same plan
    everywhere (the same model and optimizer), and the same values of each replicated tensor.
    Every rank sees every rank's report, so every rank raises the same error."""
    import torch.distributed as dist

    mine = ({name: plan.fingerprint for name, plan in plans.items()},
            {part: replica_digests(state) for part, state in states.items()})
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    for rank, (fingerprints, digests) in enumerate(reports):
        if fingerprints != reports[0][0]:
            raise ConfigError(
                f"rank {rank} holds another model or optimizer than rank 0 (other tensor names, shapes or dtypes); "
                "call ckptfmt.distributed.save on every rank with the same model",
                path=index,
            )
        for part, table in digests.items():
            differing = sorted(name for name, digest in table.items() if reports[0][1][part].get(name) != digest)
            if differing:
                where = "the optimizer's state" if part == "companion" else "the model"
                raise ConfigError(
                    f"the replicated tensor {differing[0]!r} of {where} holds other values on rank {rank} than on rank 0"
                    f"{f' (and {len(differing) - 1} more)' if len(differing) > 1 else ''}; ranks that do not sync "
                    "their buffers (FSDP2 does not) must agree before saving: use SyncBatchNorm, or broadcast rank 0's "
                    "(for b in model.buffers(): dist.broadcast(b, src=0))",
                    path=index,
                )


def _decide(model: Any, index: Path, companion: Path | None, weights: Mapping[str, Any], plans: dict, *,
            config: Any, epoch: Any, metrics: Any, overwrite: bool, fields: dict[str, Any]) -> tuple:
    """Rank 0's checks before anything is written, as `ckptfmt.save` makes them; returns
    (config, training record, provenance, each shard's metadata)."""
    from ..checkpoint import _config_to_save
    from ..config.shapes import check_shapes
    from ..config.sidecar import check_sidecar_accepts
    from ..format.index import shard_names
    from ..format.metadata import build_metadata, provenance_record, training_record
    from ..format.writer import DTYPE_NAMES
    from ..io.atomic import check_writable

    config = _config_to_save(model, config, fields, index)
    check_shapes(config, {n: tuple(t.shape) for n, t in weights.items()},
                 dtypes={n: DTYPE_NAMES.get(t.dtype, str(t.dtype)) for n, t in weights.items()}, path=index)
    indexes = [(index, plans["weights"])] + ([(companion.with_name(companion.name + ".index.json"),
                                               plans["companion"])] if companion else [])
    for each, plan in indexes:
        names = shard_names(each.name[: -len(INDEX_SUFFIX)], len(plan.shards))
        check_shard_names(each, names)
        for name in [each.name, *names]:
            check_writable(each.parent / name, overwrite=overwrite)
    check_sidecar_accepts(index.parent, config, overwrite=overwrite)
    training = training_record(epoch, metrics, path=index)
    provenance = provenance_record()
    return config, training, provenance, build_metadata(config, training={}, provenance=provenance)


def _commit_save(job: _SaveJob, error: BaseException | None, digests: dict[str, dict[str, bytes]], *,
                 group: Any = None) -> Path:
    """Step 4 of a save (see the module's docstring), on every rank: rank 0 commits what every
    rank staged, or, when a rank failed, removes it; the outcome is raised or returned on every
    rank. `digests`: this rank's tensors' full digests, by part (see `write_shards`).

    Example:
        >>> _commit_save(job, *write_shards(job.parts, rank, job.transaction, overwrite=False))
        PosixPath('m.safetensors.index.json')
    """
    import torch.distributed as dist

    failure = None if error is None else error if isinstance(error, CkptfmtError) else f"{type(error).__name__}: {error}"
    mine = ([(temp.name, final.name) for temp, final in job.transaction.staged], failure, digests)
    reports: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, reports, dst=0, group=group)
    return shared(on_rank0(lambda: _commit_on_rank0(job, reports, error), group=group))


def _commit_on_rank0(job: _SaveJob, reports: list[Any], error: BaseException | None) -> Path:
    folder = job.index.parent
    others = [(folder / temp, folder / final) for rank, (staged, _, _) in enumerate(reports) if rank != 0
              for temp, final in staged]
    adopted = 0
    try:
        with job.transaction as transaction:
            if error is not None:
                raise error
            for rank, (_, failure, _) in enumerate(reports):
                if failure is not None:
                    raise failure if isinstance(failure, CkptfmtError) else CkptfmtError(
                        f"rank {rank} failed writing its shards: {failure}", path=job.index)
            for temp, final in others:
                transaction.adopt(temp, final, overwrite=job.overwrite)
                adopted += 1
            digests: dict[str, dict[str, bytes]] = {}
            for _, _, theirs in reports:
                for index, table in theirs.items():
                    digests.setdefault(index, {}).update(table)
            _write_indexes(job, transaction, digests)
    finally:
        for temp, _ in others[adopted:]:  # staged by ranks whose save is given up: removed with rank 0's
            temp.unlink(missing_ok=True)
    return job.index


def _write_indexes(job: _SaveJob, transaction: Transaction, digests: dict[str, dict[str, bytes]]) -> None:
    """The companion's index, the checkpoint's index and the sidecar, staged in `transaction`
    beside the shards: computed from the staged files' headers and every rank's digests of the
    tensors it wrote (by part), no shard's data read again."""
    from ..config.sidecar import write_sidecar
    from ..format.companion import write_training_index
    from ..format.index import write_index
    from ..format.metadata import build_metadata

    config, training, provenance, text = job.decided
    staged = {final.name: temp for temp, final in transaction.staged}
    weights, *companion = job.parts
    if companion:
        part = companion[0]
        training = {**training, "optimizer": write_training_index(
            part.index, text, [(staged[name], name) for name in part.names], overwrite=job.overwrite,
            digests=digests.get(part.index.name, {}), transaction=transaction)}
    metadata = build_metadata(config, training=training, provenance=provenance)
    digest = write_index(job.index, [(staged[name], name) for name in weights.names], metadata,
                         digests=digests.get(job.index.name, {}), aliases=weights.plan.aliases,
                         overwrite=job.overwrite, transaction=transaction)
    write_sidecar(job.index.parent, config, job.index.name, digest, overwrite=job.overwrite, transaction=transaction)
