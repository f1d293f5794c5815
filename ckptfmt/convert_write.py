"""One conversion: read the source, resolve its config, and write the companion, the weights
(read back and compared byte for byte with the source tensors) and the sidecar's binding as one
transaction, which the batch commits (`converter`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from .convert_options import CAST_DTYPES, cast_state_dict, requested_options
from .convert_plan import ConvertResult, Plan, plan_conversion
from .errors import LegacyCheckpointError, Words
from .format.companion import companion_for, write_training_state
from .format.index import check_shard_names, is_index, write_sharded
from .format.metadata import build_metadata, provenance_record
from .format.writer import placeholder, write_safetensors
from .io.atomic import check_writable
from .io.background import helpers
from .io.files import open_regular, sha256_fd, sha256_file
from .io.transaction import Transaction
from .resolve import Resolution, read_source, resolve
from .sources.legacy import file_identity


class Batch(Protocol):
    """What one conversion needs of the run it belongs to (`converter`'s batch): whether
    overwriting was asked, each sidecar read once, the sidecar its checkpoint gets, and the
    group its transaction joins."""

    force: bool

    def sidecar(self, path: Path) -> Any: ...

    def accepts(self, output: Path, config: Any) -> Path: ...

    def add(self, result: ConvertResult, transaction: Transaction) -> None: ...

__all__ = ["convert_one"]

WEIGHTS_ONLY_HINT = Words(
    "To record what it is, pass model_type= and overrides= (or config=); a class of your own must be registered "
    "first: import the module that registers it",
    "To record what it is, pass --model-type NAME --set KEY=VALUE (or --config FILE); for a class of your own, "
    "add --import MODULE, the module that registers it",
)

# A source up to this size is hashed before its output is written rather than beside it.
_HASH_AT_ONCE_BYTES = 8 << 20


def convert_one(source: Path, output: str | os.PathLike | None, batch: Batch, *, config: Any = None,
                 overrides: Mapping[str, Any] | None = None, model_type: str | None = None, dtype: str | None = None,
                 unsafe_pickle: bool = False, max_shard_size: int | str | None = None,
                 allow_overflow: bool = False) -> ConvertResult:
    """One conversion, its sidecar left to the batch: plan, read, resolve, write."""
    options = requested_options(dtype=dtype, max_shard_size=max_shard_size, config=config, overrides=overrides,
                                model_type=model_type)
    plan = plan_conversion(source, output, dtype=dtype, force=batch.force, max_shard_size=max_shard_size, options=options)
    if isinstance(plan, ConvertResult):
        return plan
    read = read_source(plan.source, unsafe_pickle=unsafe_pickle, mmap=True, hash_source=False)
    cast_to = CAST_DTYPES[dtype] if dtype is not None else None
    resolution = resolve(read, config=config, overrides=overrides, model_type=model_type,
                         replace_sidecar=batch.force, cast_to=cast_to, read_sidecar=batch.sidecar)
    legacy = resolution.legacy
    result = ConvertResult(source=plan.source, status="converted", output=plan.output,
                           config=resolution.config, config_source=resolution.origin)
    result.warnings.extend([*legacy.notes, *(warning.message_words for warning in resolution.warnings)])
    if resolution.config is None:
        if resolution.overridden or overrides:
            raise resolution.unresolved
        result.warnings.append("converted as weights only, with no config: " + resolution.unresolved.message_words
                               + ". " + WEIGHTS_ONLY_HINT)
    else:
        result.sidecar = batch.accepts(plan.output, resolution.config)
    state_dict, cast = (cast_state_dict(legacy.state_dict, dtype, allow_overflow=allow_overflow, path=plan.source)
                        if dtype is not None else (legacy.state_dict, None))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = plan.plain.with_name(plan.plain.name + ".index.json")
    result.output = index if plan.shard_size is not None and total > plan.shard_size else plan.plain
    if is_index(result.output):
        check_shard_names(result.output)
    check_writable(result.output, overwrite=batch.force)
    result.carried = {key: list(keys) for key, keys in legacy.destinations.items()}
    if resolution.origin == "hyper_parameters":
        result.carried["config"] = ["hyper_parameters"]
    elif resolution.origin == "pickled model":
        result.carried["config"] = [legacy.wrapper_key or "(the pickled model's arguments)"]
    result.dropped, result.read_as_plain = dict(legacy.dropped), list(legacy.conversions)
    _write(plan, resolution, state_dict, cast, result, batch)
    return result


def _provenance(plan: Plan, resolution: Resolution, cast: dict[str, Any] | None, sha_stand_in: str) -> dict[str, Any]:
    """What the converted file records of where it came from."""
    legacy = resolution.legacy
    # A name that is not valid UTF-8 (read by Python with surrogateescape) is recorded with its
    # bad bytes escaped: the provenance is JSON that every reader must accept.
    shown_name = plan.source.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    source_record: dict[str, Any] = {"file": shown_name, "sha256": sha_stand_in, "serialization": legacy.serialization}
    if legacy.wrapper_key is not None:
        source_record["state_dict_key"] = str(legacy.wrapper_key)
    if legacy.stripped_prefixes:
        source_record["stripped_prefixes"] = legacy.stripped_prefixes
    if legacy.pickled_model:
        source_record["pickled_model"] = legacy.pickled_model
    if legacy.conversions:
        source_record["read_as_plain"] = legacy.conversions
    extra: dict[str, Any] = {"cast": cast} if cast else {}
    if plan.options:
        extra["options"] = plan.options
    if resolution.identification is not None and resolution.identification.record():
        extra["identified"] = resolution.identification.record()
    return provenance_record(source=source_record, **extra)


def _write(plan: Plan, resolution: Resolution, state_dict: dict[str, torch.Tensor], cast: dict[str, Any] | None,
           result: ConvertResult, batch: Batch) -> None:
    """Stage the companion and the weights (read back and compared) in one transaction, which the
    batch commits with the sidecar's binding: they take their names together, after everything is
    written and checked."""
    legacy, output = resolution.legacy, result.output
    training = dict(legacy.training)
    transaction = Transaction(output.parent, output.name)
    try:
        if legacy.companion:
            companion = companion_for(plan.plain)
            training["optimizer"] = write_training_state(companion, legacy.companion, overwrite=batch.force,
                                                         transaction=transaction)
            result.optimizer_file = companion
        # The source's sha256 is computed while the output is written, and filled in after.
        sha_stand_in = placeholder()
        metadata = build_metadata(resolution.config, training=training,
                                  provenance=_provenance(plan, resolution, cast, sha_stand_in))
        source_fd = None if plan.from_dcp else open_regular(plan.source, error=LegacyCheckpointError)
        try:
            if legacy.mapped and file_identity(source_fd) != legacy.identity:
                raise LegacyCheckpointError("changed while it was being converted; nothing was written. Convert it "
                                            "again", path=plan.source)
            # Mapped tensors are copied from the source file by offset, and compared with it there.
            sources = {name: (source_fd, offset) for name, tensor in state_dict.items()
                       if (offset := legacy.file_offset(tensor)) is not None}
            # One file is hashed through the descriptor already open: the bytes read are those
            # converted, even when the output takes the source's name (a rewrite in place). A
            # large one is hashed while the output is written; a small one at once, as handing
            # it to a thread costs more than hashing it.
            if plan.hash_source is not sha256_file:
                source_sha256 = helpers().submit(plan.hash_source, plan.source)
            elif os.fstat(source_fd).st_size > _HASH_AT_ONCE_BYTES:
                source_sha256 = helpers().submit(sha256_fd, source_fd)
            else:
                source_sha256 = Future()
                source_sha256.set_result(sha256_fd(source_fd))
            write = partial(write_sharded, max_shard_size=plan.shard_size) if is_index(output) else write_safetensors
            digest = write(output, state_dict, metadata, overwrite=batch.force, transaction=transaction,
                           fill_in={sha_stand_in: source_sha256}, sources=sources)
        finally:
            if source_fd is not None:
                os.close(source_fd)
        result.source_sha256, result.weights_sha256, result.tensors = source_sha256.result(), digest, len(state_dict)
    except BaseException:
        transaction.abort()
        raise
    batch.add(result, transaction)
