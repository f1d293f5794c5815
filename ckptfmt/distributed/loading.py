"""Loading a checkpoint into a sharded model (`load_model`, `load_into`, `shard_model`), each
rank reading only its own slices of each tensor.

Which slice a rank holds comes from DTensor itself (`__create_chunk_list__`, the protocol
torch.distributed.checkpoint uses), and the collectives are torch's (`get/set_model_state_dict`).
A slice that is one run of bytes in the file (FSDP2 shards dim 0, so each rank's rows are) is
read with `pread` straight into the rank's shard: no memory map, no staging copy. Any other
slice is read through safetensors' `get_slice`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import ConfigError, ShapeMismatchError
from ..format.header import Header, TensorInfo, looks_like_safetensors, read_header
from ..format.index import resolve_checkpoint_path
from ..io.files import open_regular

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["load_into", "load_model", "shard_model"]


def shard_model(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """The default `shard=` of `load_model`: FSDP2's `fully_shard` on each top-level child that
    holds parameters (on each member of a ModuleList or ModuleDict child, which have no forward
    of their own to gather around), then on the root.

    Example:
        >>> with torch.device("meta"):
        ...     model = MultiTaskUNet(base_filters=64)
        >>> shard_model(model, init_device_mesh("cuda", (8,)))
    """
    import torch
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if isinstance(child, torch.nn.ModuleDict):
            members = list(child.values())
        elif isinstance(child, torch.nn.ModuleList):
            members = list(child)
        else:
            members = [child]
        for member in members:
            if any(True for _ in member.parameters()):
                fully_shard(member, mesh=mesh)
    fully_shard(model, mesh=mesh)


def load_model(
    checkpoint_path: str | os.PathLike,
    *,
    mesh: DeviceMesh,
    shard: Callable[[torch.nn.Module, DeviceMesh], Any] = shard_model,
    verify: bool = False,
    **overrides: Any,
) -> torch.nn.Module:
    """Rebuild a checkpoint's model sharded over `mesh`, each rank reading only its own slices.

    Call it on every rank. The model is built on the meta device from the checkpoint's config
    (no memory, no random init), checked against the file's shapes, sharded by `shard`, given
    memory for its own shards only, and filled from the file (see `load_into`). Tensors keep
    the file's dtypes, as `ckptfmt.load_model` gives them. Buffers (BatchNorm statistics) are
    replicated: each rank reads them whole. The model is returned in eval mode.

    Args:
        checkpoint_path: a .safetensors written by ckptfmt, a sharded checkpoint's index, or
            the folder holding either.
        mesh: the DeviceMesh to shard over, e.g. `init_device_mesh("cuda", (world_size,))`;
            the shards go to its device type.
        shard: called as `shard(model, mesh)` on the meta model, before any memory is given
            to it; it shards the model in place. By default FSDP2 on each top-level child and
            the root (`shard_model`). Pass your own for another policy: a `fully_shard` with a
            `shard_placement_fn`, a mixed-precision policy, tensor parallelism.
        verify: check the tensors against their digests first (see `load_into`).
        **overrides: config fields to change, checked against the weights before building.

    Raises:
        ShapeMismatchError: the config (with overrides) does not fit the weights, or the
            architecture has buffers the file has no values for.
        LegacyCheckpointError: a `.pth`; convert it first (`ckptfmt convert`).

    Example:
        >>> dist.init_process_group("nccl")   # torchrun --nproc-per-node 8 train.py
        >>> mesh = init_device_mesh("cuda", (dist.get_world_size(),))
        >>> model = ckptfmt.distributed.load_model("runs/best_model.safetensors", mesh=mesh)
    """
    import torch

    from ..checkpoint import open_checkpoint
    from ..config.registry import get_model_entry
    from ..errors import LegacyCheckpointError

    path = resolve_checkpoint_path(checkpoint_path)
    if not looks_like_safetensors(path):  # refused before it is read: every rank would read all of it
        raise LegacyCheckpointError(
            "is a legacy checkpoint, which cannot be read in slices; convert it first "
            "(`ckptfmt convert`), then load the .safetensors it gives",
            path=path,
        )
    opened = open_checkpoint(path, overrides=overrides)
    model = get_model_entry(opened.config.model_type).build_on_meta(opened.config.params)
    state = model.state_dict()
    unsaved = [name for name, _ in model.named_buffers() if name not in state]
    if unsaved:
        raise ShapeMismatchError(
            f"the file has no values for {', '.join(unsaved[:5])}: buffers that the architecture does not save "
            "(persistent=False), which a model built on the meta device cannot fill. Load it in one "
            "process with ckptfmt.load_model",
            path=opened.path,
        )
    _take_file_dtypes(model, opened.header)
    shard(model, mesh)
    model.to_empty(device=mesh.device_type)
    with torch.no_grad():
        load_into(model, opened.path, verify=verify)
    return model.eval()


def load_into(model: torch.nn.Module, checkpoint_path: str | os.PathLike, *, strict: bool = True,
              verify: bool = False) -> None:
    """Fill a model, sharded or not, from a checkpoint, each rank reading only its own slices.

    For each tensor of the model's state dict (torch's `get_model_state_dict`), a DTensor
    reads the box of the global tensor that this rank holds, and a plain tensor (a replicated
    buffer) reads all of it; then `set_model_state_dict` sets them. Nothing else is read. The
    file's shapes are checked first; a tensor of another floating-point dtype is cast.

    Args:
        model: the model, e.g. built on the meta device, sharded with `fully_shard`, then
            given memory with `model.to_empty(device=...)`.
        checkpoint_path: a .safetensors file, a sharded checkpoint's index, or their folder.
        strict: every tensor of the model must be in the file and every tensor of the file
            in the model, as in `load_state_dict`.
        verify: check what is read first: each tensor that a rank reads against its own
            digest, the checks divided among the ranks that read it, so that together they
            read each byte once; or, for a file that records no tensor digests (format 1
            or 2), the whole file's digest on each rank.

    Raises:
        ShapeMismatchError: a tensor is missing, unexpected, or of another shape or kind.

    Example:
        >>> with torch.device("meta"):
        ...     model = MyNet(width=4096)
        >>> for block in model.blocks:
        ...     fully_shard(block, mesh=mesh)
        >>> fully_shard(model, mesh=mesh)
        >>> model.to_empty(device="cuda")
        >>> ckptfmt.distributed.load_into(model, "runs/best_model.safetensors")
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from ..config.shapes import check_state
    from ..format.writer import DTYPE_NAMES

    path = resolve_checkpoint_path(checkpoint_path)
    header = read_header(path)
    targets = get_model_state_dict(model)
    held = {name: (tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype))) for name, t in targets.items()}
    problems = check_state(held, header.shapes(), header.dtypes(), strict=strict)
    if problems:
        more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ShapeMismatchError(
            f"the model does not fit the file: it expects {problems[0]}{more}; build the model the file was saved "
            "from (ckptfmt.distributed.load_model builds it from the file's config)",
            path=path,
        )
    aliases = header.aliases
    if verify:
        _verify_reads(header, [aliases.get(n, n) for n in targets if aliases.get(n, n) in header.tensors])
    reader = _SliceReader()
    try:
        with torch.no_grad():
            for name, target in targets.items():
                info = header.tensors.get(aliases.get(name, name))
                if info is None:  # strict=False: left as it is
                    continue
                if isinstance(target, DTensor):
                    local = target.to_local()
                    offsets, sizes = _local_box(target, name, path)
                    reader.read(info, offsets, sizes, local)
                else:
                    reader.read(info, (0,) * target.dim(), tuple(target.shape), target)
    finally:
        reader.close()
    set_model_state_dict(model, targets, options=StateDictOptions(strict=strict))


def _verify_reads(header: Header, names: list[str]) -> None:
    """`verify=True` of `load_into`: the tensors the ranks read, each checked by one rank; an
    error on any rank is raised on every rank, so that none waits in a collective."""
    import torch.distributed as dist

    from ..format.digest import check_tensors, divide_checks, verify_read

    if not dist.is_initialized() or any(info.digest is None for info in header.tensors.values()):
        verify_read(header, names)
        return
    reads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reads, names)
    failure = None
    try:
        check_tensors(header, divide_checks(header, reads)[dist.get_rank()])
    except errors.CkptfmtError as exc:
        failure = (exc.message, exc.path)
    failures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    for found in failures:
        if found is not None:
            raise errors.IntegrityError(found[0], path=found[1])


def _local_box(tensor: Any, name: str, path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where this rank's local tensor sits in the global one: (offsets, sizes), from the
    DTensor's own account (the chunk list torch.distributed.checkpoint plans with)."""
    chunks = tensor.__create_chunk_list__()
    local_shape = tuple(tensor.to_local().shape)
    if len(chunks) != 1 or tuple(chunks[0].sizes) != local_shape:
        raise ConfigError(
            f"tensor {name!r} is laid out over the mesh as {tensor.placements}, which is not one box of the "
            "global tensor per rank; shard it with Shard and Replicate placements",
            path=path,
        )
    return tuple(chunks[0].offsets), local_shape


class _SliceReader:
    """Reads boxes of tensors out of a checkpoint's files, keeping each file open once."""

    def __init__(self) -> None:
        self._descriptors: dict[Path, int] = {}
        self._handles: dict[Path, Any] = {}

    def read(self, info: TensorInfo, offsets: tuple[int, ...], sizes: tuple[int, ...], out: torch.Tensor) -> None:
        """Fill `out` with the box `offsets`, `sizes` of the tensor `info` describes."""
        import torch

        from ..format.writer import TORCH_DTYPES

        count = math.prod(sizes)
        if count == 0:
            return
        span = _contiguous_span(info.shape, offsets, sizes)
        if span is None:
            piece = self._handle(info.file).get_slice(info.name)[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
            out.copy_(piece.reshape(out.shape))
            return
        dtype = TORCH_DTYPES[info.dtype]
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        buffer = out if direct else torch.empty(sizes, dtype=dtype)
        itemsize = buffer.element_size()
        view = buffer.detach().reshape(-1).view(torch.uint8).numpy()
        self._pread_into(info.file, memoryview(view), info.base + info.start + span * itemsize, info)
        if not direct:
            out.copy_(buffer.reshape(out.shape))

    def _pread_into(self, file: Path, view: memoryview, position: int, info: TensorInfo) -> None:
        if file not in self._descriptors:
            self._descriptors[file] = open_regular(file, error=errors.HeaderError)
        fd, done = self._descriptors[file], 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], position + done)
            if got == 0:
                raise errors.HeaderError(f"ends inside tensor {info.name!r}; it is truncated", path=file)
            done += got

    def _handle(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def close(self) -> None:
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()
        self._handles.clear()


def _contiguous_span(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> int | None:
    """The index of the first element of a box that is one run of the tensor in C order, or
    None: it is one run when every dimension before the first that it cuts has size 1 in it
    and every dimension after that one is whole.

    Example:
        >>> _contiguous_span((6, 4), (2, 0), (3, 4)), _contiguous_span((6, 4), (0, 1), (6, 2))
        (8, None)
    """
    cut = 0
    while cut < len(shape) and sizes[cut] == 1:
        cut += 1
    if any(offsets[i] != 0 or sizes[i] != shape[i] for i in range(cut + 1, len(shape))):
        return None
    first = 0
    for dim, offset in zip(shape, offsets):
        first = first * dim + offset
    return first


def _take_file_dtypes(model: torch.nn.Module, header: Header) -> None:
    """Give the meta model's floating-point tensors the dtypes the file holds them in, as
    `ckptfmt.load_model` does by taking the file's tensors."""
    import torch

    from ..format.writer import TORCH_DTYPES

    dtypes = header.dtypes()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                dtype = TORCH_DTYPES.get(dtypes.get(prefix + name, ""))
                if tensor is None or dtype is None or tensor.dtype == dtype or not tensor.is_floating_point():
                    continue
                converted = tensor.to(dtype)
                if isinstance(tensor, torch.nn.Parameter):
                    converted = torch.nn.Parameter(converted, requires_grad=tensor.requires_grad)
                table[name] = converted
