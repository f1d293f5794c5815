"""Saving a model with its config, and rebuilding it from the file alone.

Loading runs in one fixed order: read the header, resolve the config (overrides > embedded >
sidecar > inferred from the weights), check it against the tensor shapes, build the model on
the meta device, load the tensors with `assign=True`. No memory is allocated before the shapes
are known to fit, no weights are randomly initialised only to be overwritten, and a mismatch is
our error naming the field and the tensor, never torch's wall of size-mismatch lines.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import check_writable
from .config import (
    ARCHITECTURE_FIELDS,
    ModelConfig,
    check_sidecar_accepts,
    config_differences,
    read_sidecar,
    write_sidecar,
)
from .digest import check_digest, digest_file
from .errors import (
    ArchitectureNotRecognisedError,
    CheckpointNotFoundError,
    ConfigError,
    DeviceError,
    IntegrityError,
    ShapeMismatchError,
)
from .header import (
    FORMAT_VERSION,
    KEY_CONFIG,
    KEY_FORMAT,
    KEY_FORMAT_VERSION,
    KEY_OPTIMIZER,
    KEY_PROVENANCE,
    KEY_TRAINING,
    Header,
    looks_like_safetensors,
    loads_strict,
    read_header,
)
from .legacy import LegacyCheckpoint, read_legacy_checkpoint
from .registry import get_model_entry, registered_model_types
from .tensors import load_tensors, write_safetensors

__all__ = [
    "build_metadata",
    "check_shapes",
    "infer_model_config",
    "load_model",
    "load_model_with_config",
    "load_training_state",
    "open_checkpoint",
    "save_model_with_config",
    "write_optimizer_state",
]

logger = logging.getLogger("ckptfmt")

OPTIMIZER_SUFFIX = ".optimizer.safetensors"


# -- saving ---------------------------------------------------------------------------------


def save_model_with_config(
    model: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    config: ModelConfig,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a model as one self-describing .safetensors file, plus the sidecar.

    Args:
        model: the model; its state dict is checked against `config` before anything is written.
        checkpoint_path: where to write. A `.pth` name is written as `.safetensors` (with a
            warning naming the real path): weights are never pickled.
        config: the model's ModelConfig.
        optimizer: if given, its state goes to `NAME.optimizer.safetensors` beside the
            checkpoint, without pickle; `load_training_state` restores it.
        epoch, metrics: the training record, kept in the header.
        overwrite: replace existing files; without it an existing output is an error.

    Returns:
        The path of the written .safetensors file.

    Example:
        >>> config = ModelConfig(base_filters=32, depth=3, trained_on="BraTS 2020")
        >>> model = create_multi_task_model(**config.get_model_params())
        >>> save_model_with_config(model, "runs/joint/best_model.safetensors", config,
        ...                        optimizer=optimizer, epoch=12, metrics={"dice": 0.88})
        PosixPath('runs/joint/best_model.safetensors')
    """
    path = Path(checkpoint_path)
    if path.suffix != ".safetensors":
        real = path.with_suffix(".safetensors")
        logger.warning("%s: checkpoints are written as safetensors, not pickled; writing %s", path, real)
        path = real
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig, not {type(config).__name__}", path=path)
    state_dict = model.state_dict()
    check_shapes(config, {n: tuple(t.shape) for n, t in state_dict.items()}, path=path)
    companion = path.with_name(path.stem + OPTIMIZER_SUFFIX)
    check_writable(path, overwrite=overwrite)
    if optimizer is not None:
        check_writable(companion, overwrite=overwrite)
    check_sidecar_accepts(path.parent, config, overwrite=overwrite)

    training = _training_record(epoch, metrics, path)
    if optimizer is not None:
        training["optimizer"] = write_optimizer_state(companion, optimizer.state_dict(), overwrite=overwrite)
    metadata = build_metadata(config, training=training, provenance=provenance_record())
    digest = write_safetensors(path, state_dict, metadata, overwrite=overwrite)
    write_sidecar(path.parent, config, path.name, digest, overwrite=overwrite)
    return path


def build_metadata(
    config: ModelConfig | None, *, training: Mapping[str, Any], provenance: Mapping[str, Any]
) -> dict[str, str]:
    """The `__metadata__` of a ckptfmt file (see the README's format section); the weights
    digest is added by `write_safetensors` as it writes."""
    metadata = {
        KEY_FORMAT: "pt",
        KEY_FORMAT_VERSION: FORMAT_VERSION,
        KEY_PROVENANCE: _dumps(provenance),
    }
    if config is not None:
        metadata[KEY_CONFIG] = json.dumps(config.to_dict(), sort_keys=True)
    if training:
        metadata[KEY_TRAINING] = _dumps(training)
    return metadata


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


def provenance_record(**extra: Any) -> dict[str, Any]:
    from . import __version__

    return {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ckptfmt": __version__,
        "torch": torch.__version__,
        **extra,
    }


def _training_record(epoch: Any, metrics: Any, path: Path) -> dict[str, Any]:
    training: dict[str, Any] = {}
    if epoch is not None:
        if type(epoch) is not int or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative int, not {epoch!r}", path=path)
        training["epoch"] = epoch
    if metrics is not None:
        if not isinstance(metrics, Mapping):
            raise ConfigError(f"metrics must be a dict of numbers, not {type(metrics).__name__}", path=path)
        clean = {}
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if type(value) not in (int, float) or not math.isfinite(value):
                raise ConfigError(f"metric {name!r} must be a finite number, not {value!r}", path=path)
            clean[str(name)] = value
        training["metrics"] = clean
    return training


# -- optimizer state without pickle ---------------------------------------------------------


def write_optimizer_state(
    path: str | os.PathLike, state_dict: Mapping[str, Any], *, overwrite: bool = False
) -> dict[str, str]:
    """Save an optimizer state dict as safetensors: tensors as tensors, the rest as JSON.

    Returns the training record's binding, `{"file": name, "sha256": digest}`.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = where if where not in tensors else f"{where}#{len(tensors)}"
            tensors[name] = value
            return {"__tensor__": name}
        if isinstance(value, Mapping):
            return {"__items__": [[encode(k, where), encode(v, f"{where}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{where}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{where}.{i}") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            return {"__float__": repr(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ConfigError(
            f"optimizer state {where!r} holds a {type(value).__name__}, which cannot be saved "
            "without pickle",
            path=path,
        )

    structure = encode(dict(state_dict), "optimizer")
    metadata = {
        KEY_FORMAT: "pt",
        KEY_FORMAT_VERSION: FORMAT_VERSION,
        KEY_OPTIMIZER: json.dumps(structure, sort_keys=True),
    }
    return {"file": path.name, "sha256": write_safetensors(path, tensors, metadata, overwrite=overwrite)}


def read_optimizer_state(path: str | os.PathLike, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Read an optimizer state written by `write_optimizer_state`, checking its digest."""
    header = read_header(path)
    if KEY_OPTIMIZER not in header.metadata:
        raise IntegrityError("is not a ckptfmt optimizer-state file", path=path)
    actual = digest_file(header)
    for wanted, what in ((header.weights_sha256, "its own digest"), (expected_sha256, "the checkpoint")):
        if wanted is not None and actual != wanted:
            raise IntegrityError(
                f"does not match {what} (sha256 {actual[:12]}... != {wanted[:12]}...); it was "
                "changed or belongs to another checkpoint",
                path=path,
            )
    tensors = load_tensors(header)

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            return tensors[value["__tensor__"]].clone()
        if "__items__" in value:
            return {decode(k): decode(v) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return float(value["__float__"])

    return decode(loads_strict(header.metadata[KEY_OPTIMIZER], what="optimizer state", path=path))


def load_training_state(checkpoint_path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore the optimizer saved with a checkpoint, and return its training record.

    Save, then resume with this, then step, gives bit for bit what never stopping gives.

    Example:
        >>> model = load_model("runs/joint/best_model.safetensors").train()
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> load_training_state("runs/joint/best_model.safetensors", optimizer)["epoch"]
        12
    """
    path = resolve_checkpoint_path(checkpoint_path)
    training = read_header(path).training()
    if optimizer is not None:
        binding = training.get("optimizer")
        if not binding:
            raise CheckpointNotFoundError(
                "was saved without optimizer state; pass optimizer= to save_model_with_config",
                path=path,
            )
        state = read_optimizer_state(path.parent / binding["file"], expected_sha256=binding["sha256"])
        optimizer.load_state_dict(state)
    return training


# -- loading --------------------------------------------------------------------------------


@dataclass
class OpenedCheckpoint:
    """A checkpoint resolved up to, but not including, allocating the model."""

    path: Path
    config: ModelConfig
    config_source: str  # "embedded", "sidecar" or "inferred", "+overrides" when overridden
    header: Header | None
    legacy: LegacyCheckpoint | None

    @property
    def training(self) -> dict[str, Any]:
        return self.header.training() if self.header else self.legacy.training

    def metadata(self) -> dict[str, Any]:
        if self.header is None:
            return {"format": "legacy", "serialization": self.legacy.serialization, "source_sha256": self.legacy.sha256}
        return {
            "format_version": self.header.format_version,
            "weights_sha256": self.header.weights_sha256,
            "provenance": self.header.provenance(),
        }


def open_checkpoint(
    path: str | os.PathLike, *, overrides: Mapping[str, Any] | None = None, unsafe_pickle: bool = False
) -> OpenedCheckpoint:
    """Read a checkpoint's header (or a legacy file) and resolve and check its config."""
    path = resolve_checkpoint_path(path)
    if path.is_dir():
        raise CheckpointNotFoundError("is a folder; give the checkpoint file inside it", path=path)
    header = legacy = None
    if looks_like_safetensors(path):
        header = read_header(path)
        shapes = header.shapes()
        embedded = header.config_dict()
        sidecar = read_sidecar(path.parent)
        if embedded is not None:
            config, source = ModelConfig.from_dict(embedded, path=path), "embedded"
            logger.info("Loaded model config from: %s (embedded)", path)
            if sidecar is not None and path.name in sidecar.weights:
                differences = config_differences(config, sidecar.config)
                if differences:
                    logger.warning(
                        "%s: the sidecar %s disagrees with the embedded config (%s); using the "
                        "embedded one. Run `ckptfmt verify` to see all differences",
                        path, sidecar.path, "; ".join(differences),
                    )
    else:
        legacy = read_legacy_checkpoint(path, unsafe_pickle=unsafe_pickle)
        shapes = {name: tuple(t.shape) for name, t in legacy.state_dict.items()}
        sidecar = read_sidecar(path.parent)
        embedded = None
    if embedded is None:
        if sidecar is not None:
            config, source = sidecar.config, "sidecar"
            logger.info("Loaded model config from: %s", sidecar.path)
        else:
            config, source = infer_model_config(shapes, path=path), "inferred"
            logger.warning(
                "%s: no config embedded and no model_config.json beside it; architecture inferred "
                "from the weights: %s. Convert it (`ckptfmt convert`) to record it",
                path, architecture_summary(config),
            )
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if overrides:
        try:
            config = config.replace(**overrides)
        except ConfigError as exc:
            raise type(exc)(f"override rejected: {exc.message}", path=path) from None
        source += "+overrides"
    check_shapes(config, shapes, path=path, overridden=tuple(overrides))
    logger.info("Using architecture: %s", architecture_summary(config))
    return OpenedCheckpoint(path, config, source, header, legacy)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """The file to read. `NAME.pth` that was saved as `NAME.safetensors` (as
    save_model_with_config does) is found there, so the seed's paths keep working."""
    path = Path(path)
    if path.exists():
        return path
    saved_as = path.with_suffix(".safetensors")
    if path.suffix in (".pth", ".pt") and saved_as.exists():
        logger.info("%s: reading %s, which it was saved as", path, saved_as)
        return saved_as
    raise CheckpointNotFoundError("no such file", path=path)


def architecture_summary(config: ModelConfig) -> str:
    return ", ".join(f"{name}={getattr(config, name)}" for name in ("base_filters", "depth"))


def infer_model_config(
    shapes: Mapping[str, tuple[int, ...]], *, model_type: str | None = None, path: str | os.PathLike | None = None
) -> ModelConfig:
    """A config recovered from tensor shapes by the registered architectures' `infer_config`.

    Raises:
        ArchitectureNotRecognisedError: no registered architecture recognises the shapes;
            the message gives each one's reason.
    """
    reasons = []
    for name in [model_type] if model_type else registered_model_types():
        entry = get_model_entry(name)
        if entry.infer_config is None:
            reasons.append(f"{name}: cannot infer its config")
            continue
        try:
            params = entry.infer_config(shapes)
        except ArchitectureNotRecognisedError as exc:
            reasons.append(f"{name}: {exc.message}")
            continue
        return ModelConfig(model_type=name, **params)
    raise ArchitectureNotRecognisedError(
        f"no registered architecture recognises these weights ({'; '.join(reasons)})", path=path
    )


def check_shapes(
    config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], *, path: str | os.PathLike | None = None,
    overridden: tuple[str, ...] = (), strict: bool = True,
) -> None:
    """Check a config against a state dict's shapes, on the meta device; nothing is allocated.

    Raises:
        ShapeMismatchError: naming the field, the tensor and both shapes, e.g. `base_filters=32
            expects enc.0.0.weight [32, 1, 3, 3]; the file has [64, 1, 3, 3]`.
    """
    entry = get_model_entry(config.model_type)
    expected = entry.state_shapes(config.get_model_params())
    problems = []
    for name, want in expected.items():
        have = shapes.get(name)
        if have is None:
            if strict:
                problems.append(f"{name} {list(want)}; the file has no such tensor")
        elif tuple(have) != want:
            problems.append(f"{name} {list(want)}; the file has {list(have)}")
    if strict:
        problems += [
            f"no tensor {name}; the file has {name} {list(shapes[name])}"
            for name in shapes if name not in expected
        ]
    if not problems:
        return
    fields: list[str] = []
    weights_say = ""
    if entry.infer_config is not None:
        try:
            inferred = entry.infer_config(shapes)
        except ArchitectureNotRecognisedError:
            inferred = None
        if inferred:
            fields = [f for f in ARCHITECTURE_FIELDS if inferred.get(f) != getattr(config, f)]
            fields.sort(key=lambda f: f not in overridden)
            weights_say = f" (the weights say {', '.join(f'{f}={inferred[f]}' for f in fields)})"
    culprit = f"{fields[0]}={getattr(config, fields[0])}" if fields else "the config"
    more = f", and {len(problems) - 1} more mismatch{'es' if len(problems) > 2 else ''}" if len(problems) > 1 else ""
    fix = "remove the override" if set(fields) & set(overridden) else "fix the config"
    raise ShapeMismatchError(f"{culprit} expects {problems[0]}{more}{weights_say}; {fix}", path=path)


def resolve_device(device: str | torch.device, path: Path) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"invalid device {device!r}: {exc}", path=path) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but CUDA is not available here; use device='cpu'", path=path)
    return device


def _build(
    opened: OpenedCheckpoint, *, device: str | torch.device, dtype: torch.dtype | None, strict: bool,
    factory: Callable[..., torch.nn.Module] | None = None, verify: bool = False,
) -> torch.nn.Module:
    device = resolve_device(device, opened.path)
    if verify and opened.header is not None:
        check_digest(opened.header)
    factory = factory or get_model_entry(opened.config.model_type).builder
    with torch.device("meta"):
        model = factory(**opened.config.get_model_params())
    if opened.header is not None:
        state_dict = load_tensors(opened.header, device=device)
    else:
        state_dict = {n: t.to(device) for n, t in opened.legacy.state_dict.items()}
    model.load_state_dict(state_dict, strict=strict, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ShapeMismatchError(
            f"the file has no values for {', '.join(left[:5])}; load with strict=True to see why",
            path=opened.path,
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_model(
    checkpoint_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    verify: bool = False,
    unsafe_pickle: bool = False,
    **overrides: Any,
) -> torch.nn.Module:
    """Rebuild a model from its checkpoint alone, in eval mode.

    Args:
        checkpoint_path: a .safetensors written by ckptfmt (or a legacy .pth: its config comes
            from the sidecar beside it, else from the weights, with a warning).
        device: where the weights go; on the CPU they are memory-mapped, not copied.
        dtype: cast floating-point weights after loading (e.g. torch.float16).
        strict: every tensor must match, as in `load_state_dict`.
        verify: check the weights digest first (reads the whole file once; off by default
            so that loading stays a memory map).
        unsafe_pickle: for a legacy .pth only; allow arbitrary pickles (runs code from the file).
        **overrides: config fields to change; checked against the weights before loading.

    Raises:
        ShapeMismatchError: the config (with overrides) does not fit the weights.

    Example:
        >>> model = load_model("checkpoints/multitask_joint/best_model.safetensors")
        >>> seg_logits, cls_logits = model(torch.zeros(1, 1, 64, 64))
    """
    opened = open_checkpoint(checkpoint_path, overrides=overrides, unsafe_pickle=unsafe_pickle)
    return _build(opened, device=device, dtype=dtype, strict=strict, verify=verify)


def load_model_with_config(
    checkpoint_path: str | os.PathLike,
    model_factory_fn: Callable[..., torch.nn.Module] | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """The seed's loader: `(model, config, checkpoint)`, where `checkpoint` has no tensors.

    Args:
        checkpoint_path: a .safetensors or a legacy .pth (see `load_model`).
        model_factory_fn: builds the model from `config.get_model_params()`; defaults to the
            architecture registered under the config's model_type.
        device: where the weights go.
        **overrides: config fields to change; checked against the weights before loading.

    Returns:
        The model (eval mode), its ModelConfig, and a dict with `epoch`, `metrics`, `training`,
        `config_source` and `metadata`.

    Example:
        >>> model, config, checkpoint = load_model_with_config(
        ...     "checkpoints/multitask_joint/best_model.safetensors",
        ...     model_factory_fn=create_multi_task_model, device="cpu")
        >>> checkpoint["epoch"]
        3
    """
    opened = open_checkpoint(checkpoint_path, overrides=overrides)
    model = _build(opened, device=device, dtype=None, strict=True, factory=model_factory_fn)
    training = opened.training
    checkpoint = {
        "epoch": training.get("epoch"),
        "metrics": training.get("metrics", {}),
        "training": training,
        "config_source": opened.config_source,
        "metadata": opened.metadata(),
    }
    return model, opened.config, checkpoint
