"""The sidecar: `model_config.json` beside the weights, the original system's layout. It mirrors
the config embedded in ckptfmt files for tools that read the old layout, and binds each weights
file it describes by its digest, so that a sidecar that drifted from its weights is found."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import OVERWRITE_FIX, CkptfmtError, ConfigError
from ..io.atomic import atomic_write, write_all
from ..io.transaction import Transaction
from .model_config import SIDECAR_NAME, ModelConfig, config_differences, read_config_file

__all__ = ["SIDECAR_NAME", "Sidecar", "check_sidecar_accepts", "read_sidecar", "write_sidecar"]


@dataclass(frozen=True)
class Sidecar:
    """A parsed `model_config.json`: the config and the weights files it is bound to."""

    path: Path
    config: ModelConfig
    weights: dict[str, str]  # file name -> ckptfmt.weights_sha256


def read_sidecar(folder: str | os.PathLike) -> Sidecar | None:
    """The sidecar in `folder`, or None when there is none."""
    path = Path(folder) / SIDECAR_NAME
    if not os.path.lexists(path):
        return None
    document = read_config_file(path)
    weights = document.pop("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise ConfigError("'weights' must map file names to digests", path=path)
    return Sidecar(path, ModelConfig.from_dict(document, path=path), weights)


def _same_config(existing: ModelConfig, config: ModelConfig) -> list[str]:
    """Differences between a sidecar's config and the one about to be written, both complete."""
    try:
        existing = existing.checked()
    except CkptfmtError:
        pass  # another architecture, or an invalid sidecar: compared as it is
    return config_differences(existing, config)


def check_sidecar_accepts(folder: str | os.PathLike, config: ModelConfig, *, overwrite: bool) -> Sidecar | None:
    """The sidecar in `folder` (or None), after checking that `config` may be written there:
    a sidecar holding another config is an error naming the fields, unless `overwrite`.
    Called before the weights are written, so that a refusal leaves nothing half done."""
    existing = read_sidecar(folder)
    if existing is not None and not overwrite:
        differences = _same_config(existing.config, config)
        if differences:
            raise ConfigError(
                f"holds another config ({'; '.join(differences)})", path=existing.path,
                fix=OVERWRITE_FIX,
            )
    return existing


def write_sidecar(
    folder: str | os.PathLike, config: ModelConfig, weights_file: str | None = None,
    weights_sha256: str | None = None, *, overwrite: bool = False, bindings: Mapping[str, str] | None = None,
    sync_folder: bool = True, transaction: Transaction | None = None,
) -> Path:
    """Write or update `folder/model_config.json`, binding `weights_file` (or each of
    `bindings`, file name -> digest) to its digest.

    Several checkpoints of one architecture share a folder's sidecar (best_model and
    last_model, as in the seed), each with its own binding; legacy .pth files get none. A
    sidecar holding another config is an error naming the fields, unless `overwrite`, which
    starts it afresh. With a `transaction` (the checkpoint's), it is staged there, to take its
    name with the weights it binds.
    """
    existing = check_sidecar_accepts(folder, config, overwrite=overwrite)
    bindings = {**(bindings or {}), **({weights_file: weights_sha256} if weights_file else {})}
    if existing is not None and not _same_config(existing.config, config):
        bindings = {**existing.weights, **bindings}
    document = {**config.to_dict(), "weights": dict(sorted(bindings.items()))}
    path = Path(folder) / SIDECAR_NAME
    opened = atomic_write(path, overwrite=existing is not None, sync_folder=sync_folder) if transaction is None \
        else transaction.stage(path, overwrite=existing is not None)
    with opened as fd:
        write_all(fd, (json.dumps(document, sort_keys=True, indent=2) + "\n").encode())
    return path
