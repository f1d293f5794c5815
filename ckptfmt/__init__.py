"""ckptfmt: self-describing PyTorch checkpoints.

One .safetensors file carries the weights and, in its header, the architecture config, the
training record, provenance and a digest of the weights; `load_model(path)` rebuilds the model
from the file alone.

Names are imported on first use, so `import ckptfmt` and the torch-free parts (ModelConfig,
read_header, inspect of a .safetensors) never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "ModelConfig": "config.model_config",
    "read_sidecar": "config.sidecar",
    "read_header": "format.header",
    "register_model": "config.registry",
    "registered_model_types": "config.registry",
    "save": "checkpoint",
    "async_save": "saving_async",
    "CheckpointManager": "manager",
    "save_model_with_config": "checkpoint",
    "load_model": "checkpoint",
    "load_model_with_config": "checkpoint",
    "load_training_state": "format.companion",
    "infer_model_config": "sources.identify",
    "identify": "sources.identify",
    "AmbiguousArchitectureError": "errors",
    "Task": "config.registry",
    "weights_digest": "format.writer",
    "read_state_dict": "format.writer",
    "convert": "converter",
    "convert_all": "converter",
    "ConvertResult": "converter",
    "inspect_checkpoint": "inspect",
    "verify": "verifier",
    "diff": "compare",
    "MultiTaskPredictor": "predict",
    "Predictor": "predict",
    "CkptfmtError": "errors",
    "CkptfmtWarning": "errors",
    "CheckpointNotFoundError": "errors",
    "OutputExistsError": "errors",
    "WriteError": "errors",
    "HeaderError": "errors",
    "ConfigError": "errors",
    "UnknownModelTypeError": "errors",
    "ShapeMismatchError": "errors",
    "ArchitectureNotRecognisedError": "errors",
    "LegacyCheckpointError": "errors",
    "UnsafePickleError": "errors",
    "IntegrityError": "errors",
    "InputError": "errors",
    "DeviceError": "errors",
    "PluginError": "errors",
    "MissingDependencyError": "errors",
    "create_model": "config.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptfmt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from .checkpoint import load_model, load_model_with_config, save, save_model_with_config
    from .compare import diff
    from .config.model_config import ModelConfig
    from .config.registry import Task, create_model, register_model, registered_model_types
    from .config.sidecar import read_sidecar
    from .converter import ConvertResult, convert, convert_all
    from .errors import (
        AmbiguousArchitectureError,
        ArchitectureNotRecognisedError,
        CheckpointNotFoundError,
        CkptfmtError,
        CkptfmtWarning,
        ConfigError,
        DeviceError,
        HeaderError,
        InputError,
        IntegrityError,
        LegacyCheckpointError,
        MissingDependencyError,
        OutputExistsError,
        PluginError,
        ShapeMismatchError,
        UnknownModelTypeError,
        UnsafePickleError,
        WriteError,
    )
    from .format.companion import load_training_state
    from .format.header import read_header
    from .format.writer import read_state_dict, weights_digest
    from .inspect import inspect_checkpoint
    from .manager import CheckpointManager
    from .predict import MultiTaskPredictor, Predictor
    from .saving_async import async_save
    from .sources.identify import identify, infer_model_config
    from .verifier import verify
