"""Arguments captured at construction: a registered class's instances, and what a registered
factory builds, remember the arguments they were built with, so that saving one needs no
hand-written config (as huggingface_hub's PyTorchModelHubMixin and Lightning's
save_hyperparameters do, but without pickles)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .arguments import RESERVED_NAMES

__all__ = ["captured_arguments", "record_arguments_of_instances", "recording_factory", "unwrap_model"]

# Where a registered class's instance keeps (model_type, the arguments it was built with).
_CAPTURED = "_ckptfmt_arguments"


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any] | str:
    """The arguments of a call by name, or why they cannot be named."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"its arguments could not be matched to its signature ({exc})"
    arguments: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = signature.parameters[key].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                return f"it was given {len(value)} extra positional argument(s) (*{key}), which a config cannot name"
        elif kind == inspect.Parameter.VAR_KEYWORD:
            clashes = sorted(set(value) & set(RESERVED_NAMES))
            if clashes:
                return f"its **{key} was given {', '.join(map(repr, clashes))}, the name of a config field"
            arguments.update(value)
        else:
            arguments[key] = value
    return arguments


def record_arguments_of_instances(cls: type, name: str) -> None:
    """Make each instance of `cls` (not of a subclass) remember `(name, its arguments)`.

    Example:
        >>> record_arguments_of_instances(Tiny, "tiny"); captured_arguments(Tiny(width=16))
        ('tiny', {'width': 16})
    """
    init = cls.__init__
    signature = inspect.signature(cls)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # A subclass that is registered records its own arguments; one that is not records
        # nothing, so saving it asks for it to be registered instead of naming its base.
        if type(self) is cls:
            self.__dict__[_CAPTURED] = (name, _bind(signature, args, kwargs))

    cls.__init__ = __init__


def recording_factory(factory: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`factory`, wrapped so that what it builds remembers `(name, its arguments)`.

    Example:
        >>> captured_arguments(recording_factory(make_head, "head")(classes=7))
        ('head', {'classes': 7})
    """
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args, **kwargs):
        model = factory(*args, **kwargs)
        if hasattr(model, "__dict__"):
            model.__dict__[_CAPTURED] = (name, _bind(signature, args, kwargs))
        return model

    return build


def captured_arguments(model: Any) -> tuple[str, dict[str, Any] | str] | None:
    """`(model_type, arguments)` recorded when `model` was built by a registered architecture
    (the arguments are a string saying why when they could not be recorded), or None.
    DataParallel, DistributedDataParallel and torch.compile wrappers are looked through."""
    return getattr(unwrap_model(model), "__dict__", {}).get(_CAPTURED)


def unwrap_model(model: Any) -> Any:
    """The module inside DataParallel, DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
        if inner is None and type(model).__name__ in ("DataParallel", "DistributedDataParallel"):
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
