"""The documents in a ckptfmt header, as they are written: the config, the training record and
provenance, each JSON under the rules the reader enforces (see `jsondoc`)."""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping
from typing import Any, Protocol

from ..errors import ConfigError
from ..io.jsondoc import dumps_strict
from .header import FORMAT_VERSION, KEY_CONFIG, KEY_FORMAT, KEY_FORMAT_VERSION, KEY_PROVENANCE, KEY_TRAINING


class _Config(Protocol):
    """What the format needs of a config (a `ModelConfig`): its document. The format comes before
    the config in the flow of data, so it names no config class."""

    def to_dict(self) -> dict[str, Any]: ...

__all__ = ["build_metadata", "provenance_record", "training_record"]


def build_metadata(
    config: _Config | None, *, training: Mapping[str, Any], provenance: Mapping[str, Any]
) -> dict[str, str]:
    """The `__metadata__` of a ckptfmt file (see the README's format section); the weights
    digest is added by `write_safetensors` as it writes."""
    metadata = {
        KEY_FORMAT: "pt",
        KEY_FORMAT_VERSION: FORMAT_VERSION,
        KEY_PROVENANCE: dumps_strict(provenance, what="provenance"),
    }
    if config is not None:
        metadata[KEY_CONFIG] = dumps_strict(config.to_dict(), what="config")
    if training:
        metadata[KEY_TRAINING] = dumps_strict(training, what="the training record")
    return metadata


def provenance_record(**extra: Any) -> dict[str, Any]:
    """When and by what a file was written, plus `extra` (the source of a conversion, a cast)."""
    import torch

    from ..version import __version__

    return {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ckptfmt": __version__,
        "torch": torch.__version__,
        **extra,
    }


def training_record(epoch: Any, metrics: Any, *, global_step: Any = None,
                    path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The training record of `save_model_with_config`'s epoch, metrics and global step, checked."""
    training: dict[str, Any] = {}
    for name, count in (("epoch", epoch), ("global_step", global_step)):
        if count is not None:
            if type(count) is not int or count < 0:
                raise ConfigError(f"{name} must be a non-negative int, not {count!r}", path=path)
            training[name] = count
    if metrics is not None:
        if not isinstance(metrics, Mapping):
            raise ConfigError(f"metrics must be a dict of numbers, not {type(metrics).__name__}", path=path)
        clean = {}
        for name, value in metrics.items():
            if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
                value = value.item()
            if type(value) not in (int, float) or not math.isfinite(value):
                raise ConfigError(f"metric {name!r} must be a finite number, not {value!r}", path=path)
            clean[str(name)] = value
        training["metrics"] = clean
    return training
