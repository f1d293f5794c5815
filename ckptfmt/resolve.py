"""The one resolution of a checkpoint: what a source holds, and the config every command uses.

Every command (`load_model`, `load_model_with_config`, `convert`, `inspect`, `verify`, `diff`,
`predict`, the distributed loader) starts here, and none derives a config of its own:

1. `read_source` (of `sources.source`, public here as the resolution's first step) reads a
   source once. A ckptfmt file or sharded index is read by its header (no tensor is touched). Anything else, a legacy `.pth`/`.pt`, a Lightning `.ckpt`, a
   `torch.distributed.checkpoint` folder, or a `.safetensors` file or set of shards written by
   someone else, is read into tensors and sorted by `sources.layouts` (weights, training
   record, companion, what the file records of its model, where the network may sit).
2. `resolve` takes the config from the first of `CONFIG_SOURCES` that gives one, applies the
   caller's overrides on top, and checks it against the tensor shapes and dtypes before
   anything is built. A source with no config left is "weights only", and the resolution says
   why (`unresolved`); each command decides what that means for it.

Example:
    >>> resolution = resolve(read_source("checkpoints/multitask_joint/best_model.pth"))
    >>> resolution.origin, resolution.config.depth
    ('sidecar', 3)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .config.model_config import ModelConfig, config_differences
from .config.sidecar import Sidecar, checkpoint_stem, read_sidecar, sidecar_path
from .errors import (
    AmbiguousArchitectureError,
    ArchitectureNotRecognisedError,
    CkptfmtError,
    CkptfmtWarning,
    ConfigError,
    ShapeMismatchError,
    Words,
    overrides_words,
)
from .format.header import INDEX_SUFFIX, Header
from .sources.source import Source, read_source

if TYPE_CHECKING:
    from .sources.identify import Identification
    from .sources.layouts import LegacyCheckpoint

__all__ = ["CONFIG_SOURCES", "Resolution", "Source", "read_source", "resolve"]


@dataclass
class Resolution:
    """A source with its one config.

    `origin` says where the config came from ("--config", "embedded", "sidecar", "config.json",
    "pickled model", "hyper_parameters", "inferred", or "--model-type and --set"), and
    `overridden` whether the caller's overrides changed it; `config` is None for weights only,
    and `unresolved` then says why. `warnings` are what the user should know of the resolution
    itself (a sidecar that disagrees, a plugin that failed); what reading a legacy file noticed
    is in `legacy.notes`.
    """

    source: Source
    config: ModelConfig | None = None
    origin: str | None = None
    overridden: bool = False
    identification: Identification | None = None
    unresolved: CkptfmtError | None = None
    warnings: list[CkptfmtWarning] = field(default_factory=list)
    plugin_failures: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def header(self) -> Header | None:
        return self.source.header

    @property
    def legacy(self) -> LegacyCheckpoint | None:
        return self.source.legacy


class _Found(NamedTuple):
    config: ModelConfig
    origin: str
    prefix: str = ""  # where the network sits among the source's tensors ("" for the whole)
    identification: Identification | None = None
    fits: bool = False  # already checked against the tensors, overrides and all: not checked twice


@dataclass
class _Asked:
    """What the caller asked of a resolution (see `resolve`)."""

    config: ModelConfig | str | os.PathLike | None
    overrides: dict[str, Any]
    model_type: str | None
    identify: bool
    check: bool
    replace_sidecar: bool | None
    read_sidecar: Callable[[Path], Sidecar | None]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    prefixes: list[str]


# -- where a config comes from, in order ------------------------------------------------------
# Each entry is asked only when every entry before it gave nothing. Its docstring says why it
# stands where it does.


def _given(resolution: Resolution, asked: _Asked) -> _Found | None:
    """A config the caller passes (`config=`, `--config`): the user knows what the model is,
    and nothing a file says overrules that."""
    if asked.config is None:
        return None
    if isinstance(asked.config, ModelConfig):
        return _Found(asked.config.checked(path=resolution.path), "--config")
    return _Found(ModelConfig.load(asked.config).checked(path=asked.config), "--config")


def _embedded(resolution: Resolution, asked: _Asked) -> _Found | None:
    """The config in a ckptfmt file's header: written with the weights, in one file, covered by
    their digest. A sidecar bound to this file that says otherwise is a warning, not a rival."""
    header = resolution.header
    document = header.config_dict() if header is not None else None
    if document is None:
        return None
    config = ModelConfig.from_dict(document, path=resolution.path)
    described_by = sidecar_path(resolution.path, config, read=asked.read_sidecar)
    sidecar = asked.read_sidecar(described_by) if described_by is not None else None
    if sidecar is not None:
        differences = config_differences(config, sidecar.config)
        if differences:
            resolution.warnings.append(CkptfmtWarning(
                f"the sidecar {sidecar.path} disagrees with the embedded config ({'; '.join(differences)}); using "
                "the embedded one. Run `ckptfmt verify` to see all differences", path=resolution.path))
    return _Found(config, "embedded")


def _sidecar(resolution: Resolution, asked: _Asked) -> _Found | None:
    """The sidecar that describes the file (`NAME.model_config.json`, else the folder's
    `model_config.json`): the original system's layout, and the mirror of a ckptfmt file. It can
    drift from the weights, so it must fit them: one that does not is refused, or, asked to
    replace it, passed over for what the file itself says. A folder's sidecar bound to other
    checkpoints that does not fit describes other weights, and is passed over."""
    described_by = sidecar_path(resolution.path, read=asked.read_sidecar)
    sidecar = asked.read_sidecar(described_by) if described_by is not None else None
    if sidecar is None:
        return None
    config = sidecar.config
    if not asked.check:
        return _Found(config, "sidecar")  # checked by whoever builds the model
    config = config.checked(path=sidecar.path)
    prefix, first_problem = _fit(config, asked, resolution.path)
    if first_problem is None:
        return _Found(config, "sidecar", prefix, fits=True)
    if sidecar.binds_others(checkpoint_stem(resolution.path.name)):
        return None
    if asked.overrides:  # the override is what does not fit: said as such
        raise first_problem
    if asked.replace_sidecar:
        resolution.warnings.append(CkptfmtWarning(
            f"the sidecar did not fit the weights ({first_problem.message}); inferred the config instead"))
        return None
    fix = (Words("Fix or remove the sidecar, pass config=, or pass force=True to replace it with the config "
                 "inferred from the weights",
                 "Fix or remove the sidecar, pass --config, or pass --force to replace it with the config "
                 "inferred from the weights")
           if asked.replace_sidecar is not None else "Fix or remove the sidecar")
    raise first_problem.at(
        resolution.path, problem=f"its sidecar {sidecar.path.name} does not fit the weights: " + first_problem.message_words
        + ".", fix=fix)


def _hub_config(resolution: Resolution, asked: _Asked) -> _Found | None:
    """A Hub-style folder's `config.json` beside weights that someone else wrote (timm's
    `push_to_hub`), read by the registered architecture whose library wrote it. After the
    sidecar, ckptfmt's own statement; before what a file records, since it describes these very
    weights. It must fit them: one that does not is refused, naming it."""
    header = resolution.header
    if header is not None and header.is_ckptfmt or not resolution.path.name.endswith((".safetensors", INDEX_SUFFIX)):
        return None
    from .sources.foreign import HUB_CONFIG_NAME, read_hub_config

    config = read_hub_config(resolution.path, model_type=asked.model_type)
    if config is None:
        return None
    if not asked.check:
        return _Found(config, HUB_CONFIG_NAME)  # checked by whoever builds the model
    config = config.checked(path=resolution.path.with_name(HUB_CONFIG_NAME))
    prefix, problem = _fit(config, asked, resolution.path)
    if problem is None:
        return _Found(config, HUB_CONFIG_NAME, prefix, fits=True)
    raise problem if asked.overrides else problem.at(
        resolution.path, problem=f"its {HUB_CONFIG_NAME} does not fit the weights: " + problem.message_words + ".",
        fix=Words("Pass config= to say what it is", "Pass --config to say what it is"))


def _recorded(resolution: Resolution, asked: _Asked) -> _Found | None:
    """What a legacy file records of its model: the arguments a pickled model was built with,
    or a Lightning module's hyper-parameters when they are the arguments of one registered
    architecture whose tensors fit. After the sidecar: a training script's arguments name its
    model only in part, where a sidecar is a statement about this very checkpoint."""
    legacy = resolution.legacy
    if legacy is None:
        return None
    if legacy.config is not None and asked.model_type in (None, legacy.config.model_type):
        return _Found(legacy.config.checked(path=resolution.path), "pickled model")
    if not legacy.hyper_parameters:
        return None
    from .config.registry import get_model_entry, registered_model_types
    from .config.shapes import check_state

    names = [asked.model_type] if asked.model_type else registered_model_types()
    for prefix in asked.prefixes:
        shapes, dtypes = _under(prefix, asked)
        found = []
        for name in names:
            try:
                entry = get_model_entry(name)
                arguments = {k: legacy.hyper_parameters[k] for k in entry.parameter_names if k in legacy.hyper_parameters}
                if not arguments:
                    continue
                config = ModelConfig(entry.name, **arguments)
                if not check_state(entry.expected_state(config.params), shapes, dtypes):
                    found.append(config)
            except (Exception, SystemExit):  # arguments this architecture refuses, or its code failing on them
                continue
        if len(found) == 1:
            return _Found(found[0].checked(path=resolution.path), "hyper_parameters", prefix, fits=not asked.overrides)
    return None


def _identified(resolution: Resolution, asked: _Asked) -> _Found | None:
    """Read off the tensor shapes by the registered architectures, over every place the
    network may sit; twins told apart by a probe, never guessed. Last: a reading of the weights,
    made safe by the shape check, is still only a reading."""
    if not asked.identify:
        return None
    from .sources.identify import identify

    state_dict = resolution.source.tensors() if resolution.header is not None else resolution.legacy.state_dict
    try:
        identification = identify(state_dict, model_type=asked.model_type, path=resolution.path,
                                  failures=resolution.plugin_failures, prefixes=asked.prefixes)
    except AmbiguousArchitectureError as exc:
        # Twins that differ are never guessed; the one the caller's overrides pick is theirs.
        overrides = asked.overrides
        chosen = [c for c in exc.candidates if overrides and all(c.get(k) == v for k, v in overrides.items())]
        if len(chosen) != 1:
            raise
        return _Found(ModelConfig.from_dict(chosen[0]).checked(path=resolution.path), "inferred")
    except ArchitectureNotRecognisedError as exc:
        arguments = {k: v for k, v in asked.overrides.items() if k != "model_type"}
        if asked.model_type is not None and arguments:
            # Not recognised, but the caller says what it is: the config is theirs.
            try:
                config = ModelConfig(asked.model_type, **arguments)
            except ConfigError as error:
                raise error.at(resolution.path, problem=overrides_words(arguments) + " rejected: " + error.problem) \
                    from None
            return _Found(config, "--model-type and --set")
        resolution.unresolved = exc
        return None
    return _Found(identification.config, "inferred", identification.prefix, identification)


CONFIG_SOURCES: tuple[tuple[str, Callable[[Resolution, _Asked], _Found | None]], ...] = (
    ("given", _given),
    ("embedded", _embedded),
    ("sidecar", _sidecar),
    ("hub config", _hub_config),
    ("recorded", _recorded),
    ("identified", _identified),
)


def resolve(
    source: Source, *, config: ModelConfig | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None, model_type: str | None = None, identify: bool = True,
    check: bool = True, replace_sidecar: bool | None = None, cast_to: Any = None,
    read_sidecar: Callable[[Path], Sidecar | None] = read_sidecar,
) -> Resolution:
    """Resolve a source's config: the first of `CONFIG_SOURCES` that gives one, `overrides` on
    top, checked against the tensors.

    Args:
        source: what `read_source` read.
        config: a config the caller passes (a ModelConfig, or a config JSON file).
        overrides: config fields to set on top, checked against the tensors.
        model_type: consider only this architecture (with `config`, attach the config to it).
        identify: ask the registered architectures to identify the weights when nothing
            records a config (off: a caller that brings its own builder, or a look that must
            import no model library).
        check: check the config against its architecture and the tensors (off: `inspect`,
            which shows a file whose architecture is not installed here).
        replace_sidecar: whether the caller can replace a sidecar that does not fit the
            weights (`convert`'s force): True passes over it, False refuses it saying so, None
            refuses it (the caller has no such option).
        cast_to: the dtype every floating-point tensor is about to be cast to, for the dtype
            check.
        read_sidecar: how to read a sidecar file (a batch reads each once).

    Raises:
        ShapeMismatchError: the config does not fit the weights; the message names the field
            and the tensor.
        AmbiguousArchitectureError: twins that compute different functions.
        ConfigError, UnknownModelTypeError: an invalid config, or an architecture not here.

    Example:
        >>> resolution = resolve(read_source("big.pth"), overrides={"description": "joint run"})
        >>> resolution.origin
        'inferred+overrides'
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if model_type is not None:
        from .config.registry import get_model_entry

        get_model_entry(model_type)  # a name not registered is refused as such, before any other check
        overrides["model_type"] = model_type
    resolution = Resolution(source)
    shapes = source.shapes
    prefixes = [""]
    if source.legacy is not None:
        from .sources.layouts import candidate_prefixes  # it imports torch, which a header needs not (diff)

        prefixes = candidate_prefixes(shapes)
    asked = _Asked(config, overrides, model_type, identify, check, replace_sidecar, read_sidecar, shapes,
                   source.dtypes(cast_to), prefixes)
    found = None
    for _, ask in CONFIG_SOURCES:
        found = ask(resolution, asked)
        if found is not None:
            break
    for failure in resolution.plugin_failures:
        resolution.warnings.append(CkptfmtWarning(failure))
    if found is None:
        if overrides and resolution.unresolved is None:
            raise ConfigError(f"has no config (weights only), so there is nothing to override ({', '.join(overrides)})",
                              path=source.path)
        return resolution
    if found.prefix and source.legacy is not None:
        source.legacy.take_network(found.prefix)
    resolution.config, resolution.origin, resolution.identification = found.config, found.origin, found.identification
    if overrides and found.origin != "--model-type and --set":
        resolution.config, resolution.overridden = _overridden(found.config, asked, source.path), True
    if check and not found.fits:
        shapes, dtypes = _under(found.prefix, asked)
        _check(resolution.config, shapes, dtypes, asked, source.path)
    return resolution


def _overridden(config: ModelConfig, asked: _Asked, path: Path) -> ModelConfig:
    if not asked.overrides:
        return config
    try:
        return config.replace(**asked.overrides)
    except ConfigError as exc:
        raise exc.at(path, problem=overrides_words(asked.overrides) + " rejected: " + exc.problem) from None


def _fit(config: ModelConfig, asked: _Asked, path: Path) -> tuple[str, ShapeMismatchError | None]:
    """The first candidate prefix where `config`, overrides on top, fits the tensors; or the
    first problem, when it fits under none."""
    overridden = _overridden(config, asked, path)
    first_problem = None
    for prefix in asked.prefixes:
        shapes, dtypes = _under(prefix, asked)
        try:
            _check(overridden, shapes, dtypes, asked, path)
        except ShapeMismatchError as exc:
            first_problem = first_problem or exc
            continue
        return prefix, None
    return "", first_problem


def _under(prefix: str, asked: _Asked) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The shapes and dtypes of the tensors under `prefix`, the prefix stripped."""
    if not prefix:
        return asked.shapes, asked.dtypes
    return ({name[len(prefix):]: shape for name, shape in asked.shapes.items() if name.startswith(prefix)},
            {name[len(prefix):]: dtype for name, dtype in asked.dtypes.items() if name.startswith(prefix)})


def _check(config: ModelConfig, shapes: dict, dtypes: dict, asked: _Asked, path: Path) -> None:
    from .config.shapes import check_shapes

    check_shapes(config, shapes, dtypes=dtypes, path=path, overridden=tuple(asked.overrides))
