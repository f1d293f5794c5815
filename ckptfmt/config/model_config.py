"""ModelConfig: what a checkpoint needs to rebuild and run its model, and the sidecar.

A config is `model_type`, the architecture's constructor arguments, the descriptive fields
(version, description, trained_on, training_config) and the task's inference fields (task,
class_names, normalization, seg_threshold). It is flat, as the original system's
`model_config.json` was and as Hugging Face's `config.json` is: the arguments sit beside the
config's own fields, whose names are reserved (an architecture with a parameter of one of those
names cannot be registered).

A config is checked in two steps:

- always, without torch: the config's own fields, and that every argument is a plain JSON
  value;
- against its architecture (its builder's signature and annotations, its own check, its task),
  which fills in every default so that a file never depends on a default the code might later
  change. A config made in code is checked at once. One read from a file (`from_dict`, `load`,
  `from_checkpoint`) is checked when it is used (`checked()`, which loading, saving and `verify`
  call), so that a file whose architecture is not installed here can still be read and shown.

Older schemas are migrated by the small pure functions in `_MIGRATIONS`; a newer one is refused.

The sidecar `model_config.json` is the config plus `weights`: the name and digest of each
.safetensors file in the folder that it describes. The embedded copy in each file is
authoritative; the binding lets `verify` catch a sidecar that drifted, or a crash between
writing the weights and the sidecar.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    OVERWRITE_FIX,
    CheckpointNotFoundError,
    CkptfmtError,
    ConfigError,
    MissingDependencyError,
    UnregisteredModelError,
    Words,
)
from ..format.header import read_header
from ..io.atomic import atomic_write, write_all
from ..io.files import read_capped
from ..io.jsondoc import loads_strict, plain_json
from .arguments import RESERVED_NAMES
from .registry import (
    TASKS,
    Task,
    captured_arguments,
    check_model_type_name,
    get_model_entry,
    recognised_arguments,
    unwrap_model,
)

__all__ = [
    "SCHEMA_VERSION",
    "SIDECAR_NAME",
    "ModelConfig",
    "Sidecar",
    "check_sidecar_accepts",
    "config_differences",
    "read_sidecar",
    "write_sidecar",
]

SCHEMA_VERSION = 2
SIDECAR_NAME = "model_config.json"
# The original system had one architecture, so its API and its sidecars name none. Its configs
# still load, and `ModelConfig(base_filters=64, depth=4)` still means that architecture.
SEED_MODEL_TYPE = "multitask"
NORMALIZATION_MODES = ("none", "minmax", "zscore", "fixed")
DEFAULT_SEG_THRESHOLD = 0.5
# A config file is a few kilobytes; a sidecar binds one digest per checkpoint in its folder.
MAX_CONFIG_FILE_BYTES = 16 << 20

_TEXT_FIELDS = {"version": "1.0", "description": "", "trained_on": "", "training_config": ""}


# Where a model that load_model built keeps its file's config (see `remember_file_config`).
_FILE_CONFIG = "_ckptfmt_file_config"


def remember_file_config(model: Any, config: "ModelConfig") -> None:
    """Keep on `model` the config of the file it was loaded from, so that saving it again writes
    what that file said of it (description, class names, normalization), not only its arguments."""
    unwrap_model(model).__dict__[_FILE_CONFIG] = config


def _v0_to_v1(config: dict[str, Any]) -> dict[str, Any]:
    """The original system wrote no schema_version; its keys are a subset of v1's."""
    return {"model_type": SEED_MODEL_TYPE, **config, "schema_version": 1}


def _v1_to_v2(config: dict[str, Any]) -> dict[str, Any]:
    """v1 held the U-Net's five arguments and its inference fields for every model_type, and a
    missing model_type meant the U-Net. v2 holds any architecture's arguments under the same flat
    keys, and the task; v1's keys keep their meaning, and the task is filled in from the
    architecture when the config is checked."""
    return {"model_type": SEED_MODEL_TYPE, **config, "schema_version": 2}


# schema N -> function turning an N dict into an N+1 dict.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1, 1: _v1_to_v2}


class ModelConfig:
    """The architecture and inference settings of a model.

    Args:
        model_type: a registered architecture (see `ckptfmt.registered_model_types`); the
            original system's multi-task U-Net when omitted, as its API had it.
        version, description, trained_on, training_config: free text, as in the seed.
        task: what the model does ("classification", "segmentation" or
            "segmentation+classification"); filled in from the architecture.
        class_names: one name per class, or None for `class_0`, `class_1`, ...
        normalization: how inputs were normalised in training, applied again at inference:
            `{"mode": "none"}`, `{"mode": "minmax"}` (each image to [0, 1]), `{"mode": "zscore"}`
            (each image and channel to mean 0, std 1) or `{"mode": "fixed", "mean": [...],
            "std": [...]}` (one value, or one per input channel).
        seg_threshold: probability above which a pixel is in the mask, in (0, 1); 0.5 by
            default for models that segment, none for classifiers.
        **params: the architecture's constructor arguments (JSON values: numbers, strings,
            booleans, None, and lists and dicts of those); the ones not given take the
            builder's defaults, written out.

    Raises:
        ConfigError: naming the field or argument that is wrong.
        UnknownModelTypeError: `model_type` is not registered here.

    Example:
        >>> config = ModelConfig(base_filters=32, depth=3, description="joint fine-tuning")
        >>> config.base_filters, config.get_model_params()
        (32, {'base_filters': 32, 'depth': 3, 'in_channels': 1, 'seg_out_channels': 1, 'cls_num_classes': 2})
        >>> ModelConfig("mlp", width=64).params      # a registered class MLP(width=32, depth=3)
        {'width': 64, 'depth': 3}
    """

    __slots__ = ("model_type", "version", "description", "trained_on", "training_config", "task",
                 "class_names", "normalization", "seg_threshold", "_params", "_checked", "_path")

    def __init__(
        self, model_type: str | None = None, *, version: str = "1.0", description: str = "",
        trained_on: str = "", training_config: str = "", task: str | None = None,
        class_names: list[str] | tuple[str, ...] | None = None, normalization: dict[str, Any] | None = None,
        seg_threshold: float | None = None, **params: Any,
    ):
        fields = {
            "model_type": SEED_MODEL_TYPE if model_type is None else model_type, "version": version,
            "description": description, "trained_on": trained_on, "training_config": training_config,
            "task": task, "class_names": class_names, "normalization": normalization,
            "seg_threshold": seg_threshold,
        }
        fields, params = _check_structure(fields, params)
        fields, params = _check_architecture(fields, params)
        self._set(fields, params, checked=True)

    def _set(self, fields: dict[str, Any], params: dict[str, Any], *, checked: bool, path=None) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "_checked", True if checked else None)
        # The file a config was read from, named by the errors of checking it later.
        object.__setattr__(self, "_path", path)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a ModelConfig cannot be changed; use config.replace({name}=...)")

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not the config's own fields: the arguments.
        if name.startswith("_"):
            raise AttributeError(name)
        params = object.__getattribute__(self, "_params")
        if name in params:
            return copy.deepcopy(params[name])
        raise AttributeError(
            f"this {self.model_type!r} config has no field or argument {name!r}; its arguments: "
            f"{', '.join(params) or 'none'}"
        )

    # -- the seed's API ------------------------------------------------------------------

    def get_model_params(self) -> dict[str, Any]:
        """The architecture's constructor arguments, ready to call its builder with:
        `create_multi_task_model(**config.get_model_params())`."""
        checked = self.checked()
        return get_model_entry(checked.model_type).signature.build_kwargs(copy.deepcopy(checked._params))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the config as JSON (sorted keys), atomically; refuses to overwrite unless asked."""
        path = Path(path)
        with atomic_write(path, overwrite=overwrite) as fd:
            write_all(fd, self.to_json().encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a config JSON file, a sidecar included (its weights binding is set aside)."""
        document = _read_json_file(Path(path))
        document.pop("weights", None)
        return cls.from_dict(document, path=path)

    @classmethod
    def from_checkpoint_dir(cls, folder: str | os.PathLike) -> "ModelConfig":
        """The config in `folder/model_config.json`. There is no default: a missing file is an error."""
        path = Path(folder) / SIDECAR_NAME
        if not path.exists():
            raise CheckpointNotFoundError(
                f"no {SIDECAR_NAME} here; run `ckptfmt convert {folder}` to create it "
                "from the checkpoints' weights",
                path=path,
            )
        return cls.load(path)

    # -- beyond the seed -----------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "ModelConfig":
        """The config embedded in a .safetensors file, read from its header without torch and
        without the architecture (it is checked against it when used).

        Example:
            >>> ModelConfig.from_checkpoint("converted/multitask_joint/best_model.safetensors").depth
            3
        """
        document = read_header(path).config_dict()
        if document is None:
            raise ConfigError(
                "has no embedded config (weights only); rebuild it with load_model(path, "
                "builder=...), or attach a config with `ckptfmt convert`",
                path=path,
            )
        return cls.from_dict(document, path=path)

    @classmethod
    def from_model(cls, model: Any, **fields: Any) -> "ModelConfig":
        """The config of a model built by a registered architecture, from the arguments it was
        built with, plus `fields` (description, class_names, ...).

        Raises:
            ConfigError: the model's class is not registered (the message shows how to register
                it), or it was built with an argument a config cannot hold (named).

        Example:
            >>> ModelConfig.from_model(MultiTaskUNet(base_filters=16, depth=3)).depth
            3
        """
        captured = captured_arguments(model) or recognised_arguments(model)
        inner = unwrap_model(model)
        name = type(inner).__name__
        loaded = getattr(inner, "__dict__", {}).get(_FILE_CONFIG)
        if captured is None and loaded is not None:
            # Built by load_model from a file whose model records nothing of itself (torchvision's,
            # MONAI's, a factory's): the file's config is how it was built.
            captured = (loaded.model_type, loaded.params)
        if captured is None:
            suggested = re.sub(r"(?<!^)(?=[A-Z])", "_", type(inner).__name__).lower()
            raise UnregisteredModelError(
                f"{name} is not a registered architecture, so nothing records how to rebuild it.",
                fix=Words(f"Register it: put @ckptfmt.register_model({suggested!r}) above `class {name}`, or "
                          "pass config= with the config of a registered architecture",
                          f"Register it: put @ckptfmt.register_model({suggested!r}) above `class {name}`, or "
                          "pass --config with the config of a registered architecture"),
                model_class=name,
            )
        model_type, arguments = captured
        if isinstance(arguments, str):
            raise ConfigError(f"{name} was built by the registered {model_type!r}, but {arguments}")
        if loaded is not None and loaded.model_type == model_type:
            # A model load_model built: what its file said of it (class names, normalization, ...)
            # is kept, unless `fields` says otherwise.
            fields = {**{k: v for k, v in loaded._fields().items() if k != "model_type"}, **fields}
        try:
            return cls(model_type, **fields, **arguments)
        except ConfigError as exc:
            raise exc.at(problem=f"cannot record how {name} was built: " + exc.problem) from None

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, path: str | os.PathLike | None = None) -> "ModelConfig":
        """Read a config document (as `to_dict` gives, or an older schema's): migrated, and
        checked without the architecture; `checked()` checks it against that.

        Example:
            >>> ModelConfig.from_dict({"model_type": "multitask", "base_filters": 32, "depth": 3}).depth
            3
        """
        try:
            if not isinstance(document, Mapping):
                raise ConfigError(f"a config must be a JSON object, not {type(document).__name__}")
            document = dict(document)
            schema = document.get("schema_version", 0)
            if type(schema) is not int or schema < 0:
                raise ConfigError(f"schema_version must be a non-negative int, not {schema!r}")
            if schema > SCHEMA_VERSION:
                raise ConfigError(
                    f"written by a newer ckptfmt (schema {schema}); this one reads up to schema "
                    f"{SCHEMA_VERSION}. Upgrade ckptfmt (pip install -U ckptfmt)"
                )
            while schema < SCHEMA_VERSION:
                document = _MIGRATIONS[schema](document)
                schema = document["schema_version"]
            document.pop("schema_version")
            if "model_type" not in document:
                raise ConfigError("has no model_type; a config names its architecture")
            fields = {"model_type": document.pop("model_type")}
            for name in RESERVED_NAMES:
                if name in document:
                    fields[name] = document.pop(name)
            fields = {**_TEXT_FIELDS, "task": None, "class_names": None, "normalization": None,
                      "seg_threshold": None, **fields}
            fields, params = _check_structure(fields, document)
        except ConfigError as exc:
            raise _with_path(exc, path) from None
        config = cls.__new__(cls)
        config._set(fields, params, checked=False, path=path)
        return config

    def checked(self, *, path: str | os.PathLike | None = None) -> "ModelConfig":
        """This config checked against its architecture, with every default filled in (itself
        when it already is). Imports the architecture.

        Raises:
            UnknownModelTypeError: the architecture is not registered here; the message says to
                import or install what registers it.
            ConfigError: an argument the architecture refuses, named.
        """
        if self._checked is True:
            return self
        if self._checked is None:
            try:
                fields, params = _check_architecture(self._fields(), dict(self._params))
            except (ConfigError, MissingDependencyError) as exc:  # the latter: an adapter's library is not here
                raise _with_path(exc, path or self._path) from None
            twin = ModelConfig.__new__(ModelConfig)
            twin._set(fields, params, checked=True, path=self._path)
            object.__setattr__(self, "_checked", twin)
        return self._checked

    @property
    def is_checked(self) -> bool:
        return self._checked is True

    @property
    def params(self) -> dict[str, Any]:
        """The architecture's arguments, as JSON values (a copy)."""
        return copy.deepcopy(self._params)

    def _fields(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type, **{name: getattr(self, name) for name in _TEXT_FIELDS},
            "task": self.task, "class_names": self.class_names, "normalization": self.normalization,
            "seg_threshold": self.seg_threshold,
        }

    def to_dict(self) -> dict[str, Any]:
        document = {**copy.deepcopy(self._params), **self._fields(), "schema_version": SCHEMA_VERSION}
        document["class_names"] = list(self.class_names) if self.class_names is not None else None
        document["normalization"] = copy.deepcopy(self.normalization)
        for name in ("task", "seg_threshold"):
            if document[name] is None:
                del document[name]
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with `overrides` applied, checked against the architecture.

        Example:
            >>> ModelConfig().replace(depth=3).depth
            3
        """
        document = {**self.to_dict(), **overrides}
        document.pop("schema_version")
        return ModelConfig(**document)

    def summary(self) -> str:
        """`model_type(argument=value, ...)`, one line, arguments in name order (as the file
        stores them, so that a config read without its architecture reads the same)."""
        arguments = ", ".join(f"{name}={json.dumps(self._params[name])}" for name in sorted(self._params))
        return f"{self.model_type}({arguments})"

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else f"class_{index}"

    # Immutable, so a copy is the config itself; pickled as its document.
    def __copy__(self) -> "ModelConfig":
        return self

    def __deepcopy__(self, memo: dict) -> "ModelConfig":
        return self

    def __reduce__(self):
        return (ModelConfig.from_dict, (self.to_dict(),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        fields = {k: v for k, v in self._fields().items() if v not in (None, "") and k != "model_type"}
        shown = [f"{k}={v!r}" for k, v in {**self._params, **fields}.items()]
        return f"ModelConfig({', '.join([repr(self.model_type), *shown])})"


def _with_path(exc: CkptfmtError, path: str | os.PathLike | None) -> CkptfmtError:
    if path is None or exc.path is not None:
        return exc
    return exc.at(path)


def _check_structure(fields: dict[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks that need no architecture: the config's own fields, and JSON arguments."""
    fields = dict(fields)
    check_model_type_name(fields["model_type"])
    for name in _TEXT_FIELDS:
        if not isinstance(fields[name], str):
            raise ConfigError(f"{name} must be a string, not {fields[name]!r}")
    task = fields["task"]
    if task is not None and task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    names = fields["class_names"]
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"class_names must be a list of strings, not {names!r}")
        fields["class_names"] = tuple(names)
    fields["normalization"] = _check_normalization(
        {"mode": "none"} if fields["normalization"] is None else fields["normalization"], None
    )
    threshold = fields["seg_threshold"]
    if threshold is not None:
        if type(threshold) not in (int, float) or not 0 < threshold < 1:
            raise ConfigError(f"seg_threshold must be a number between 0 and 1, not {threshold!r}")
        if task == "classification":
            raise ConfigError("seg_threshold is for models that segment; a classification model has none")
        fields["seg_threshold"] = float(threshold)
    checked_params = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"config key {name!r} is neither a config field nor an argument name")
        checked_params[name] = plain_json(value, what=name)
    return fields, checked_params


def _check_architecture(fields: dict[str, Any], params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks the architecture makes: its signature and annotations, its own check, its
    task; every default filled in."""
    entry = get_model_entry(fields["model_type"])
    params = entry.complete(params)
    task: Task | None = entry.describe_task(params)
    fields = dict(fields)
    if task is not None:
        if fields["task"] is not None and fields["task"] != task.kind:
            raise ConfigError(f"task {fields['task']!r} does not match the architecture, which does {task.kind}")
        fields["task"] = task.kind
    if fields["task"] is not None and "segmentation" in fields["task"] and fields["seg_threshold"] is None:
        fields["seg_threshold"] = DEFAULT_SEG_THRESHOLD
    if fields["task"] == "classification" and fields["seg_threshold"] is not None:
        raise ConfigError("seg_threshold is for models that segment; a classification model has none")
    if task is not None:
        names = fields["class_names"]
        classes = task.classes if task.classes is not None else task.mask_channels
        if names is not None and classes is not None and len(names) != classes:
            raise ConfigError(f"class_names has {len(names)} names but the model has {classes} classes")
        fields["normalization"] = _check_normalization(fields["normalization"], task.in_channels)
    return fields, params


def _check_normalization(value: Any, in_channels: int | None) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("mode") not in NORMALIZATION_MODES:
        raise ConfigError(
            f"normalization must be an object whose mode is one of {', '.join(NORMALIZATION_MODES)}, "
            f"not {value!r}"
        )
    expected = {"mode", "mean", "std"} if value["mode"] == "fixed" else {"mode"}
    if set(value) != expected:
        raise ConfigError(
            f"normalization mode {value['mode']!r} takes exactly the keys {', '.join(sorted(expected))}, "
            f"not {', '.join(sorted(value))}"
        )
    if value["mode"] != "fixed":
        return dict(value)
    result = {"mode": "fixed"}
    counts = (1,) if in_channels is None else (1, in_channels)
    for key in ("mean", "std"):
        numbers = value[key]
        if not isinstance(numbers, list):
            numbers = [numbers]
        fits = in_channels is None or len(numbers) in counts
        if not numbers or not fits or not all(type(n) in (int, float) and math.isfinite(n) for n in numbers):
            one_per = f" or a list of {in_channels}" if in_channels else " or a list, one per input channel"
            raise ConfigError(f"normalization {key} must be a finite number{one_per}, not {value[key]!r}")
        result[key] = [float(n) for n in numbers]
    if any(s <= 0 for s in result["std"]):
        raise ConfigError(f"normalization std must be positive, not {value['std']!r}")
    return result


def _read_json_file(path: Path) -> dict[str, Any]:
    raw = read_capped(path, limit=MAX_CONFIG_FILE_BYTES, what="a config JSON file", error=ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text; is it really a config JSON file?", path=path) from None
    document = loads_strict(text, what="config", path=path, error=ConfigError)
    if not isinstance(document, dict):
        raise ConfigError(f"must hold a JSON object, not {type(document).__name__}", path=path)
    return document


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields and arguments that differ, as `name: a != b` lines, sorted by name.

    A field that one of them does not record (a config read from a file but not yet checked
    against its architecture lacks the defaults) is compared only when both are checked.
    """
    first, second = a.to_dict(), b.to_dict()
    if a.is_checked and b.is_checked:
        names = sorted(set(first) | set(second))
    else:
        names = sorted(set(first) & set(second))
    unset = object()

    def shown(document: dict[str, Any], name: str) -> str:
        return repr(document[name]) if name in document else "(not set)"

    return [
        f"{name}: {shown(first, name)} != {shown(second, name)}"
        for name in names if first.get(name, unset) != second.get(name, unset)
    ]


@dataclass(frozen=True)
class Sidecar:
    """A parsed `model_config.json`: the config and the weights files it is bound to."""

    path: Path
    config: ModelConfig
    weights: dict[str, str]  # file name -> ckptfmt.weights_sha256


def read_sidecar(folder: str | os.PathLike) -> Sidecar | None:
    """The sidecar in `folder`, or None when there is none."""
    path = Path(folder) / SIDECAR_NAME
    if not os.path.lexists(path):
        return None
    document = _read_json_file(path)
    weights = document.pop("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise ConfigError("'weights' must map file names to digests", path=path)
    return Sidecar(path, ModelConfig.from_dict(document, path=path), weights)


def _same_config(existing: ModelConfig, config: ModelConfig) -> list[str]:
    """Differences between a sidecar's config and the one about to be written, both complete."""
    try:
        existing = existing.checked()
    except CkptfmtError:
        pass  # another architecture, or an invalid sidecar: compared as it is
    return config_differences(existing, config)


def check_sidecar_accepts(folder: str | os.PathLike, config: ModelConfig, *, overwrite: bool) -> Sidecar | None:
    """The sidecar in `folder` (or None), after checking that `config` may be written there:
    a sidecar holding another config is an error naming the fields, unless `overwrite`.
    Called before the weights are written, so that a refusal leaves nothing half done."""
    existing = read_sidecar(folder)
    if existing is not None and not overwrite:
        differences = _same_config(existing.config, config)
        if differences:
            raise ConfigError(
                f"holds another config ({'; '.join(differences)})", path=existing.path,
                fix=OVERWRITE_FIX,
            )
    return existing


def write_sidecar(
    folder: str | os.PathLike, config: ModelConfig, weights_file: str | None = None,
    weights_sha256: str | None = None, *, overwrite: bool = False, bindings: Mapping[str, str] | None = None,
    sync_folder: bool = True,
) -> Path:
    """Write or update `folder/model_config.json`, binding `weights_file` (or each of
    `bindings`, file name -> digest) to its digest.

    Several checkpoints of one architecture share a folder's sidecar (best_model and
    last_model, as in the seed), each with its own binding; legacy .pth files get none. A
    sidecar holding another config is an error naming the fields, unless `overwrite`, which
    starts it afresh.
    """
    existing = check_sidecar_accepts(folder, config, overwrite=overwrite)
    bindings = {**(bindings or {}), **({weights_file: weights_sha256} if weights_file else {})}
    if existing is not None and not _same_config(existing.config, config):
        bindings = {**existing.weights, **bindings}
    document = {**config.to_dict(), "weights": dict(sorted(bindings.items()))}
    path = Path(folder) / SIDECAR_NAME
    with atomic_write(path, overwrite=existing is not None, sync_folder=sync_folder) as fd:
        write_all(fd, (json.dumps(document, sort_keys=True, indent=2) + "\n").encode())
    return path
