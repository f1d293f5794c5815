"""Safetensors written by someone else: a plain `save_file` of a state dict (the Hub, timm,
many training scripts) or a sharded checkpoint with its index (transformers, accelerate,
huggingface_hub's `save_torch_model`). They carry no ckptfmt metadata, so they are sources to
convert, read as a legacy file is: their tensors mapped, sorted by `layouts.unwrap`. A Hub-style
folder describes them in a `config.json` beside them, which the registered architecture whose
library wrote it reads (`read_hub_config`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from ..config.model_config import ModelConfig, read_config_file
from ..config.registry import get_model_entry, registered_model_types
from ..errors import HeaderError, PluginError, UnknownModelTypeError
from ..format.header import Header
from ..format.writer import load_tensors
from ..io.files import files_sha256, sha256_file
from .layouts import LegacyCheckpoint, unwrap

__all__ = ["HUB_CONFIG_NAME", "HUB_WEIGHTS_NAME", "foreign_sha256", "read_foreign_safetensors", "read_hub_config"]

# A Hub-style folder, as timm's `push_to_hub` and `save_for_hf` (and transformers) write it.
HUB_CONFIG_NAME = "config.json"
HUB_WEIGHTS_NAME = "model.safetensors"


def read_foreign_safetensors(header: Header, *, hash_source: bool = True) -> LegacyCheckpoint:
    """A `.safetensors` file or a sharded checkpoint written by someone else (a plain
    `save_file`, the Hub, timm, transformers, accelerate, huggingface_hub's `save_torch_model`),
    read as a legacy file is: its tensors mapped from its files, sorted by `unwrap` (prefixes and
    all), with its source digest (`foreign_sha256`)."""
    path = header.path
    checkpoint = unwrap(load_tensors(header), path)
    if header.is_sharded:
        checkpoint.serialization = f"safetensors index and {len(header.files)} shards"
        checkpoint.destinations["weights"] = [f"{len(header.files)} shards"]
    else:
        checkpoint.serialization = "safetensors"
    if hash_source:
        checkpoint.sha256 = foreign_sha256(header)
    return checkpoint


def foreign_sha256(header: Header) -> str:
    """The source digest of safetensors written by someone else, as a conversion records it:
    over the index and every shard, in that order, or over the one file.

    Example:
        >>> foreign_sha256(read_header("hub/resnet18/model.safetensors"))  # doctest: +SKIP
        '9c1f...'
    """
    if header.is_sharded:
        return files_sha256([header.path, *header.files], error=HeaderError)
    return sha256_file(header.path, error=HeaderError)


def read_hub_config(weights: str | os.PathLike, *, model_type: str | None = None) -> ModelConfig | None:
    """The config that the `config.json` beside `weights` gives them, as the first registered
    architecture (or `model_type` alone) whose `read_foreign_config` knows the document says
    it; None when there is no such file, or no architecture reads it (another library's). The
    file is read with the strict JSON rules and size cap of every config file.

    Example:
        >>> read_hub_config("hub/resnet18/model.safetensors").params["model_name"]
        'resnet18'
    """
    path = Path(weights).with_name(HUB_CONFIG_NAME)
    if not os.path.lexists(path):
        return None
    document = read_config_file(path)
    for name in [model_type] if model_type else registered_model_types():
        try:
            entry = get_model_entry(name)
        except (UnknownModelTypeError, PluginError):
            continue  # identification, asked after this, reports a plugin that fails
        if entry.read_foreign_config is None:
            continue
        try:
            fields = entry.read_foreign_config(copy.deepcopy(document))
        except Exception as exc:
            raise PluginError(f"model_type {name!r}: its read_foreign_config raised {type(exc).__name__}: {exc}",
                              path=path) from None
        if fields is not None:
            return ModelConfig.from_dict({**fields, "model_type": name}, path=path)
    return None
