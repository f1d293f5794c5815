"""Building a library's model without memory behind its tensors, and reading its shapes.

`build_for_shapes` gives a model whose tensor names and shapes are all that is asked of it;
`build_empty` one to load a checkpoint's weights into with `assign=True`, whose buffers that the
weights do not replace are real. Both build under torch's own `torch.device("meta")`.

Some constructors compute Python numbers from tensors they make (`torch.linspace(...).tolist()`
for drop-path rates, torchvision's RegNet widths), which the meta device cannot answer. Those
models are built with only their parameters sent to meta as they are registered, through torch's
parameter registration hook: one hook, installed the first time it is needed, that acts only in
the thread that asked and only during that one build (`_parameters_on_meta`). Nothing of
`torch.nn` is replaced, and other threads' modules are never touched.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["Shapes", "build_empty", "build_for_shapes", "first_difference", "shapes_of"]

Shapes = Mapping[str, tuple[int, ...]]


def build_for_shapes(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model with no memory behind it, for its tensor names and shapes: on the meta device,
    or with its parameters there where __init__ computes on its tensors (torchvision's regnet,
    smp's mit encoders, MONAI's SwinUNETR).

    Example:
        >>> shapes_of(build_for_shapes(lambda: torchvision.models.resnet18()))["fc.weight"]
        (1000, 512)
    """
    try:
        with torch.device("meta"):
            return factory()
    except (NotImplementedError, RuntimeError):
        with _parameters_on_meta():
            return factory()


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model to load a checkpoint's weights into with `assign=True`: every tensor that the
    state dict holds may be on the meta device, but not the buffers it does not hold
    (non-persistent ones: timm's relative position indices, rotary tables, attention masks),
    which the weights will not replace. So: on the meta device where that leaves none of those
    there, else parameters on meta and buffers on the CPU, else (a buffer computed from a
    parameter, as timm's Swin attention masks are, or on its device, as Swin V2's relative
    position tables are) built on the CPU for real.

    Example:
        >>> model = build_empty(lambda: timm.create_model("swin_tiny_patch4_window7_224"))
        >>> model.load_state_dict(state_dict, assign=True)
    """
    try:
        with torch.device("meta"):
            model = factory()
        if not _buffers_left_on_meta(model):
            return model
    except (NotImplementedError, RuntimeError):
        pass
    try:
        with _parameters_on_meta():
            model = factory()
        if not _buffers_left_on_meta(model):
            return model
    except (NotImplementedError, RuntimeError):  # a CPU buffer filled from a meta parameter's device
        pass
    return factory()


def _buffers_left_on_meta(model: nn.Module) -> bool:
    held = set(model.state_dict(keep_vars=True))
    return any(buffer.is_meta for name, buffer in model.named_buffers() if name not in held)


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each tensor of the model's state dict, by name, as a shape.

    Example:
        >>> shapes_of(torch.nn.Linear(3, 2))
        {'weight': (2, 3), 'bias': (2,)}
    """
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def first_difference(expected: Shapes, shapes: Shapes) -> str | None:
    """Where a state dict's names and shapes differ from a model's, or None when every name and
    shape matches exactly.

    Example:
        >>> first_difference({"weight": (2, 3)}, {"weight": (2, 4)})
        'weight is [2, 4], the model's is [2, 3]'
    """
    missing = [name for name in expected if name not in shapes]
    if missing:
        return f"it has no tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = [name for name in shapes if name not in expected]
    if extra:
        return f"it has the unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            return f"{name} is {list(shapes[name])}, the model's is {list(shape)}"
    return None


# -- parameters on meta, buffers real: for constructors that compute on their tensors ----------

# How many builds with parameters on meta this thread is inside (they may nest: a model's
# factory may build its encoder the same way).
_this_thread = threading.local()
_hook_installed = False
_install_lock = threading.Lock()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter that this thread registers goes to the meta device as it is registered;
    buffers and the tensors that __init__ computes Python numbers from stay on the CPU (as
    accelerate's `init_empty_weights(include_buffers=False)`)."""
    _install_hook()
    _this_thread.depth = getattr(_this_thread, "depth", 0) + 1
    try:
        yield
    finally:
        _this_thread.depth -= 1


def _install_hook() -> None:
    """Torch's registration hooks live in one dict for the whole process, which torch walks on
    every parameter a module registers: adding and removing ours around each build could change
    it under another thread's walk. So it is added once and left, inert outside a build."""
    global _hook_installed
    with _install_lock:
        if not _hook_installed:
            nn.modules.module.register_module_parameter_registration_hook(_parameter_to_meta)
            _hook_installed = True


def _parameter_to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    """The parameter on the meta device, within a build of this thread; else None (torch keeps
    the parameter as given)."""
    if not getattr(_this_thread, "depth", 0) or param is None or param.device.type == "meta":
        return None
    kwargs = {**param.__dict__, "requires_grad": param.requires_grad}
    return type(param)(param.to("meta"), **kwargs)
