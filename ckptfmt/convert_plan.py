"""Where a conversion reads and writes, and whether it is needed: the sources a folder holds
(`find_checkpoints`), each one's output (`default_output`), the checks made before anything is
read (`plan_conversion`), and the skip of a source already converted with the same options.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.model_config import ModelConfig
from .convert_options import (
    CAST_DTYPES,
    option_differences,
    recorded_conversion,
    refuse_other_options,
)
from .errors import (
    CkptfmtError,
    ConfigError,
    LegacyCheckpointError,
    Words,
    WriteError,
    cli_value,
)
from .format.header import INDEX_SUFFIX, looks_like_safetensors, read_header
from .format.index import is_foreign_index, is_index, parse_size
from .io.atomic import check_writable
from .io.files import (
    FolderWalk,
    files_sha256,
    is_regular_file,
    open_regular,
    sha256_file,
    walk_files,
)
from .io.folder import name_fits
from .io.jsondoc import has_surrogate
from .io.transaction import clean_folder
from .sources.dcp import dcp_folder_sha256, is_dcp_folder
from .sources.foreign import HUB_CONFIG_NAME, HUB_WEIGHTS_NAME
from .sources.legacy import LEGACY_SUFFIXES

__all__ = ["ConvertResult", "Plan", "default_output", "find_checkpoints", "output_for", "plan_conversion",
           "refuse_shared_outputs"]


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


def default_output(source: Path) -> Path:
    if is_index(source):  # NAME.safetensors.index.json -> NAME.safetensors, beside its shards
        return source.with_name(source.name[: -len(INDEX_SUFFIX)] + ".safetensors")
    return source.with_suffix(".safetensors")


def _index_sha256(index: Path) -> str:
    return files_sha256([index, *read_header(index).files], error=LegacyCheckpointError)


@dataclass
class Plan:
    """Where one conversion reads and writes, worked out before anything is read."""

    source: Path
    output: Path  # the .safetensors, or the index when the weights are written as shards
    plain: Path  # the .safetensors name the output stands for (and the companion's stem)
    shard_size: int | None
    from_dcp: bool
    hash_source: Callable[[Path], str]
    options: dict[str, Any]  # those that shape the output, recorded in provenance


def plan_conversion(source: Path, output: str | os.PathLike | None, *, dtype: str | None, force: bool,
          max_shard_size: int | str | None, options: dict[str, Any]) -> Plan | ConvertResult:
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
    return Plan(source, output, plain, shard_size, from_dcp, hash_source, options)


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


def refuse_shared_outputs(jobs: list[tuple[Path, Path | None]]) -> None:
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


def output_for(source: Path, root: Path, output: str | os.PathLike | None) -> Path | None:
    if output is None:
        return None
    output = Path(output)
    if output.suffix == ".safetensors":
        return output
    relative = source.relative_to(root) if root.is_dir() and source != root else Path(source.name)
    return output / default_output(relative)
