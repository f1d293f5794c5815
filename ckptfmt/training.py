"""Training state beside a checkpoint: the optimizer's state in a pickle-free companion file,
and `load_training_state` to resume from it.

The companion `NAME.optimizer.safetensors` holds the optimizer's tensors as tensors and the rest
of its state dict as JSON in its header; the checkpoint's training record binds it by name and
digest, so that a companion of another checkpoint is refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .digest import digest_file
from .errors import CheckpointNotFoundError, ConfigError, IntegrityError
from .files import resolve_checkpoint_path
from .header import FORMAT_VERSION, KEY_FORMAT, KEY_FORMAT_VERSION, KEY_OPTIMIZER, read_header
from .jsondoc import loads_strict
from .tensors import load_tensors, write_safetensors

__all__ = ["OPTIMIZER_SUFFIX", "load_training_state", "read_optimizer_state", "write_optimizer_state"]

OPTIMIZER_SUFFIX = ".optimizer.safetensors"


def write_optimizer_state(
    path: str | os.PathLike, state_dict: Mapping[str, Any], *, overwrite: bool = False
) -> dict[str, str]:
    """Save an optimizer state dict as safetensors: tensors as tensors, the rest as JSON.

    Returns the training record's binding, `{"file": name, "sha256": digest}`.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = where if where not in tensors else f"{where}#{len(tensors)}"
            tensors[name] = value
            return {"__tensor__": name}
        if isinstance(value, Mapping):
            return {"__items__": [[encode(k, where), encode(v, f"{where}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{where}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{where}.{i}") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            return {"__float__": repr(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ConfigError(
            f"optimizer state {where!r} holds a {type(value).__name__}, which cannot be saved "
            "without pickle",
            path=path,
        )

    structure = encode(dict(state_dict), "optimizer")
    metadata = {
        KEY_FORMAT: "pt",
        KEY_FORMAT_VERSION: FORMAT_VERSION,
        KEY_OPTIMIZER: json.dumps(structure, sort_keys=True),
    }
    return {"file": path.name, "sha256": write_safetensors(path, tensors, metadata, overwrite=overwrite)}


def read_optimizer_state(path: str | os.PathLike, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Read an optimizer state written by `write_optimizer_state`, checking its digest."""
    header = read_header(path)
    if KEY_OPTIMIZER not in header.metadata:
        raise IntegrityError("is not a ckptfmt optimizer-state file", path=path)
    actual = digest_file(header)
    for wanted, what in ((header.weights_sha256, "its own digest"), (expected_sha256, "the checkpoint")):
        if wanted is not None and actual != wanted:
            raise IntegrityError(
                f"does not match {what} (sha256 {actual[:12]}... != {wanted[:12]}...); it was "
                "changed or belongs to another checkpoint",
                path=path,
            )
    tensors = load_tensors(header)

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            return tensors[value["__tensor__"]].clone()
        if "__items__" in value:
            return {decode(k): decode(v) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return float(value["__float__"])

    return decode(loads_strict(header.metadata[KEY_OPTIMIZER], what="optimizer state", path=path))


def load_training_state(checkpoint_path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore the optimizer saved with a checkpoint, and return its training record.

    Save, then resume with this, then step, gives bit for bit what never stopping gives.

    Example:
        >>> model = load_model("runs/joint/best_model.safetensors").train()
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> load_training_state("runs/joint/best_model.safetensors", optimizer)["epoch"]
        12
    """
    path = resolve_checkpoint_path(checkpoint_path)
    training = read_header(path).training()
    if optimizer is not None:
        binding = training.get("optimizer")
        if not binding:
            raise CheckpointNotFoundError(
                "was saved without optimizer state; pass optimizer= to save_model_with_config",
                path=path,
            )
        state = read_optimizer_state(path.parent / binding["file"], expected_sha256=binding["sha256"])
        optimizer.load_state_dict(state)
    return training
