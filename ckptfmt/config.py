"""ModelConfig: what a checkpoint needs to rebuild and run its model, and the sidecar.

The config is validated when it is made, so an invalid one never exists: architecture numbers
are positive ints (not bools, not 64.0), model_type is a registered name, unknown keys are
refused by name. A config from an older schema is migrated by the small pure functions in
`_MIGRATIONS`; one from a newer schema is refused.

The sidecar `model_config.json` is the flat config, as the original system wrote it, plus
`weights`: the name and digest of each .safetensors file in the folder that it describes. The
embedded copy in each file is authoritative; the binding lets `verify` catch a sidecar that
drifted, or a crash between writing the weights and the sidecar.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write, write_all
from .errors import CheckpointNotFoundError, ConfigError, CkptfmtError
from .header import loads_strict, read_header
from .registry import check_model_type

__all__ = [
    "ARCHITECTURE_FIELDS",
    "SCHEMA_VERSION",
    "SIDECAR_NAME",
    "ModelConfig",
    "Sidecar",
    "check_sidecar_accepts",
    "config_differences",
    "read_sidecar",
    "write_sidecar",
]

SCHEMA_VERSION = 1
SIDECAR_NAME = "model_config.json"
ARCHITECTURE_FIELDS = ("base_filters", "depth", "in_channels", "seg_out_channels", "cls_num_classes")
NORMALIZATION_MODES = ("none", "minmax", "zscore", "fixed")
MAX_DEPTH = 8
# Far above any real U-Net, low enough that a hostile number cannot make a shape overflow.
_ARCHITECTURE_LIMITS = {
    "base_filters": 4096, "depth": MAX_DEPTH, "in_channels": 4096,
    "seg_out_channels": 4096, "cls_num_classes": 1_000_000,
}


def _v0_to_v1(config: dict[str, Any]) -> dict[str, Any]:
    """The original system wrote no schema_version; its ten keys are a subset of v1's."""
    return {**config, "schema_version": 1}


# schema N -> function turning an N dict into an N+1 dict.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture and inference settings of a model, validated on creation.

    Args:
        base_filters, depth, in_channels, seg_out_channels, cls_num_classes: the multi-task
            U-Net's architecture numbers, positive ints; `depth` at most 8.
        model_type: a registered architecture name (see `ckptfmt.registered_model_types`).
        version, description, trained_on, training_config: free text, as in the seed.
        class_names: one name per class, or None for `class_0`, `class_1`, ...
        normalization: how inputs were normalised in training, applied again at inference:
            `{"mode": "none"}`, `{"mode": "minmax"}` (each image to [0, 1]), `{"mode": "zscore"}`
            (each image and channel to mean 0, std 1) or `{"mode": "fixed", "mean": [...],
            "std": [...]}` (one value, or one per input channel).
        seg_threshold: probability above which a pixel is in the mask, in (0, 1).

    Example:
        >>> config = ModelConfig(base_filters=32, depth=3, description="joint fine-tuning")
        >>> config.get_model_params()
        {'base_filters': 32, 'depth': 3, 'in_channels': 1, 'seg_out_channels': 1, 'cls_num_classes': 2}
    """

    base_filters: int = 64
    depth: int = 4
    in_channels: int = 1
    seg_out_channels: int = 1
    cls_num_classes: int = 2
    model_type: str = "multitask"
    version: str = "1.0"
    description: str = ""
    trained_on: str = ""
    training_config: str = ""
    class_names: tuple[str, ...] | None = None
    normalization: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    seg_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ARCHITECTURE_FIELDS:
            value = getattr(self, name)
            if type(value) is not int:
                raise ConfigError(
                    f"{name} must be an int, not {type(value).__name__} {value!r}"
                )
            if not 1 <= value <= _ARCHITECTURE_LIMITS[name]:
                raise ConfigError(
                    f"{name} must lie in 1..{_ARCHITECTURE_LIMITS[name]}, not {value}"
                )
        try:
            check_model_type(self.model_type)
        except ConfigError as exc:
            raise type(exc)(exc.message) from None
        for name in ("version", "description", "trained_on", "training_config"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, not {getattr(self, name)!r}")
        if self.class_names is not None:
            names = self.class_names
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"class_names must be a list of strings, not {names!r}")
            if len(names) != self.cls_num_classes:
                raise ConfigError(
                    f"class_names has {len(names)} names but cls_num_classes is {self.cls_num_classes}"
                )
            object.__setattr__(self, "class_names", tuple(names))
        object.__setattr__(self, "normalization", _check_normalization(self.normalization, self.in_channels))
        threshold = self.seg_threshold
        if type(threshold) not in (int, float) or not 0 < threshold < 1:
            raise ConfigError(f"seg_threshold must be a number between 0 and 1, not {threshold!r}")
        object.__setattr__(self, "seg_threshold", float(threshold))

    # -- the seed's API ------------------------------------------------------------------

    def get_model_params(self) -> dict[str, int]:
        """The architecture's constructor arguments: `create_multi_task_model(**params)`."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

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
        """The config embedded in a .safetensors file, read from its header without torch.

        Example:
            >>> ModelConfig.from_checkpoint("checkpoints/multitask_joint/best_model.safetensors").depth
            3
        """
        document = read_header(path).config_dict()
        if document is None:
            raise ConfigError(
                "has no embedded config (weights only); attach one with "
                "`ckptfmt convert SOURCE --model-type NAME --config model_config.json`",
                path=path,
            )
        return cls.from_dict(document, path=path)

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        if self.class_names is not None:
            document["class_names"] = list(self.class_names)
        document["schema_version"] = SCHEMA_VERSION
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, document: dict[str, Any], *, path: str | os.PathLike | None = None) -> "ModelConfig":
        """Validate and migrate a config dict; unknown keys are refused by name.

        Example:
            >>> ModelConfig.from_dict({"base_filters": 32, "depth": 3}).depth
            3
        """
        try:
            if not isinstance(document, dict):
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
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(document) - known)
            if unknown:
                raise ConfigError(
                    f"unknown config key{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(known))}"
                )
            return cls(**document)
        except ConfigError as exc:
            if path is None or exc.path is not None:
                raise
            raise type(exc)(exc.message, path=path) from None

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with `overrides` applied and validated, unknown names refused.

        Example:
            >>> ModelConfig().replace(depth=3).depth
            3
        """
        return self.from_dict({**self.to_dict(), **overrides})

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else f"class_{index}"


def _check_normalization(value: Any, in_channels: int) -> dict[str, Any]:
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
    for key in ("mean", "std"):
        numbers = value[key]
        if not isinstance(numbers, list):
            numbers = [numbers]
        if len(numbers) not in (1, in_channels) or not all(
            type(n) in (int, float) and math.isfinite(n) for n in numbers
        ):
            raise ConfigError(
                f"normalization {key} must be a finite number or a list of {in_channels}, not {value[key]!r}"
            )
        result[key] = [float(n) for n in numbers]
    if any(s <= 0 for s in result["std"]):
        raise ConfigError(f"normalization std must be positive, not {value['std']!r}")
    return result


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such file", path=path) from None
    except IsADirectoryError:
        raise ConfigError("is a folder, not a config JSON file", path=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text; is it really a config JSON file?", path=path) from None
    try:
        document = loads_strict(text, what="config", path=path)
    except CkptfmtError as exc:
        raise ConfigError(exc.message, path=path) from None
    if not isinstance(document, dict):
        raise ConfigError(f"must hold a JSON object, not {type(document).__name__}", path=path)
    return document


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields that differ, as `name: a != b` lines, in field order."""
    first, second = a.to_dict(), b.to_dict()
    return [
        f"{name}: {first[name]!r} != {second[name]!r}" for name in first if first[name] != second[name]
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
    if not path.exists():
        return None
    document = _read_json_file(path)
    weights = document.pop("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise ConfigError("'weights' must map file names to digests", path=path)
    return Sidecar(path, ModelConfig.from_dict(document, path=path), weights)


def check_sidecar_accepts(folder: str | os.PathLike, config: ModelConfig, *, overwrite: bool) -> Sidecar | None:
    """The sidecar in `folder` (or None), after checking that `config` may be written there:
    a sidecar holding another config is an error naming the fields, unless `overwrite`.
    Called before the weights are written, so that a refusal leaves nothing half done."""
    existing = read_sidecar(folder)
    if existing is not None and not overwrite:
        differences = config_differences(existing.config, config)
        if differences:
            raise ConfigError(
                f"holds another config ({'; '.join(differences)}); pass --force "
                "(overwrite=True) to replace it",
                path=existing.path,
            )
    return existing


def write_sidecar(
    folder: str | os.PathLike, config: ModelConfig, weights_file: str | None = None,
    weights_sha256: str | None = None, *, overwrite: bool = False,
) -> Path:
    """Write or update `folder/model_config.json`, binding `weights_file` to its digest.

    Several checkpoints of one architecture share a folder's sidecar (best_model and
    last_model, as in the seed), each with its own binding; legacy .pth files get none. A
    sidecar holding another config is an error naming the fields, unless `overwrite`, which
    starts it afresh.
    """
    existing = check_sidecar_accepts(folder, config, overwrite=overwrite)
    bindings = {weights_file: weights_sha256} if weights_file else {}
    if existing is not None and existing.config == config:
        bindings = {**existing.weights, **bindings}
    document = {**config.to_dict(), "weights": dict(sorted(bindings.items()))}
    path = Path(folder) / SIDECAR_NAME
    with atomic_write(path, overwrite=existing is not None) as fd:
        write_all(fd, (json.dumps(document, sort_keys=True, indent=2) + "\n").encode())
    return path
