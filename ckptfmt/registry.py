"""model_type -> architecture: the only way a name read from a file becomes code.

A file names its architecture by `model_type`; that name is looked up here and nowhere else.
No module is ever imported by a name read from a file: the modules that may be imported are
the built-in ones listed below and those that installed packages declare in the entry-point
group `ckptfmt.models`, for example in their pyproject.toml::

    [project.entry-points."ckptfmt.models"]
    resunet = "my_package.models:ResUNet"

Listing the known names imports nothing (so `inspect` stays free of torch); the module behind a
name is imported only when that architecture is needed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ConfigError, UnknownModelTypeError

__all__ = ["ModelEntry", "check_model_type", "get_model_entry", "register_model", "registered_model_types"]

ENTRY_POINT_GROUP = "ckptfmt.models"

# Built-in architectures: model_type -> the module whose import registers it.
_BUILTIN = {"multitask": "models.multitask_unet"}

InferConfig = Callable[[Mapping[str, Any]], dict]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its builder and, when known, how to read its config off
    a state dict's tensor shapes."""

    name: str
    builder: Callable[..., Any]
    infer_config: InferConfig | None

    @property
    def params(self) -> tuple[str, ...]:
        """The builder's keyword arguments, the architecture numbers a config must carry."""
        return tuple(
            p.name
            for p in inspect.signature(self.builder).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    def state_shapes(self, params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """The state dict's tensor shapes for these params, built on the meta device:
        no memory is allocated and no weights are initialised."""
        import torch

        with torch.device("meta"):
            model = self.builder(**params)
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}


_registry: dict[str, ModelEntry] = {}


def register_model(name: str, *, infer_config: InferConfig | None = None):
    """Register an architecture under `name`; use as a class (or factory) decorator.

    Args:
        name: the model_type that configs and files will carry.
        infer_config: optional `f(state_dict) -> dict` recovering the architecture numbers
            from tensor shapes alone, raising ArchitectureNotRecognisedError for a state dict
            of another architecture. Lets `convert` migrate legacy `.pth` files.

    Returns:
        A decorator that returns its argument unchanged.

    Example:
        >>> @register_model("tiny", infer_config=lambda sd: {"width": sd["fc.weight"].shape[0]})
        ... class Tiny(torch.nn.Module):
        ...     def __init__(self, width=8): ...
    """
    if not name.isidentifier():
        raise ValueError(f"model_type {name!r} must be a plain identifier (letters, digits, _)")

    def decorate(builder):
        existing = _registry.get(name)
        if existing is not None and existing.builder is not builder:
            raise ValueError(f"model_type {name!r} is already registered to {existing.builder!r}")
        _registry[name] = ModelEntry(name, builder, infer_config)
        return builder

    return decorate


def registered_model_types() -> list[str]:
    """The known model types, sorted, without importing any of them."""
    return sorted({*_registry, *_BUILTIN, *(ep.name for ep in _entry_points())})


def get_model_entry(name: str) -> ModelEntry:
    """The registered architecture for `name`, importing its module on first use.

    Raises:
        UnknownModelTypeError: `name` is not registered; the message lists the known ones.
    """
    check_model_type(name)
    if name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    elif name not in _registry:
        (ep,) = [ep for ep in _entry_points() if ep.name == name]
        target = ep.load()
        # An entry point may name a plain class that never called register_model itself.
        if name not in _registry:
            register_model(name, infer_config=getattr(target, "infer_config", None))(target)
    return _registry[name]


@functools.cache
def _entry_points():
    # Imported here: importlib.metadata costs 30 ms, and `inspect` must start fast.
    from importlib.metadata import entry_points

    return tuple(entry_points(group=ENTRY_POINT_GROUP))


def check_model_type(name: Any) -> str:
    """Validate a model_type read from a file or given by a user, without importing it."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(
            f"model_type must be a registered name such as 'multitask', not {name!r}; "
            "import paths are never followed"
        )
    # Entry points are scanned only for a name not known already: the scan costs 30 ms.
    if name not in _registry and name not in _BUILTIN and name not in registered_model_types():
        raise UnknownModelTypeError(
            f"model_type {name!r} is not registered; known: {', '.join(registered_model_types())}. "
            f"Install the package that provides it (entry-point group {ENTRY_POINT_GROUP!r})"
        )
    return name
