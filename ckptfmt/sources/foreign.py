"""Safetensors written by someone else: a plain `save_file` of a state dict (the Hub, timm,
many training scripts) or a sharded checkpoint with its index (transformers, accelerate,
huggingface_hub's `save_torch_model`). They carry no ckptfmt metadata, so they are sources to
convert, read as a legacy file is: their tensors mapped, sorted by `layouts.unwrap`."""

from __future__ import annotations

from ..errors import HeaderError
from ..format.header import Header
from ..format.writer import load_tensors
from ..io.files import files_sha256, sha256_file
from .layouts import LegacyCheckpoint, unwrap

__all__ = ["read_foreign_safetensors"]


def read_foreign_safetensors(header: Header, *, hash_source: bool = True) -> LegacyCheckpoint:
    """A `.safetensors` file or a sharded checkpoint written by someone else (a plain
    `save_file`, the Hub, timm, transformers, accelerate, huggingface_hub's `save_torch_model`),
    read as a legacy file is: its tensors mapped from its files, sorted by `unwrap` (prefixes and
    all). Its source digest covers the index and every shard, in that order, or the one file."""
    path = header.path
    checkpoint = unwrap(load_tensors(header), path)
    if header.is_sharded:
        checkpoint.serialization = f"safetensors index and {len(header.files)} shards"
        checkpoint.destinations["weights"] = [f"{len(header.files)} shards"]
    else:
        checkpoint.serialization = "safetensors"
    if hash_source:
        checkpoint.sha256 = (files_sha256([path, *header.files], error=HeaderError) if header.is_sharded
                             else sha256_file(path, error=HeaderError))
    return checkpoint
