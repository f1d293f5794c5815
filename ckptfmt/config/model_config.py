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

Older schemas are migrated by the small pure functions in `MIGRATIONS`; a newer one is refused.

The sidecar `model_config.json` is the config plus `weights`: the name and digest of each
.safetensors file in the folder that it describes. The embedded copy in each file is
authoritative; the binding lets `verify` catch a sidecar that drifted, or a crash between
writing the weights and the sidecar.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import (
    CheckpointNotFoundError,
    CkptfmtError,
    ConfigError,
    MissingDependencyError,
    PluginError,
    UnregisteredModelError,
    Words,
)
from ..format.header import read_header
from ..io.atomic import atomic_write, write_all
from ..io.files import read_capped
from ..io.jsondoc import loads_strict
from .arguments import RESERVED_NAMES
from .capture import captured_arguments, unwrap_model
from .fields import (
    SEED_MODEL_TYPE,
    TEXT_FIELDS,
    check_architecture,
    check_structure,
)
from .migrations import MIGRATIONS
from .registry import get_model_entry, recognised_arguments

__all__ = [
    "SCHEMA_VERSION",
    "SIDECAR_NAME",
    "ModelConfig",
    "config_differences",
    "read_config_file",
]

SCHEMA_VERSION = 2
SIDECAR_NAME = "model_config.json"
# A config file is a few kilobytes; a sidecar binds one digest per checkpoint in its folder.
MAX_CONFIG_FILE_BYTES = 16 << 20



# Where a model that load_model built keeps its file's config (see `remember_file_config`).
_FILE_CONFIG = "_ckptfmt_file_config"


def remember_file_config(model: Any, config: "ModelConfig") -> None:
    """Keep on `model` the config of the file it was loaded from, so that saving it again writes
    what that file said of it (description, class names, normalization), not only its arguments."""
    unwrap_model(model).__dict__[_FILE_CONFIG] = config


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
        fields, params = check_structure(fields, params)
        fields, params = check_architecture(fields, params)
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
        document = read_config_file(Path(path))
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
                document = MIGRATIONS[schema](document)
                schema = document["schema_version"]
            document.pop("schema_version")
            if "model_type" not in document:
                raise ConfigError("has no model_type; a config names its architecture")
            fields = {"model_type": document.pop("model_type")}
            for name in RESERVED_NAMES:
                if name in document:
                    fields[name] = document.pop(name)
            fields = {**TEXT_FIELDS, "task": None, "class_names": None, "normalization": None,
                      "seg_threshold": None, **fields}
            fields, params = check_structure(fields, document)
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
                fields, params = check_architecture(self._fields(), dict(self._params))
            # An adapter's library not here, or a plugin that failed to import: said about this file.
            except (ConfigError, MissingDependencyError, PluginError) as exc:
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
            "model_type": self.model_type, **{name: getattr(self, name) for name in TEXT_FIELDS},
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


def read_config_file(path: Path) -> dict[str, Any]:
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
