"""Legacy `.pth`/`.pt`/`.ckpt` -> self-describing `.safetensors`, losslessly and safely.

For each file: read it with the weights-only unpickler, sort out what it holds (`layouts`),
resolve the config (`config=` > sidecar beside the source > what the file itself gives: its
`hyper_parameters` or a pickled model's arguments > inferred from the tensor shapes, then
`overrides`), check it against the shapes, then write the companion (optimizer, scheduler,
scaler and other tensors), the weights (read back and compared byte for byte with the source
tensors) and the sidecar's binding as one transaction, which gives them their names together
once all are written. The source is never modified. A
checkpoint that no registered architecture recognises is still converted, weights only, with a
warning. The result lists where each of the file's keys went, and each key dropped, with why.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .config.model_config import ModelConfig, config_differences
from .config.sidecar import Sidecar, check_sidecar_accepts, read_sidecar, sidecar_path, write_sidecar
from .convert_options import (
    CAST_DTYPES,
    cast_state_dict,
    option_differences,
    recorded_conversion,
    refuse_other_options,
    requested_options,
)
from .errors import (
    CkptfmtError,
    ConfigError,
    LegacyCheckpointError,
    Words,
    WriteError,
    cli_value,
)
from .format.companion import companion_for, write_training_state
from .format.header import INDEX_SUFFIX, looks_like_safetensors, read_header
from .format.index import check_shard_names, is_foreign_index, is_index, parse_size, write_sharded
from .format.metadata import build_metadata, provenance_record
from .format.writer import placeholder, write_safetensors
from .io.atomic import check_writable, name_fits
from .io.background import helpers
from .io.files import FolderWalk, files_sha256, is_regular_file, open_regular, sha256_fd, sha256_file, walk_files
from .io.jsondoc import has_surrogate
from .io.transaction import Transaction, clean_folder
from .resolve import Resolution, read_source, resolve
from .sources.dcp import dcp_folder_sha256, is_dcp_folder
from .sources.foreign import HUB_CONFIG_NAME, HUB_WEIGHTS_NAME
from .sources.legacy import LEGACY_SUFFIXES, file_identity

__all__ = ["ConvertResult", "convert", "convert_all", "find_checkpoints"]

# What a user can do about weights no registered architecture recognises.
WEIGHTS_ONLY_HINT = Words(
    "To record what it is, pass model_type= and overrides= (or config=); a class of your own must be registered "
    "first: import the module that registers it",
    "To record what it is, pass --model-type NAME --set KEY=VALUE (or --config FILE); for a class of your own, "
    "add --import MODULE, the module that registers it",
)


@dataclass
class ConvertResult:
    """What happened to one source file.

    `status` is "converted", "skipped" (its output already records the same source sha256, or it
    is a ckptfmt checkpoint already: `note` says which) or
    "failed" (then `error` says why, naming the source). `config` is None for a weights-only
    conversion. `carried` maps "weights", "config", "training" (the training record) and
    "companion" to the source's keys that went there; `dropped` maps each key left out to why;
    `read_as_plain` lists what the stand-ins turned into plain values (also in provenance).
    """

    source: Path
    status: str
    output: Path | None = None
    sidecar: Path | None = None
    optimizer_file: Path | None = None
    config: ModelConfig | None = None
    config_source: str | None = None
    source_sha256: str | None = None
    weights_sha256: str | None = None
    tensors: int = 0
    error: str | None = None
    note: str | None = None  # why it was skipped
    failure: Exception | None = field(default=None, repr=False)  # the error itself, for the CLI's words
    warnings: list[str] = field(default_factory=list)
    carried: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    read_as_plain: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "status": self.status,
            "output": str(self.output) if self.output else None,
            "sidecar": str(self.sidecar) if self.sidecar else None,
            "optimizer_file": str(self.optimizer_file) if self.optimizer_file else None,
            "config": self.config.to_dict() if self.config else None,
            "config_source": self.config_source,
            "source_sha256": self.source_sha256,
            "weights_sha256": self.weights_sha256,
            "tensors": self.tensors,
            "error": self.error,
            "note": self.note,
            "warnings": self.warnings,
            "carried": self.carried,
            "dropped": self.dropped,
            "read_as_plain": self.read_as_plain,
        }


@dataclass
class _Batch:
    """A run of conversions: each sidecar read once, and the bindings that this run adds to it,
    which each conversion's transaction writes with its own (a run with `force` starts a sidecar
    afresh once, not once per file)."""

    force: bool
    sidecars: dict[Path, Any] = field(default_factory=dict)
    written: dict[Path, tuple[ModelConfig, dict[str, str]]] = field(default_factory=dict)

    def sidecar(self, path: Path):
        if path not in self.sidecars:
            self.sidecars[path] = read_sidecar(path)
        return self.sidecars[path]

    def _planned(self, path: Path):
        """The sidecar at `path` as this batch has left it."""
        if path in self.written:
            config, bindings = self.written[path]
            return Sidecar(path, config, bindings)
        return self.sidecar(path)

    def accepts(self, output: Path, config: ModelConfig) -> Path:
        """The sidecar to bind `output` in, as `check_sidecar_accepts` chooses it, knowing what
        this batch wrote there."""
        path = sidecar_path(output, config, writing=True, read=self._planned)
        if path in self.written and not self.force:
            differences = config_differences(self.written[path][0], config)
            if differences:
                raise ConfigError(
                    f"is about to hold another config, of a file converted before this one "
                    f"({'; '.join(differences)})", path=path,
                    fix=Words("pass force=True to replace it, or give this file another output folder",
                              "pass --force to replace it, or give this file another output folder"),
                )
        elif path not in self.written:
            check_sidecar_accepts(output, config, overwrite=self.force, read=self._planned)
        return path

    def bind(self, path: Path, config: ModelConfig, name: str, digest: str,
             transaction: Transaction) -> dict[str, str]:
        """Stage the sidecar at `path`, binding `name`, in the conversion's transaction; the
        bindings it holds, for `committed` once the transaction is."""
        bindings = {**self.written.get(path, (config, {}))[1], name: digest}
        write_sidecar(path.parent, config, bindings=bindings, overwrite=self.force, transaction=transaction,
                      path=path)
        return bindings

    def committed(self, path: Path, config: ModelConfig, bindings: dict[str, str]) -> None:
        self.written[path] = (config, bindings)


def default_output(source: Path) -> Path:
    if is_index(source):  # NAME.safetensors.index.json -> NAME.safetensors, beside its shards
        return source.with_name(source.name[: -len(INDEX_SUFFIX)] + ".safetensors")
    return source.with_suffix(".safetensors")


def _index_sha256(index: Path) -> str:
    return files_sha256([index, *read_header(index).files], error=LegacyCheckpointError)


def convert(
    source: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    config: ModelConfig | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    model_type: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    unsafe_pickle: bool = False,
    max_shard_size: int | str | None = None,
    allow_overflow: bool = False,
) -> ConvertResult:
    """Convert one legacy checkpoint to a self-describing .safetensors file plus sidecar.

    Args:
        source: the `.pth`/`.pt`/`.ckpt` file, a DCP folder, or shards (their index) or a
            `.safetensors` file written by someone else.
        output: the .safetensors to write; default beside the source, same stem.
        config: a ModelConfig or a config JSON file; default the sidecar beside the source,
            else the file's own (its hyper_parameters, or a pickled model's arguments), else
            the config inferred from the tensor shapes.
        overrides: config fields to set on top, checked against the shapes.
        model_type: only try this architecture (or, with `config`, attach it).
        dtype: "fp16", "bf16" or "fp32" to cast floating-point tensors (recorded in provenance).
            A cast that would turn finite values into inf is refused, naming the tensor.
        force: overwrite an existing output or a disagreeing sidecar. Without it, an output
            converted from the same source with the same options is skipped, and one converted
            with other options (dtype, shard size, config, overrides, model type) is refused.
        unsafe_pickle: allow arbitrary pickles. This runs code from the file. A whole pickled
            model (`torch.save(model)`) is then read, and its `state_dict()` converted.
        max_shard_size: write shards of at most this many bytes ("2GB", an int) and an index,
            `NAME.safetensors.index.json`, when the weights do not fit in one.
        allow_overflow: cast to `dtype` even where finite values become inf; the cast record
            in provenance names each such tensor and its largest magnitude.

    Returns:
        A ConvertResult with status "converted" or "skipped".

    Raises:
        CkptfmtError: whatever stopped the conversion; nothing was written.

    Example:
        >>> result = convert("checkpoints/multitask_joint/best_model.pth")
        >>> result.output, result.config.depth
        (PosixPath('checkpoints/multitask_joint/best_model.safetensors'), 3)
    """
    result = _convert_one(Path(source), output, _Batch(force=force), config=config, overrides=overrides,
                          model_type=model_type, dtype=dtype, unsafe_pickle=unsafe_pickle, max_shard_size=max_shard_size,
                          allow_overflow=allow_overflow)
    if result.status == "failed":
        raise result.failure
    return result


@dataclass
class _Plan:
    """Where one conversion reads and writes, worked out before anything is read."""

    source: Path
    output: Path  # the .safetensors, or the index when the weights are written as shards
    plain: Path  # the .safetensors name the output stands for (and the companion's stem)
    shard_size: int | None
    from_dcp: bool
    hash_source: Callable[[Path], str]
    options: dict[str, Any]  # those that shape the output, recorded in provenance


def _plan(source: Path, output: str | os.PathLike | None, *, dtype: str | None, force: bool,
          max_shard_size: int | str | None, options: dict[str, Any]) -> _Plan | ConvertResult:
    """The paths of one conversion, checked; or the result of skipping it (its output already
    records the same source and the same options)."""
    # A torch.distributed.checkpoint folder has its own safe reader (sources/dcp.py); from there
    # on it is converted as a .pth is.
    from_dcp = is_dcp_folder(source)
    if not from_dcp and source.is_dir():  # a Hugging Face folder: its index of shards, or its weights
        source = next((found for found in find_checkpoints(source).files
                       if is_index(found) or found.name == HUB_WEIGHTS_NAME), source)
    # Shards written by someone else (no ckptfmt metadata) are read safely, as a .pth is.
    from_shards = not from_dcp and is_index(source)
    if from_shards and not is_foreign_index(source) or not from_dcp and _is_ckptfmt_file(source):
        return ConvertResult(source=source, status="skipped", output=source,
                             note="already a ckptfmt checkpoint; nothing to convert (check it with verify)")
    hash_source = dcp_folder_sha256 if from_dcp else _index_sha256 if from_shards else sha256_file
    if not from_dcp:
        os.close(open_regular(source, error=LegacyCheckpointError))  # a FIFO, a device, unreadable: said here
    output = Path(output) if output is not None else default_output(source)
    clean_folder(output.parent)  # a commit there that a killed run left is finished before anything is looked at
    if dtype is not None and dtype not in CAST_DTYPES:
        raise ConfigError(Words(f"dtype={dtype!r} is not one of {', '.join(CAST_DTYPES)}",
                                f"--dtype {cli_value(dtype)} is not one of {', '.join(CAST_DTYPES)}"), path=source)
    if output.suffix != ".safetensors":
        raise WriteError("the output must end in .safetensors", path=output)
    if has_surrogate(output.name):
        raise WriteError("the output's name is not valid UTF-8, and model_config.json binds weights by name in "
                         "JSON; choose another output (-o)", path=output)
    if output.exists() and os.path.samefile(source, output) and not (force and looks_like_safetensors(source)):
        # A .safetensors written by someone else may be rewritten in place, self-describing, when
        # asked: its old bytes stay readable (mapped) until the new file takes its name.
        fix = Words("pass force=True to rewrite it in place, or choose another output (-o)",
                    "pass --force to rewrite it in place, or choose another output (-o)") \
            if looks_like_safetensors(source) else "choose another output (-o)"
        raise WriteError("is both the source and the output", path=output, fix=fix)
    plain, index = output, output.with_name(output.name + ".index.json")
    if from_shards and index == source:
        if max_shard_size is not None:
            raise WriteError("would be written over the shards it is converted from; choose another output (-o)",
                             path=index)
    elif name_fits(index.name) and index.exists() and not index.is_symlink() and not output.exists():
        output = index  # an earlier conversion to shards: what it recorded decides the skip
    skipped = _already_converted(source, output, hash_source, options) if not force else None
    if skipped is not None:
        return skipped
    check_writable(output, overwrite=force)
    shard_size = parse_size(max_shard_size) if max_shard_size is not None else None
    return _Plan(source, output, plain, shard_size, from_dcp, hash_source, options)


def _already_converted(source: Path, output: Path, hash_source: Callable[[Path], str],
                       options: dict[str, Any]) -> ConvertResult | None:
    """The skip of a conversion whose output records the same source sha256 and the same
    options; None when it records another source (then it is any existing file). The same
    source converted with other options is refused, naming what differs."""
    if not output.exists() or output.is_symlink():
        return None
    recorded = recorded_conversion(output)
    if recorded is None or recorded[0] != hash_source(source):
        return None
    differences = option_differences(recorded[1], options)
    if differences:
        raise refuse_other_options(output, differences)
    return ConvertResult(source=source, status="skipped", output=output, source_sha256=recorded[0],
                         note=f"already converted to {output} (same source sha256, same options)")


def _convert_one(source: Path, output: str | os.PathLike | None, batch: _Batch, *, config: Any = None,
                 overrides: Mapping[str, Any] | None = None, model_type: str | None = None, dtype: str | None = None,
                 unsafe_pickle: bool = False, max_shard_size: int | str | None = None,
                 allow_overflow: bool = False) -> ConvertResult:
    """One conversion, its sidecar left to the batch: plan, read, resolve, write."""
    options = requested_options(dtype=dtype, max_shard_size=max_shard_size, config=config, overrides=overrides,
                                model_type=model_type)
    plan = _plan(source, output, dtype=dtype, force=batch.force, max_shard_size=max_shard_size, options=options)
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


def _provenance(plan: _Plan, resolution: Resolution, cast: dict[str, Any] | None, sha_stand_in: str) -> dict[str, Any]:
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


def _write(plan: _Plan, resolution: Resolution, state_dict: dict[str, torch.Tensor], cast: dict[str, Any] | None,
           result: ConvertResult, batch: _Batch) -> None:
    """Write the companion, the weights (read back and compared) and the sidecar's binding as one
    transaction: they take their names together, after everything is written and checked."""
    legacy, output = resolution.legacy, result.output
    training = dict(legacy.training)
    with Transaction(output.parent, output.name) as transaction:
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
            # converted, even when the output takes the source's name (a rewrite in place).
            source_sha256 = (helpers().submit(sha256_fd, source_fd) if plan.hash_source is sha256_file
                             else helpers().submit(plan.hash_source, plan.source))
            write = partial(write_sharded, max_shard_size=plan.shard_size) if is_index(output) else write_safetensors
            digest = write(output, state_dict, metadata, overwrite=batch.force, transaction=transaction,
                           fill_in={sha_stand_in: source_sha256}, sources=sources)
        finally:
            if source_fd is not None:
                os.close(source_fd)
        if resolution.config is not None:
            bindings = batch.bind(result.sidecar, resolution.config, output.name, digest, transaction)
    if resolution.config is not None:  # a conversion that failed binds nothing in the next one's sidecar
        batch.committed(result.sidecar, resolution.config, bindings)
    result.source_sha256, result.weights_sha256, result.tensors = source_sha256.result(), digest, len(state_dict)


def _refuse_shared_outputs(jobs: list[tuple[Path, Path | None]]) -> None:
    """Refuse, before anything is written, two sources that would be converted to one output
    (`m.pth` and `m.ckpt` in one folder): the second would replace the first."""
    claimed: dict[str, Path] = {}
    for source, target in jobs:
        if not (source.is_dir() or is_regular_file(source)):
            continue  # a FIFO or a file that went away fails alone, saying so
        output = target if target is not None else default_output(source)
        earlier = claimed.setdefault(os.path.abspath(output), source)
        if earlier != source:
            raise WriteError(
                f"would be the output of both {earlier} and {source}, and the second would replace the first",
                path=output,
                fix=Words("convert one of them on its own with output= naming another file, or move it away",
                          "convert one of them on its own with -o naming another file, or move it away"),
            )


def _is_ckptfmt_file(path: Path) -> bool:
    """Whether `path` is a .safetensors that ckptfmt wrote (its own header says so)."""
    try:
        return looks_like_safetensors(path) and read_header(path).is_ckptfmt
    except CkptfmtError:
        return False  # read again as a source, which says what is wrong with it


def find_checkpoints(path: Path) -> FolderWalk:
    """A file as is, and a DCP folder; another folder as every `.pth`/`.pt`/`.ckpt` under it,
    every index of shards that ckptfmt did not write, and the `model.safetensors` of a
    Hub-style folder (beside its `config.json`) that ckptfmt did not write, recursively, in
    sorted order (not following links out of it), with what under it could not be read."""
    if path.is_dir() and not is_dcp_folder(path):
        walk = walk_files(path, (*LEGACY_SUFFIXES, INDEX_SUFFIX, HUB_WEIGHTS_NAME))
        return FolderWalk([found for found in walk.files if _is_source(found)], walk.unreadable)
    return FolderWalk([path], [])


def _is_source(found: Path) -> bool:
    """Whether a file a folder's walk found is one to convert."""
    if is_index(found):
        return is_foreign_index(found)
    if found.name.endswith(".safetensors"):
        return (found.name == HUB_WEIGHTS_NAME and (found.parent / HUB_CONFIG_NAME).exists()
                and not _is_ckptfmt_file(found))
    return True


def convert_all(
    paths: Iterable[str | os.PathLike],
    *,
    output: str | os.PathLike | None = None,
    on_start: Callable[[int, int, Path], None] | None = None,
    **options: Any,
) -> list[ConvertResult]:
    """Convert files and folders of checkpoints; a failure does not stop the others.

    Args:
        paths: files, or folders searched recursively for `.pth`/`.pt`/`.ckpt`.
        output: a .safetensors file (one source only) or a folder that mirrors the sources'
            layout; default beside each source.
        on_start: called as `on_start(index, total, source)` before each file (for progress).
        **options: as for `convert`.

    Returns:
        One ConvertResult per source file, failed ones included.

    Example:
        >>> results = convert_all(["checkpoints/"])
        >>> [r.status for r in results]
        ['converted', 'converted', 'converted', 'converted']
    """
    jobs: list[tuple[Path, Path | None]] = []
    unreadable: dict[Path, CkptfmtError] = {}  # what a walk could not read fails as a source of its own
    for root in map(Path, paths):
        walk = find_checkpoints(root)
        unreadable.update((Path(error.path), error) for error in walk.unreadable)
        found = sorted([*walk.files, *(Path(error.path) for error in walk.unreadable)])
        jobs += [(source, None if source in unreadable else _output_for(source, root, output)) for source in found]
    if output is not None and Path(output).suffix == ".safetensors" and len(jobs) != 1:
        raise WriteError(
            f"is one file but there are {len(jobs)} sources; give a folder as the output",
            path=output,
        )
    _refuse_shared_outputs(jobs)
    results = []
    batch = _Batch(force=options.pop("force", False))
    for index, (source, target) in enumerate(jobs):
        if on_start is not None:
            on_start(index, len(jobs), source)
        try:
            if source in unreadable:
                raise unreadable[source]
            results.append(_convert_one(source, target, batch, **options))
        except (CkptfmtError, OSError) as exc:
            results.append(ConvertResult(source=source, status="failed", output=target, error=_failure(source, exc),
                                         failure=exc))
        except Exception as exc:
            # A bug, here or in torch, met by one file: that file fails alone and the batch
            # goes on; the traceback on request, as the CLI gives it.
            if os.environ.get("CKPTFMT_TRACEBACK"):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            results.append(ConvertResult(source=source, status="failed", output=target,
                                         error=f"{source}: unexpected {type(exc).__name__}: {first_line}"))
    return results


def _failure(source: Path, exc: Exception) -> str:
    """The error as one line that starts with the source it is about."""
    if isinstance(exc, CkptfmtError):
        text = str(exc)
        return text if exc.path == str(source) else f"{source}: {text}"
    where = f" ({exc.filename})" if getattr(exc, "filename", None) not in (None, str(source)) else ""
    return f"{source}: {exc.strerror or exc}{where}"


def _output_for(source: Path, root: Path, output: str | os.PathLike | None) -> Path | None:
    if output is None:
        return None
    output = Path(output)
    if output.suffix == ".safetensors":
        return output
    relative = source.relative_to(root) if root.is_dir() and source != root else Path(source.name)
    return output / default_output(relative)
