"""Saving a model with its config, and rebuilding it from the file alone.

Loading runs in one fixed order: read the header, resolve the config (overrides > embedded >
sidecar > inferred from the weights), check it against its architecture, check it against the
tensor shapes and dtypes, build the model on the meta device, load the tensors with
`assign=True`. No memory is allocated before the shapes are known to fit, no weights are
randomly initialised only to be overwritten, and a mismatch is our error naming the field and
the tensor, never torch's wall of size-mismatch lines.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config.capture import unwrap_model
from .config.model_config import ModelConfig, remember_file_config
from .config.registry import get_model_entry
from .config.shapes import check_shapes, check_state, module_state
from .config.sidecar import check_sidecar_accepts, sidecar_path, write_sidecar
from .errors import (
    CkptfmtWarning,
    ConfigError,
    DeviceError,
    ShapeMismatchError,
    UnregisteredModelError,
    Words,
)
from .format.companion import companion_for, write_training_state
from .format.digest import verify_read
from .format.index import check_shard_names, is_index, parse_size, write_sharded
from .format.metadata import build_metadata, provenance_record, training_record
from .format.writer import DTYPE_NAMES, write_safetensors
from .io.atomic import check_writable
from .io.transaction import Transaction
from .resolve import Resolution, read_source, resolve

__all__ = [
    "load_model",
    "load_model_with_config",
    "open_checkpoint",
    "resolve_device",
    "resolve_dtype",
    "safetensors_path",
    "save",
    "save_model_with_config",
]

logger = logging.getLogger("ckptfmt")

WEIGHTS_ONLY_FIX = Words(
    "Rebuild it with load_model(path, builder=...) (a function that returns the model), or attach a config with "
    "`convert(SOURCE, model_type='NAME', overrides={'ARGUMENT': 'VALUE'})`",
    "Rebuild it with load_model(path, builder=...) (a function that returns the model), or attach a config with "
    "`ckptfmt convert SOURCE --model-type NAME --set ARGUMENT=VALUE`",
)

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


# -- saving ---------------------------------------------------------------------------------


def save_model_with_config(
    model: torch.nn.Module,
    checkpoint_path: str | os.PathLike,
    config: ModelConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    *,
    scheduler: Any = None,
    scaler: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Save a model as one self-describing .safetensors file, plus the sidecar.

    Args:
        model: the model. Built by a registered architecture, it knows its arguments, and
            `config` may be left out.
        checkpoint_path: where to write. A `.pth` name is written as `.safetensors` (with a
            CkptfmtWarning naming the real path): weights are never pickled.
        config: the model's ModelConfig; it must agree with the arguments the model was built
            with, and it is checked against the model's tensors before anything is written.
        optimizer: if given, its state goes to `NAME.optimizer.safetensors` beside the
            checkpoint, without pickle; `load_training_state` restores it.
        epoch, metrics: the training record, kept in the header.
        scheduler, scaler: a learning-rate scheduler and an AMP GradScaler, whose states go to
            the same companion, for `load_training_state` to restore with the optimizer's.
        overwrite: replace existing files; without it an existing output is an error.
        max_shard_size: write shards of at most this many bytes ("2GB", "500MiB", an int) and
            an index (`NAME.safetensors.index.json`), as Hugging Face does, when the weights do
            not fit in one.

    Returns:
        The path of the written .safetensors file (or of the index of its shards).

    Raises:
        ConfigError: no config and the model's class is not registered (the message shows how
            to register it), or the config disagrees with how the model was built.
        ShapeMismatchError: the config does not fit the model's tensors.

    Example:
        >>> config = ModelConfig(base_filters=32, depth=3, trained_on="BraTS 2020")
        >>> model = create_multi_task_model(**config.get_model_params())
        >>> save_model_with_config(model, "runs/joint/best_model.safetensors", config,
        ...                        optimizer=optimizer, epoch=12, metrics={"dice": 0.88})
        PosixPath('runs/joint/best_model.safetensors')
    """
    return save(model, checkpoint_path, config=config, optimizer=optimizer, epoch=epoch, metrics=metrics,
                scheduler=scheduler, scaler=scaler, overwrite=overwrite, max_shard_size=max_shard_size)


def save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    global_step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Path:
    """Save a model of a registered architecture: the short form of `save_model_with_config`.

    Args:
        fields: the config's descriptive and inference fields (description, trained_on,
            class_names, normalization, seg_threshold, ...), added to the arguments the model
            was built with (or to `config`).
        state_dict: the tensors to write in place of `model.state_dict()`: a sharded model's
            full state dict, gathered by `ckptfmt.distributed.save`, or a snapshot taken by
            `ckptfmt.async_save`.
        global_step: the optimizer steps taken, kept in the training record beside `epoch`.
        extra: other training state to keep in the companion beside the optimizer's (JSON
            values and tensors, as `optimizer` takes): a trainer's loop counters, its
            callbacks' state; `read_training_state(companion)["extra"]` gives it back.

    Example:
        >>> model = MLP(width=64)                        # a class under @register_model("mlp")
        >>> ckptfmt.save(model, "mlp.safetensors", description="baseline", epoch=3)
        PosixPath('mlp.safetensors')
    """
    path = safetensors_path(path, stacklevel=4)
    config = _config_to_save(model, config, fields, path)
    state_dict = dict(state_dict) if state_dict is not None else unwrap_model(model).state_dict()
    shard_size = parse_size(max_shard_size) if max_shard_size is not None else None
    if shard_size is not None and sum(t.numel() * t.element_size() for t in state_dict.values()) > shard_size:
        path = path.with_name(path.name + ".index.json")
    check_shapes(
        config, {n: tuple(t.shape) for n, t in state_dict.items()},
        dtypes={n: DTYPE_NAMES.get(t.dtype, str(t.dtype)) for n, t in state_dict.items()}, path=path,
    )
    companion = companion_for(path)
    states = {name: state for name, state in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler),
                                              ("extra", extra)) if state is not None}
    if is_index(path):
        check_shard_names(path)
    check_writable(path, overwrite=overwrite)
    if states:
        check_writable(companion, overwrite=overwrite)
    check_sidecar_accepts(path, config, overwrite=overwrite)

    training = training_record(epoch, metrics, global_step=global_step, path=path)
    # One transaction: the companion, the weights (or shards and index) and the sidecar that
    # binds them take their names together, so a kill or a full disk at any point leaves the
    # previous save whole.
    with Transaction(path.parent, path.name) as transaction:
        if states:
            training["optimizer"] = write_training_state(companion, states, overwrite=overwrite,
                                                         transaction=transaction)
        metadata = build_metadata(config, training=training, provenance=provenance_record())
        if is_index(path):
            digest = write_sharded(path, state_dict, metadata, max_shard_size=shard_size, overwrite=overwrite,
                                   transaction=transaction)
        else:
            digest = write_safetensors(path, state_dict, metadata, overwrite=overwrite, transaction=transaction)
        write_sidecar(path.parent, config, path.name, digest, overwrite=overwrite, transaction=transaction)
    return path


def safetensors_path(path: str | os.PathLike, *, stacklevel: int = 2) -> Path:
    """The path a checkpoint is written to: `path`, or a `.pth` (any other suffix) name as
    `.safetensors`, with a CkptfmtWarning naming it, issued `stacklevel` frames up.

    Example:
        >>> safetensors_path("runs/best_model.pth")          # warns: writing runs/best_model.safetensors
        PosixPath('runs/best_model.safetensors')
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    real = path.with_suffix(".safetensors")
    warnings.warn(f"{path}: checkpoints are written as safetensors, not pickled; writing {real}",
                  CkptfmtWarning, stacklevel=stacklevel)
    return real


def _config_to_save(model: torch.nn.Module, config: ModelConfig | None, fields: dict[str, Any], path: Path) -> ModelConfig:
    """The config to write: the one given (checked against how the model was built, when that
    is known), else the one the model's recorded arguments make."""
    try:
        if config is None:
            return ModelConfig.from_model(model, **fields)
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"config must be a ModelConfig, not {type(config).__name__}")
        config = config.checked()
        if fields:
            config = config.replace(**fields)
        try:
            built = ModelConfig.from_model(model)
        except UnregisteredModelError:
            return config  # built some other way: the shape check is all there is to go on
        if built.model_type != config.model_type:
            raise ConfigError(
                f"the config is for model_type {config.model_type!r} but the model was built as "
                f"{built.model_type!r}", fix="save without config= to record the model as built",
            )
        differing = sorted(
            name for name in {*built.params, *config.params} if built.params.get(name) != config.params.get(name)
        )
        if differing:
            shown = "; ".join(
                f"{name}: config {config.params.get(name)!r}, model {built.params.get(name)!r}" for name in differing
            )
            raise ConfigError(
                f"the config disagrees with the arguments the model was built with ({shown})",
                fix="save without config= to record the model as built, or build the model from the config",
            )
        return config
    except ConfigError as exc:
        raise exc.at(path) from None


# -- loading --------------------------------------------------------------------------------


def open_checkpoint(
    path: str | os.PathLike, *, overrides: Mapping[str, Any] | None = None, unsafe_pickle: bool = False,
    builder: Callable[..., torch.nn.Module] | None = None,
) -> Resolution:
    """A checkpoint resolved (see `resolve`) up to, but not including, allocating the model; its
    warnings issued.

    With a `builder`, a file without a config is opened as it is (weights only): the builder
    says what the model is, and its shapes are checked when it is built.
    """
    resolution = resolve(read_source(path, unsafe_pickle=unsafe_pickle), overrides=overrides,
                         identify=builder is None, check=builder is None)
    path = resolution.path
    for warning in resolution.warnings:
        warnings.warn(warning, stacklevel=3)
    if resolution.header is not None:
        resolution.header.training(), resolution.header.provenance()  # their schemas, as inspect and verify check them
    config = resolution.config
    if config is None and builder is None:
        reason = resolution.unresolved.message_words.apply(lambda text: text[0].lower() + text[1:])
        raise resolution.unresolved.at(
            path, problem="has no config (weights only), and " + reason + ".", fix=WEIGHTS_ONLY_FIX,
        ) from None
    if resolution.origin == "inferred":
        warnings.warn(CkptfmtWarning(
            "no config embedded and no model_config.json beside it; architecture inferred from the weights: "
            f"{config.summary()}. Convert it (`ckptfmt convert`) to record it", path=path), stacklevel=3)
    elif config is not None:
        logger.info("Loaded model config from: %s", sidecar_path(path) if resolution.origin == "sidecar"
                    else f"{path} ({resolution.origin})")
    return resolution


def _metadata(resolution: Resolution) -> dict[str, Any]:
    """What `load_model_with_config` reports of where the weights come from."""
    if resolution.header is None:
        legacy = resolution.legacy
        return {"format": "legacy", "serialization": legacy.serialization, "source_sha256": legacy.sha256}
    header = resolution.header
    return {"format_version": header.format_version, "weights_sha256": header.weights_sha256,
            "provenance": header.provenance()}


def resolve_device(device: str | torch.device, path: str | os.PathLike | None) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"invalid device {device!r}: {exc}", path=path) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but CUDA is not available here", path=path,
                          fix=Words("use device='cpu'", "use --device cpu"))
    return device


def resolve_dtype(dtype: str | torch.dtype | None, path: str | os.PathLike | None = None) -> torch.dtype | None:
    """A torch floating-point dtype from itself or one of its usual names ("fp16", "bf16", ...)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(
        f"dtype must be a floating-point torch.dtype or one of {', '.join(_DTYPES)}, not {dtype!r}", path=path
    )


def _build(
    opened: Resolution, *, device: str | torch.device, dtype: torch.dtype | str | None, strict: bool,
    builder: Callable[..., torch.nn.Module] | None = None, verify: bool = False,
) -> torch.nn.Module:
    device = resolve_device(device, opened.path)
    dtype = resolve_dtype(dtype, opened.path)
    if opened.config is not None:
        logger.info("Using architecture: %s", opened.config.summary())
    if builder is not None:
        model = _build_with(builder, opened, strict=strict)
    else:
        model = get_model_entry(opened.config.model_type).build_on_meta(opened.config.params)
    if opened.config is not None:
        remember_file_config(model, opened.config)  # the model is what its file's config describes
    if verify and opened.header is not None:
        verify_read(opened.header, [name for name in model.state_dict() if name in opened.source.shapes])
    state_dict = opened.source.tensors(device)
    if opened.header is not None:
        state_dict = collections.OrderedDict(state_dict)
        # A safetensors file keeps no state-dict versions (torch's `_metadata`); its tensors are
        # those that this code's modules gave, so each module is told its own (torchvision's
        # MNASNet refuses a state without one).
        state_dict._metadata = {name: {"version": module._version} for name, module in model.named_modules()}
    try:
        model.load_state_dict(state_dict, strict=strict, assign=True)
    except Exception as exc:  # the architecture's own loading code, beyond the shapes checked above
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"{opened.config.model_type if opened.config else 'the model'} did not take the file's weights "
            f"({type(exc).__name__}: {first_line})",
            path=opened.path,
        ) from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ShapeMismatchError(
            f"the file has no values for {', '.join(left[:5])}; load with strict=True to see why",
            path=opened.path,
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _build_with(builder: Callable[..., torch.nn.Module], opened: Resolution, *, strict: bool) -> torch.nn.Module:
    """The model a user's builder makes (from the config's arguments, or from nothing for a
    weights-only file), on the meta device where it can be, checked against the file (not
    strict: its tensors that the file holds, a part of the file taken)."""
    kwargs = opened.config.get_model_params() if opened.config is not None else {}
    try:
        with torch.device("meta"):
            model = builder(**kwargs)
    except (NotImplementedError, RuntimeError):
        model = builder(**kwargs)  # a builder that computes on its tensors: built for real
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"the builder returned a {type(model).__name__}, not a torch.nn.Module", path=opened.path)
    problems = check_state(module_state(model), opened.source.shapes, opened.source.dtypes(), strict=strict)
    if problems:
        more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ShapeMismatchError(
            f"the builder's model does not fit the file: it expects {problems[0]}{more}", path=opened.path
        )
    return model


def load_model(
    checkpoint_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    verify: bool = False,
    unsafe_pickle: bool = False,
    builder: Callable[..., torch.nn.Module] | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """Rebuild a model from its checkpoint alone, in eval mode.

    Args:
        checkpoint_path: a .safetensors written by ckptfmt (or a legacy .pth: its config comes
            from the sidecar beside it, else from the weights, with a CkptfmtWarning).
        device: where the weights go; on the CPU they are memory-mapped, not copied.
        dtype: cast floating-point weights after loading: a torch.dtype or "fp16", "bf16",
            "fp32", ...
        strict: every tensor must match, as in `load_state_dict`; without it, a `builder`'s
            model may take part of the file (a backbone out of a whole network).
        verify: check the weights against their digests first (off by default so that loading
            stays a memory map): the whole file's, or, when the model takes part of the file
            (`strict=False`, a `builder`'s smaller model), the tensors it takes against their
            own digests (format 3), so that only what is loaded is read.
        unsafe_pickle: for a legacy .pth only; allow arbitrary pickles (runs code from the file).
        builder: build the model with this instead of the registered architecture: called with
            the config's arguments, or with none for a file that has no config (weights only).
            Its model is checked against the file's shapes before anything is loaded.
        **overrides: config fields to change; checked against the weights before loading.

    Raises:
        ShapeMismatchError: the config (with overrides) does not fit the weights.
        UnknownModelTypeError: the file's architecture is not registered in this process; the
            message says what to import or install.

    Example:
        >>> model = load_model("converted/multitask_joint/best_model.safetensors")
        >>> seg_logits, cls_logits = model(torch.zeros(1, 1, 64, 64))
        >>> model = load_model("weights_only.safetensors", builder=lambda: MyNet(width=64))
    """
    opened = open_checkpoint(checkpoint_path, overrides=overrides, unsafe_pickle=unsafe_pickle, builder=builder)
    return _build(opened, device=device, dtype=dtype, strict=strict, verify=verify, builder=builder)


def load_model_with_config(
    checkpoint_path: str | os.PathLike,
    model_factory_fn: Callable[..., torch.nn.Module] | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[torch.nn.Module, ModelConfig | None, dict[str, Any]]:
    """The seed's loader: `(model, config, checkpoint)`, where `checkpoint` has no tensors.

    Args:
        checkpoint_path: a .safetensors or a legacy .pth (see `load_model`).
        model_factory_fn: builds the model, called with `config.get_model_params()` (or with
            nothing for a weights-only file); defaults to the architecture registered under the
            config's model_type. Its model is checked against the file's shapes.
        device: where the weights go.
        **overrides: config fields to change; checked against the weights before loading.

    Returns:
        The model (eval mode), its ModelConfig (None for a weights-only file), and a dict with
        `epoch`, `metrics`, `training`, `config_source` and `metadata`.

    Example:
        >>> model, config, checkpoint = load_model_with_config(
        ...     "converted/multitask_joint/best_model.safetensors",
        ...     model_factory_fn=create_multi_task_model, device="cpu")
        >>> checkpoint["epoch"]
        3
    """
    opened = open_checkpoint(checkpoint_path, overrides=overrides, builder=model_factory_fn)
    model = _build(opened, device=device, dtype=None, strict=True, builder=model_factory_fn)
    training = opened.source.training
    checkpoint = {
        "epoch": training.get("epoch"),
        "metrics": training.get("metrics", {}),
        "training": training,
        "config_source": opened.origin and opened.origin + ("+overrides" if opened.overridden else ""),
        "metadata": _metadata(opened),
    }
    return model, opened.config, checkpoint
