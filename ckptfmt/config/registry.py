"""model_type -> architecture: the only way a name read from a file becomes code.

A file names its architecture by `model_type`; that name is looked up here and nowhere else.
No module is ever imported by a name read from a file: an architecture is known because code
registered it (`@register_model`), or because an installed package declares it in the
entry-point group `ckptfmt.models`, for example in its pyproject.toml::

    [project.entry-points."ckptfmt.models"]
    resunet = "my_package.models:ResUNet"

ckptfmt's own architectures are declared the same way. Listing the known names imports
nothing (so `inspect` stays free of torch); the module behind a name is imported only when that
architecture is needed.

A registered class's instances remember the arguments they were built with (see `capture`), so
that saving one needs no hand-written config. The installed packages' entry points are listed by
`entry_points`.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CkptfmtError, CkptfmtWarning, ConfigError, PluginError, UnknownModelTypeError
from .arguments import RESERVED_NAMES, Signature
from .capture import record_arguments_of_instances, recording_factory, unwrap_model
from .entry_points import ENTRY_POINT_GROUP, installed_entry_points
from .plugins import import_failure, import_guarded, printed_words

__all__ = [
    "TASKS",
    "ModelEntry",
    "Task",
    "check_model_type_name",
    "create_model",
    "get_model_entry",
    "recognised_arguments",
    "register_model",
    "registered_model_types",
]

TASKS = ("classification", "segmentation", "segmentation+classification")

# infer_config's one contract: tensor names to shapes (never tensors, so that inspect and convert
# can call it without loading data) -> the architecture's arguments.
InferConfig = Callable[[Mapping[str, tuple[int, ...]]], dict]

@dataclass(frozen=True)
class Task:
    """What a model does, as a predictor needs to know it to run the model.

    Args:
        kind: "classification", "segmentation" or "segmentation+classification".
        in_channels: channels of the input image.
        classes: classification logits, for the classification kinds.
        mask_channels: segmentation logit channels, for the segmentation kinds.
        input_multiple: the input's sides must be multiples of this (a U-Net of depth d: 2**d);
            the predictor pads to it.
        input_size: the spatial size the model takes and no other (a ViT's 224 x 224), or None.
        spatial_dims: 2 for images, 3 for volumes.
        outputs: turns the model's output into `(mask_logits, class_logits)`, None for what the
            model does not give; default: the output is the one the kind has, or a pair of both.
    """

    kind: str
    in_channels: int
    classes: int | None = None
    mask_channels: int | None = None
    input_multiple: int = 1
    input_size: tuple[int, ...] | None = None
    spatial_dims: int = 2
    outputs: Callable[[Any], tuple[Any, Any]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASKS:
            raise ValueError(f"Task kind must be one of {', '.join(TASKS)}, not {self.kind!r}")

    def example_input(self, batch: int = 2, *, side: int | None = None, seed: int = 0):
        """A random input batch the model accepts (for tests and benchmarks)."""
        import torch

        if self.input_size is not None:
            size = tuple(self.input_size)
        else:
            side = side or max(32, 2 * self.input_multiple)
            side += -side % self.input_multiple
            size = (side,) * self.spatial_dims
        return torch.randn(batch, self.in_channels, *size, generator=torch.Generator().manual_seed(seed))

    def split(self, output: Any) -> tuple[Any, Any]:
        if self.outputs is not None:
            return self.outputs(output)
        if self.kind == "classification":
            return None, output
        if self.kind == "segmentation":
            return output, None
        return output[0], output[1]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its builder, the checks its arguments get, and, when known,
    how to read its arguments off a state dict's shapes and what task it does."""

    name: str
    builder: Callable[..., Any]
    infer_config: InferConfig | None = None
    check: Callable[[dict[str, Any]], None] | None = None
    task: Callable[[dict[str, Any]], Task] | None = None
    example: Mapping[str, Any] | None = field(default=None, compare=False)
    recognise: Callable[[Any], dict[str, Any] | None] | None = None
    build_empty: Callable[[dict[str, Any]], Any] | None = None
    fallback: bool = False
    preference: int = 0
    defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    signature: Signature = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    read_foreign_config: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The builder's named parameters: the arguments a config carries."""
        return tuple(self.signature.parameters)

    def complete(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments checked by the signature and the architecture's own check, defaults
        filled in. Raises ConfigError naming the argument."""
        if self.defaults is not None:
            params = {**self._ask("defaults", self.defaults, params), **params}
        completed = self.signature.complete(params, model_type=self.name)
        if self.check is not None:
            self._ask("check", self.check, completed)
        return completed

    def _ask(self, hook: str, function: Callable[[dict[str, Any]], Any], params: Mapping[str, Any]) -> Any:
        """One of the architecture's hooks, called on a copy of the arguments. Our own errors
        (a ConfigError, a MissingDependencyError naming the extra to install) reach the user as
        they are; a ValueError is the user's argument; anything else is the plugin's failure."""
        try:
            return function(dict(params))
        except CkptfmtError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        except (Exception, SystemExit) as exc:
            raise PluginError(f"model_type {self.name!r}: its {hook} raised {type(exc).__name__}: {exc}") from None

    def describe_task(self, params: Mapping[str, Any]) -> Task | None:
        if self.task is None:
            return None
        try:
            return self.task(dict(params))
        except CkptfmtError:
            raise
        except (Exception, SystemExit) as exc:
            raise PluginError(f"model_type {self.name!r}: its task raised {type(exc).__name__}: {exc}") from None

    def build(self, params: Mapping[str, Any]) -> Any:
        """The model, built from checked arguments (see `complete`)."""
        return self.builder(**self.signature.build_kwargs(params))

    def build_on_meta(self, params: Mapping[str, Any]) -> Any:
        """The model with no memory behind its parameters, to load weights into with
        `assign=True`: on the meta device, or the architecture's own way where it cannot be
        built there."""
        if self.build_empty is not None:
            return self.build_empty(dict(params))
        import torch

        with torch.device("meta"):
            return self.build(params)

    def expected_state(self, params: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        """The state dict these arguments give, as `{name: (shape, dtype)}`, built on the meta
        device: no memory is allocated and no weights are initialised. Remembered per arguments,
        so a folder of checkpoints of one architecture pays for one build."""
        return dict(_expected_state(self, json.dumps(params, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _expected_state(entry: ModelEntry, params_json: str) -> tuple:
    from ..format.writer import DTYPE_NAMES

    model = entry.build_on_meta(json.loads(params_json))
    return tuple(
        (name, (tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)))) for name, t in model.state_dict().items()
    )


_registry: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, infer_config: InferConfig | None = None, check: Callable[[dict[str, Any]], None] | None = None,
    task: Callable[[dict[str, Any]], Task] | None = None, example: Mapping[str, Any] | None = None,
    recognise: Callable[[Any], dict[str, Any] | None] | None = None,
    build_empty: Callable[[dict[str, Any]], Any] | None = None, fallback: bool = False, preference: int = 0,
    defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    read_foreign_config: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
):
    """Register an architecture under `name`; use as a decorator on an `nn.Module` class or on
    a factory function that returns one.

    Instances then remember the arguments they were built with, so `save_model_with_config(
    model, path)` needs no config, and a file names its architecture by `name` alone.

    Args:
        name: the model_type that configs and files will carry (letters, digits and _).
        infer_config: optional `f(shapes) -> arguments`, where `shapes` maps tensor names to
            shape tuples; recovers the arguments from a state dict's shapes alone, raising
            ArchitectureNotRecognisedError for another architecture's. Lets `convert` migrate
            legacy `.pth` files.
        check: optional `f(arguments)`, the architecture's own check of its (already typed and
            completed) arguments; raises ConfigError or ValueError saying what is wrong.
        task: optional `f(arguments) -> Task`: what the model does, for the predictor.
        example: optional arguments of a small instance, for tests and benchmarks (the tests
            that run over every registered architecture use it; the defaults otherwise).
        recognise: optional `f(model) -> arguments or None`, for models this architecture
            describes that were not built through it (a library's own factory records them).
        build_empty: optional `f(arguments) -> model` with no memory behind its parameters, for
            an architecture that cannot be built on the meta device.
        fallback: asked to identify weights only when no other architecture recognises them
            (ckptfmt's adapters of the field's libraries are fallbacks).
        preference: among several architectures that recognise the same weights and compute
            the same function (twins), the lowest preference is chosen.
        defaults: optional `f(arguments) -> defaults`, for a builder whose signature cannot show
            its defaults (a library's factory, whose defaults depend on the model's name); the
            arguments given win, and the defaults are written out like the signature's.
        read_foreign_config: optional `f(document) -> config fields or None`: the config that
            another library's `config.json` beside its weights gives them (timm's `push_to_hub`
            writes one), or None for a document that is not that library's.

    infer_config may return a list of argument dicts when several models of the architecture
    fit the shapes; convert then tells them apart with a probe, or refuses, listing them.

    Returns:
        A decorator that returns the class itself (its instances now remember their
        arguments), or, for a function, a wrapper that records them on what it returns.

    Example:
        >>> @register_model("tiny", infer_config=lambda shapes: {"width": shapes["fc.weight"][0]})
        ... class Tiny(torch.nn.Module):
        ...     def __init__(self, width: int = 8):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(4, width)
        >>> save_model_with_config(Tiny(width=16), "tiny.safetensors")   # no config needed
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"model_type {name!r} must be a plain identifier (letters, digits, _)")

    def decorate(builder):
        existing = _registry.get(name)
        if existing is not None and existing.builder is not builder and getattr(existing.builder, "__wrapped__", None) is not builder:
            raise ValueError(f"model_type {name!r} is already registered to {existing.builder!r}")
        if existing is not None:
            return builder
        signature = Signature.of(builder)
        clashes = signature.reserved()
        if clashes:
            raise ValueError(
                f"{signature.owner} cannot be registered as {name!r}: its parameter "
                f"{', '.join(map(repr, clashes))} has the name of a config field "
                f"({', '.join(RESERVED_NAMES)}); rename it, or register a factory that maps it"
            )
        if isinstance(builder, type):
            record_arguments_of_instances(builder, name)
            registered = builder
        else:
            registered = recording_factory(builder, name)
        _registry[name] = ModelEntry(
            name, registered, infer_config, check, task, example, recognise, build_empty, fallback, preference,
            defaults, signature, read_foreign_config,
        )
        return registered

    return decorate


def create_model(model_type: str, /, *args: Any, **kwargs: Any) -> Any:
    """Build a model of a registered architecture; it remembers its arguments, so saving it
    needs no config. For libraries whose models record nothing (torchvision, MONAI).

    Example:
        >>> model = create_model("torchvision", "resnet18", num_classes=10)
        >>> ckptfmt.save(model, "r18.safetensors")
    """
    return get_model_entry(model_type).builder(*args, **kwargs)


def recognised_arguments(model: Any) -> tuple[str, dict[str, Any]] | None:
    """`(model_type, arguments)` of a model built without ckptfmt that a registered
    architecture recognises (a timm model records its name), or None."""
    inner = unwrap_model(model)
    for name in registered_model_types():
        try:
            entry = get_model_entry(name)
        except (UnknownModelTypeError, PluginError):
            continue
        if entry.recognise is None:
            continue
        try:
            arguments = entry.recognise(inner)
        except (Exception, SystemExit) as exc:
            raise PluginError(f"model_type {name!r}: its recognise raised {type(exc).__name__}: {exc}") from None
        if arguments is not None:
            return name, arguments
    return None


def registered_model_types() -> list[str]:
    """The known model types, sorted, without importing any of them."""
    return sorted({*_registry, *(ep.name for ep in installed_entry_points())})


def get_model_entry(name: str) -> ModelEntry:
    """The registered architecture for `name`, importing its package's module on first use.

    Raises:
        UnknownModelTypeError: `name` is not registered; the message lists the known ones and
            says how to make it known.
        PluginError: the package that provides it fails to import: it raised, exited or hung
            (said once, as a CkptfmtWarning, when it first fails).
    """
    check_model_type_name(name)
    entry = _registry.get(name)
    if entry is not None:
        return entry
    points = [ep for ep in installed_entry_points() if ep.name == name]
    if not points:
        raise UnknownModelTypeError(
            f"model_type {name!r} is not registered here (known: {', '.join(registered_model_types()) or 'none'}). "
            f"Import the module that registers it (its @register_model({name!r})), or install the "
            f"package that provides it (entry-point group {ENTRY_POINT_GROUP!r})"
        )
    _load_plugin(name, points)
    return _registry[name]


# Plugins that failed, by model_type: each is said once, as a warning, and its error raised
# again, without importing it again, to whoever asks for it later.
_failed: dict[str, PluginError] = {}


def _load_plugin(name: str, points: list) -> None:
    """Import the package behind `name` and register what it names, or raise PluginError saying
    what it did instead (raised, exited, hung), warned of once. See `plugins` for how."""
    if name in _failed:
        raise _failed[name].at()
    if len({ep.value for ep in points}) > 1:
        failure = (f"model_type {name!r} is provided by several installed packages "
                   f"({', '.join(sorted(ep.value for ep in points))}); uninstall all but one")
    else:
        try:
            target, printed = import_guarded(points[0].load)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # its own code: even sys.exit() fails this architecture only
            failure = f"model_type {name!r}: the package that provides it {import_failure(exc, where=points[0].value)}"
        else:
            if printed:
                warnings.warn(CkptfmtWarning(
                    f"model_type {name!r}: the package that provides it printed while being imported "
                    f"({points[0].value}); set aside: {printed_words(printed)}"), stacklevel=2)
            # An entry point may name a plain class or function that never called register_model.
            if name not in _registry:
                register_model(name, infer_config=getattr(target, "infer_config", None))(target)
            return
    _failed[name] = PluginError(failure)
    warnings.warn(CkptfmtWarning(failure), stacklevel=2)
    raise _failed[name].at()


def check_model_type_name(name: Any) -> str:
    """Refuse a model_type that is not a plain name, without looking it up: import paths read
    from a file are never followed."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(
            f"model_type must be a plain name (letters, digits and _), not {name!r}; "
            "import paths are never followed"
        )
    return name
