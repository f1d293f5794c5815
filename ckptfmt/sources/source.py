"""What a checkpoint holds, read once (`read_source`): the first step of the one resolution of a
checkpoint (see `ckptfmt.resolve`), which every command starts from. A ckptfmt file or sharded
index is read by its header (no tensor is touched); anything else, a legacy `.pth`/`.pt`, a
Lightning `.ckpt`, a `torch.distributed.checkpoint` folder, or a `.safetensors` file or set of
shards written by someone else, is read into tensors and sorted by `layouts`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..format.header import Header, looks_like_safetensors, read_header
from ..format.index import is_index, resolve_checkpoint_path

if TYPE_CHECKING:
    import torch

    from .layouts import LegacyCheckpoint

__all__ = ["Source", "read_source"]


@dataclass
class Source:
    """What a checkpoint holds, read once: `header` for a ckptfmt file (or any .safetensors
    read `light`ly, without torch), else `legacy`, its tensors sorted by `layouts`."""

    path: Path
    header: Header | None = None
    legacy: LegacyCheckpoint | None = None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.header is not None:
            return self.header.shapes()
        return {name: tuple(t.shape) for name, t in self.legacy.state_dict.items()}

    def dtypes(self, cast_to: torch.dtype | None = None) -> dict[str, str]:
        """Each tensor's dtype name; with `cast_to`, as a cast of every floating-point tensor
        to it would write them."""
        if self.header is not None:
            return self.header.dtypes()
        from ..format.writer import DTYPE_NAMES

        return {name: DTYPE_NAMES.get(cast_to if cast_to is not None and t.is_floating_point() else t.dtype, str(t.dtype))
                for name, t in self.legacy.state_dict.items()}

    @property
    def training(self) -> dict[str, Any]:
        return self.header.training() if self.header is not None else self.legacy.training

    def sha256(self) -> str:
        """The digest a conversion records of this source as what it converted: a legacy
        file's or a DCP folder's (computed when read, unless `hash_source=False`), or that of
        safetensors written by someone else; "" for a ckptfmt checkpoint, which is no source of
        a conversion."""
        if self.legacy is not None:
            return self.legacy.sha256
        if self.header.is_ckptfmt:
            return ""
        from .foreign import foreign_sha256

        return foreign_sha256(self.header)

    def tensors(self, device: Any = "cpu") -> dict[str, torch.Tensor]:
        """The weights as a state dict: a ckptfmt file's memory-mapped, a legacy file's moved."""
        if self.header is not None:
            from ..format.writer import load_tensors

            return load_tensors(self.header, device=device)
        return {name: tensor.to(device) for name, tensor in self.legacy.state_dict.items()}


def read_source(
    path: str | os.PathLike, *, unsafe_pickle: bool = False, light: bool = False, mmap: bool = False,
    hash_source: bool = True,
) -> Source:
    """Read what a checkpoint holds, once.

    Args:
        path: a file, a sharded checkpoint's index, a folder holding one checkpoint, or a
            `torch.distributed.checkpoint` folder. `NAME.pth` saved as `NAME.safetensors`
            (as `save_model_with_config` does) is found there.
        unsafe_pickle: for a legacy pickle only; allow arbitrary pickles (runs code from it).
        light: read any .safetensors by its header alone, importing no torch (`inspect`).
        mmap, hash_source: for a legacy file, see `read_legacy_checkpoint`.

    Example:
        >>> read_source("runs/joint/best_model.safetensors").header.config_dict()["depth"]
        3
    """
    from .dcp import is_dcp_folder

    path = Path(path)
    if is_dcp_folder(path):
        from .dcp import read_dcp_checkpoint

        return Source(path, legacy=read_dcp_checkpoint(path, hash_source=hash_source))
    path = resolve_checkpoint_path(path)
    if is_index(path) or looks_like_safetensors(path):
        header = read_header(path)
        if header.is_ckptfmt or light:
            return Source(path, header=header)
        from .foreign import read_foreign_safetensors

        return Source(path, legacy=read_foreign_safetensors(header, hash_source=hash_source))
    from .legacy import read_legacy_checkpoint

    return Source(path, legacy=read_legacy_checkpoint(path, unsafe_pickle=unsafe_pickle, hash_source=hash_source,
                                                      mmap=mmap))
