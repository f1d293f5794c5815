"""Legacy `.pth`/`.pt`/`.ckpt` -> self-describing `.safetensors`, losslessly and safely.

For each file: read it with the weights-only unpickler, sort out what it holds (`layouts`),
resolve the config (`config=` > sidecar beside the source > what the file itself gives: its
`hyper_parameters` or a pickled model's arguments > inferred from the tensor shapes, then
`overrides`), check it against the shapes, then write the companion (optimizer, scheduler,
scaler and other tensors) and the weights (read back and compared byte for byte with the source
tensors), which take their names together with the sidecar's binding once all are written
(`convert_write`). The source is never modified. A checkpoint that no registered architecture
recognises is still converted, weights only, with a warning. The result lists where each of the
file's keys went, and each key dropped, with why.

A run over many files commits the conversions bound for one folder in groups (`_Batch`): one
commit record and one sidecar write for the group, each checkpoint's files still taking their
names together. A conversion that fails is never in its group; a group whose commit fails before
anything took its name is committed again one conversion at a time, so each failing file fails
alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.model_config import ModelConfig, config_differences
from .config.sidecar import (
    Sidecar,
    check_sidecar_accepts,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from .convert_plan import (
    ConvertResult,
    default_output,
    find_checkpoints,
    output_for,
    refuse_shared_outputs,
)
from .convert_write import convert_one
from .errors import CkptfmtError, ConfigError, Words, WriteError
from .io.transaction import Transaction, commit_together

__all__ = ["ConvertResult", "convert", "convert_all", "default_output", "find_checkpoints"]

# A group of conversions closes at this many files or this many seconds (and at the end of the
# run, or when the next output is in another folder or bound in another sidecar): the record and
# the sidecar are written once per group, and a kill loses at most one group's work, which the
# rerun converts.
GROUP_FILES = 64
GROUP_SECONDS = 5.0


@dataclass
class _Pending:
    """A conversion whose files are staged, waiting for its group's commit."""

    result: ConvertResult
    transaction: Transaction


@dataclass
class _Batch:
    """A run of conversions: each sidecar read once, the bindings that this run adds to it, and
    the group of conversions waiting to be committed (a run with `force` starts a sidecar afresh
    once, not once per file)."""

    force: bool
    sidecars: dict[Path, Any] = field(default_factory=dict)
    written: dict[Path, tuple[ModelConfig, dict[str, str]]] = field(default_factory=dict)
    group: list[_Pending] = field(default_factory=list)
    pending: dict[Path, tuple[ModelConfig, dict[str, str]]] = field(default_factory=dict)  # the group's bindings
    opened: float = 0.0  # when the group's first conversion joined it

    def sidecar(self, path: Path):
        if path not in self.sidecars:
            self.sidecars[path] = read_sidecar(path)
        return self.sidecars[path]

    def _bound(self, members: list[_Pending]) -> dict[Path, tuple[ModelConfig, dict[str, str]]]:
        """Each sidecar as this batch leaves it once `members` are committed."""
        bound = dict(self.written)
        for member in members:
            result = member.result
            if result.config is not None:
                bindings = bound.get(result.sidecar, (result.config, {}))[1]
                bound[result.sidecar] = (result.config, {**bindings, result.output.name: result.weights_sha256})
        return bound

    def _planned_binding(self, path: Path) -> tuple[ModelConfig, dict[str, str]] | None:
        """The config and bindings this batch gives the sidecar at `path`, its group included."""
        if path in self.pending:
            config, bindings = self.pending[path]
            return config, {**self.written.get(path, (config, {}))[1], **bindings}
        return self.written.get(path)

    def _planned(self, path: Path):
        """The sidecar at `path` as this batch has left it, its group included."""
        planned = self._planned_binding(path)
        return Sidecar(path, *planned) if planned is not None else self.sidecar(path)

    def accepts(self, output: Path, config: ModelConfig) -> Path:
        """The sidecar to bind `output` in, as `check_sidecar_accepts` chooses it, knowing what
        this batch wrote there."""
        path = sidecar_path(output, config, writing=True, read=self._planned)
        planned = self._planned_binding(path)
        if planned is not None and not self.force:
            differences = config_differences(planned[0], config)
            if differences:
                raise ConfigError(
                    f"is about to hold another config, of a file converted before this one "
                    f"({'; '.join(differences)})", path=path,
                    fix=Words("pass force=True to replace it, or give this file another output folder",
                              "pass --force to replace it, or give this file another output folder"),
                )
        elif planned is None:
            check_sidecar_accepts(output, config, overwrite=self.force, read=self._planned)
        return path

    def add(self, result: ConvertResult, transaction: Transaction) -> None:
        """A conversion staged: it joins the group, which is committed once it is full or old."""
        if self.group and (self.group[0].transaction.folder != transaction.folder
                           or result.sidecar is not None and self.pending.keys() - {result.sidecar}):
            self.commit()  # one sidecar a group: writing one may update another (its bindings moving)
        if not self.group:
            self.opened = time.monotonic()
        self.group.append(_Pending(result, transaction))
        if result.config is not None:
            bindings = self.pending.get(result.sidecar, (result.config, {}))[1]
            bindings[result.output.name] = result.weights_sha256
            self.pending[result.sidecar] = (result.config, bindings)
        if len(self.group) >= GROUP_FILES or time.monotonic() - self.opened >= GROUP_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Commit the group: together, or, where that fails before anything took its name, one
        conversion at a time, each failing alone. A conversion whose commit fails keeps its
        previous files and binds nothing in the sidecar of the next."""
        members, self.group, self.pending = self.group, [], {}
        try:
            if len(members) > 1 and not self._commit_together(members):
                return
            for member in members:
                try:
                    self._stage_sidecars([member], member.transaction)
                    member.transaction.commit()
                except (CkptfmtError, OSError) as exc:
                    _abort([member])
                    _fail(member.result, exc)
                else:
                    self.written = self._bound([member])
        except BaseException:
            _abort(members)
            raise

    def _commit_together(self, members: list[_Pending]) -> bool:
        """Commit `members` as one transaction; whether they are left to commit one at a time
        (nothing took its name). Past the commit point a failure fails them all: their record
        finishes the commit for the next reader or writer."""
        shared = Transaction(members[0].transaction.folder, members[0].result.output.name)
        try:
            self._stage_sidecars(members, shared)
            commit_together([member.transaction for member in members], shared)
        except (CkptfmtError, OSError) as exc:
            if shared.open:
                shared.abort()
            if all(member.transaction.open for member in members):
                return True
            for member in members:
                _fail(member.result, exc)
            return False
        except BaseException:
            if shared.open:
                shared.abort()
            raise
        self.written = self._bound(members)
        return False

    def abort(self) -> None:
        """Remove what the group staged: an interrupted run names nothing it did not commit."""
        members, self.group, self.pending = self.group, [], {}
        _abort(members)

    def _stage_sidecars(self, members: list[_Pending], transaction: Transaction) -> None:
        """Stage in `transaction` each sidecar that `members` bind, with every binding this batch
        made there."""
        bound = self._bound(members)
        for path in dict.fromkeys(m.result.sidecar for m in members if m.result.config is not None):
            config, bindings = bound[path]
            write_sidecar(path.parent, config, bindings=bindings, overwrite=self.force, transaction=transaction,
                          path=path)


def _fail(result: ConvertResult, exc: Exception) -> None:
    result.status, result.error, result.failure = "failed", _failure(result.source, exc), exc


def _abort(members: list[_Pending]) -> None:
    for member in members:
        if member.transaction.open:
            member.transaction.abort()


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
    batch = _Batch(force=force)
    result = convert_one(Path(source), output, batch, config=config, overrides=overrides, model_type=model_type,
                         dtype=dtype, unsafe_pickle=unsafe_pickle, max_shard_size=max_shard_size,
                         allow_overflow=allow_overflow)
    batch.commit()
    if result.status == "failed":
        raise result.failure
    return result


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
        jobs += [(source, None if source in unreadable else output_for(source, root, output)) for source in found]
    if output is not None and Path(output).suffix == ".safetensors" and len(jobs) != 1:
        raise WriteError(
            f"is one file but there are {len(jobs)} sources; give a folder as the output",
            path=output,
        )
    refuse_shared_outputs(jobs)
    results = []
    batch = _Batch(force=options.pop("force", False))
    try:
        _convert_jobs(jobs, batch, unreadable, results, on_start, options)
    except BaseException:
        batch.abort()
        raise
    batch.commit()
    return results


def _convert_jobs(jobs: list[tuple[Path, Path | None]], batch: _Batch, unreadable: dict[Path, CkptfmtError],
                  results: list[ConvertResult], on_start: Callable[[int, int, Path], None] | None,
                  options: dict[str, Any]) -> None:
    """Convert each job in turn into the batch, appending its result; a failure stops no other."""
    for index, (source, target) in enumerate(jobs):
        if on_start is not None:
            on_start(index, len(jobs), source)
        try:
            if source in unreadable:
                raise unreadable[source]
            results.append(convert_one(source, target, batch, **options))
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


def _failure(source: Path, exc: Exception) -> str:
    """The error as one line that starts with the source it is about."""
    if isinstance(exc, CkptfmtError):
        text = str(exc)
        return text if exc.path == str(source) else f"{source}: {text}"
    where = f" ({exc.filename})" if getattr(exc, "filename", None) not in (None, str(source)) else ""
    return f"{source}: {exc.strerror or exc}{where}"
