"""The sidecar: `model_config.json` beside the weights, the original system's layout. It mirrors
the config embedded in ckptfmt files for tools that read the old layout, and binds each weights
file it describes by its digest, so that a sidecar that drifted from its weights is found.

A folder's `model_config.json` serves the checkpoints of one config (the original system's
`best_model` and `last_model`); a checkpoint of another config in the same folder gets a sidecar
of its own, `NAME.model_config.json`. `sidecar_path` is the one rule that says which file
describes a checkpoint, for writers and readers alike, so that what one writes is what the
others find, and a write for one checkpoint never changes what describes another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import OVERWRITE_FIX, CkptfmtError, ConfigError
from ..format.header import INDEX_SUFFIX
from ..io.atomic import atomic_write, write_all
from ..io.transaction import Transaction
from .model_config import SIDECAR_NAME, ModelConfig, config_differences, read_config_file

__all__ = [
    "SIDECAR_NAME", "SIDECAR_SUFFIX", "Sidecar", "check_sidecar_accepts", "checkpoint_stem", "read_sidecar",
    "sidecar_path", "write_sidecar",
]

SIDECAR_SUFFIX = ".model_config.json"  # NAME.model_config.json: one checkpoint's own sidecar


def checkpoint_stem(name: str) -> str:
    """The NAME a checkpoint's own files share: `small` for small.safetensors and small.pth,
    `model` for the shards' model.safetensors.index.json.

    Example:
        >>> checkpoint_stem("model.safetensors.index.json"), checkpoint_stem("best_model.pth")
        ('model', 'best_model')
    """
    return name[: -len(INDEX_SUFFIX)] if name.endswith(INDEX_SUFFIX) else Path(name).stem


@dataclass(frozen=True)
class Sidecar:
    """A parsed sidecar: the config and the weights files it is bound to."""

    path: Path
    config: ModelConfig
    weights: dict[str, str]  # file name -> ckptfmt.weights_sha256

    @property
    def stems(self) -> set[str]:
        """The checkpoints bound here, by the NAME their files share."""
        return {checkpoint_stem(name) for name in self.weights}

    def binds_only(self, stem: str) -> bool:
        """Bound to `stem`'s checkpoint and no other (stops at the first other: a batch asks it
        for each file it converts into a folder whose sidecar binds the files before)."""
        return bool(self.weights) and all(checkpoint_stem(name) == stem for name in self.weights)

    def binds_others(self, stem: str) -> bool:
        """Bound to other checkpoints and not to `stem`'s: it describes other weights."""
        return bool(self.weights) and stem not in self.stems


def read_sidecar(path: str | os.PathLike) -> Sidecar | None:
    """The sidecar at `path` (a `model_config.json` or `NAME.model_config.json`; a folder: its
    `model_config.json`), or None when there is none.

    Example:
        >>> read_sidecar("runs/joint").weights
        {'best_model.safetensors': '3f2a...'}
    """
    path = Path(path)
    if path.name != SIDECAR_NAME and not path.name.endswith(SIDECAR_SUFFIX):
        path = path / SIDECAR_NAME
    if not os.path.lexists(path):
        return None
    document = read_config_file(path)
    weights = document.pop("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise ConfigError("'weights' must map file names to digests", path=path)
    return Sidecar(path, ModelConfig.from_dict(document, path=path), weights)


def sidecar_path(
    checkpoint: str | os.PathLike, config: ModelConfig | None = None, *, writing: bool = False,
    read: Callable[[Path], Sidecar | None] = read_sidecar,
) -> Path | None:
    """The sidecar that describes `checkpoint` (a weights file, an index of shards, a legacy
    file or folder): `NAME.model_config.json` beside it when there is one; else the folder's
    `model_config.json`, unless that one describes other weights (it is bound to other
    checkpoints, not to this one, and holds another config than `config`).

    A reader passes the checkpoint's own config, or None when it has none yet (a legacy file:
    whether the folder's sidecar is its own is then for the weights to say). A writer passes
    `writing=True` and the config it is about to write, and gets the file to write: the
    folder's `model_config.json` when there is none, when it holds this config, or when it is
    bound to this checkpoint alone; else `NAME.model_config.json`, so that a folder's sidecar,
    hand-written or bound to other checkpoints, is left to those it describes. `read` reads a
    sidecar (a batch reads each once).

    Returns:
        The path; None when no sidecar describes the checkpoint (a reader's only).

    Example:
        >>> sidecar_path("runs/mixed/big.safetensors", big_config, writing=True)
        PosixPath('runs/mixed/big.model_config.json')
    """
    checkpoint = Path(checkpoint)
    stem = checkpoint_stem(checkpoint.name)
    own = checkpoint.with_name(stem + SIDECAR_SUFFIX)
    if os.path.lexists(own):
        return own
    shared_path = checkpoint.with_name(SIDECAR_NAME)
    shared = read(shared_path)
    if shared is None:
        return shared_path if writing else None
    if writing:
        ours = shared.binds_only(stem) or config is not None and not _differences(shared.config, config)
        return shared_path if ours else own
    if config is None or not shared.binds_others(stem) or not config_differences(config, shared.config):
        return shared_path
    return None


def _differences(existing: ModelConfig, config: ModelConfig) -> list[str]:
    """Differences between a sidecar's config and the one about to be written, both complete."""
    try:
        existing = existing.checked()
    except CkptfmtError:
        pass  # another architecture, or an invalid sidecar: compared as it is
    return config_differences(existing, config)


def _accepts(
    path: Path, config: ModelConfig, *, overwrite: bool, read: Callable[[Path], Sidecar | None],
) -> Sidecar | None:
    """The sidecar at `path` (or None), after checking that `config` may be written there."""
    existing = read(path)
    if existing is not None and not overwrite:
        differences = _differences(existing.config, config)
        if differences:
            raise ConfigError(
                f"holds another config ({'; '.join(differences)})", path=existing.path, fix=OVERWRITE_FIX,
            )
    return existing


def check_sidecar_accepts(
    checkpoint: str | os.PathLike, config: ModelConfig, *, overwrite: bool,
    read: Callable[[Path], Sidecar | None] = read_sidecar,
) -> Path:
    """The sidecar to write for `checkpoint` (see `sidecar_path`), after checking that `config`
    may be written there: one holding another config (this checkpoint's own, written before)
    is an error naming the fields, unless `overwrite`. Called before the weights are written,
    so that a refusal leaves nothing half done.

    Example:
        >>> check_sidecar_accepts("runs/mixed/big.safetensors", big_config, overwrite=False)
        PosixPath('runs/mixed/big.model_config.json')
    """
    path = sidecar_path(checkpoint, config, writing=True, read=read)
    _accepts(path, config, overwrite=overwrite, read=read)
    return path


def write_sidecar(
    folder: str | os.PathLike, config: ModelConfig, weights_file: str | None = None,
    weights_sha256: str | None = None, *, overwrite: bool = False, bindings: Mapping[str, str] | None = None,
    unbind: Collection[str] = (), sync_folder: bool = True, path: str | os.PathLike | None = None,
    transaction: Transaction | None = None,
) -> Path:
    """Write or update the sidecar that describes `weights_file` in `folder` (see
    `sidecar_path`), binding it (or each of `bindings`, file name -> digest) to its digest.

    Several checkpoints of one config share a folder's `model_config.json` (best_model and
    last_model, as in the seed), each with its own binding; a checkpoint of another config gets
    `NAME.model_config.json`, and the folder's `model_config.json` drops its binding there, so
    that no file binds a checkpoint it no longer describes. `unbind` drops the bindings of
    files that are gone (a `CheckpointManager`'s retention). Legacy .pth files get no binding,
    and with no weights file named the folder's `model_config.json` is written. A sidecar
    holding another config is an error naming the fields, unless `overwrite`, which starts it
    afresh. `path` is the sidecar that `check_sidecar_accepts` chose, for a caller that chose it
    before. With a `transaction` (the checkpoint's), it is staged there, to take its name with
    the weights it binds.

    Example:
        >>> write_sidecar("runs/joint", config, "best_model.safetensors", digest)
        PosixPath('runs/joint/model_config.json')
        >>> write_sidecar("runs/joint", config, unbind={"step-00000100.safetensors"})
        PosixPath('runs/joint/model_config.json')
    """
    bindings = {**(bindings or {}), **({weights_file: weights_sha256} if weights_file else {})}
    if path is None:
        path = sidecar_path(Path(folder) / next(iter(bindings)), config, writing=True) if bindings \
            else Path(folder) / SIDECAR_NAME
    path = Path(path)
    existing = _accepts(path, config, overwrite=overwrite, read=read_sidecar)
    if existing is not None and not _differences(existing.config, config):
        bindings = {**{k: v for k, v in existing.weights.items() if k not in unbind}, **bindings}
    _write(path, {**config.to_dict(), "weights": dict(sorted(bindings.items()))}, existing is not None,
           sync_folder=sync_folder, transaction=transaction)
    if path.name != SIDECAR_NAME:
        _unbind_moved(path.with_name(SIDECAR_NAME), set(bindings), sync_folder=sync_folder, transaction=transaction)
    return path


def _write(path: Path, document: dict, exists: bool, *, sync_folder: bool, transaction: Transaction | None) -> None:
    opened = atomic_write(path, overwrite=exists, sync_folder=sync_folder) if transaction is None \
        else transaction.stage(path, overwrite=exists)
    with opened as fd:
        write_all(fd, (json.dumps(document, sort_keys=True, indent=2) + "\n").encode())


def _unbind_moved(shared_path: Path, names: set[str], *, sync_folder: bool, transaction: Transaction | None) -> None:
    """Checkpoints that moved to their own sidecar leave the folder's: its bindings of them
    would name weights it does not describe."""
    shared = read_sidecar(shared_path)
    if shared is None or not names & shared.weights.keys():
        return
    kept = {k: v for k, v in shared.weights.items() if k not in names}
    _write(shared_path, {**shared.config.to_dict(), "weights": dict(sorted(kept.items()))}, True,
           sync_folder=sync_folder, transaction=transaction)
