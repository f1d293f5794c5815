"""The one exception tree of ckptfmt.

Every error carries the path it is about, and its message says what is wrong, where, and
what to do. Classes also inherit the matching builtin, so callers may catch either::

    CkptfmtError(Exception)
    ├── CheckpointNotFoundError(FileNotFoundError)   no file at the path
    ├── OutputExistsError(FileExistsError)           would overwrite; pass overwrite=True
    ├── WriteError(OSError)                          disk full, read-only folder, ...
    ├── HeaderError(ValueError)                      malformed .safetensors header or metadata
    ├── ConfigError(ValueError)                      invalid config: value, unknown key, schema
    │   └── UnknownModelTypeError(LookupError)       model_type not registered
    ├── ShapeMismatchError(ValueError)               config disagrees with the tensor shapes
    ├── ArchitectureNotRecognisedError(ValueError)   no architecture recognises these weights
    │   └── AmbiguousArchitectureError               several do, and a probe cannot tell them apart
    ├── LegacyCheckpointError(ValueError)            unreadable or corrupt .pth
    │   └── UnsafePickleError                        the pickle needs a global that can run code
    ├── IntegrityError(ValueError)                   digest or sidecar disagrees with the weights
    ├── InputError(ValueError)                       an input image the predictor cannot read
    ├── DeviceError(RuntimeError)                    device or precision not available
    ├── PluginError(RuntimeError)                    a registered architecture's own code failed
    └── MissingDependencyError(ImportError)          an architecture's optional library is not installed

Warnings that ask the user to act (a config inferred from the weights, a sidecar that disagrees,
a `.pth` name written as `.safetensors`) are `CkptfmtWarning`s, issued with `warnings.warn`.
"""

from __future__ import annotations

import os

__all__ = [
    "AmbiguousArchitectureError",
    "ArchitectureNotRecognisedError",
    "CheckpointNotFoundError",
    "CkptfmtError",
    "CkptfmtWarning",
    "ConfigError",
    "DeviceError",
    "HeaderError",
    "InputError",
    "IntegrityError",
    "LegacyCheckpointError",
    "MissingDependencyError",
    "OutputExistsError",
    "PluginError",
    "ShapeMismatchError",
    "UnknownModelTypeError",
    "UnsafePickleError",
    "WriteError",
]


class CkptfmtError(Exception):
    """Base of every ckptfmt error. `path` is the file the error is about (or None)."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)

    # The builtins we also inherit (OSError in particular) define their own __str__.
    def __str__(self) -> str:
        return self.args[0]


class CheckpointNotFoundError(CkptfmtError, FileNotFoundError):
    pass


class OutputExistsError(CkptfmtError, FileExistsError):
    pass


class WriteError(CkptfmtError, OSError):
    pass


class HeaderError(CkptfmtError, ValueError):
    pass


class ConfigError(CkptfmtError, ValueError):
    pass


class UnknownModelTypeError(ConfigError, LookupError):
    pass


class ShapeMismatchError(CkptfmtError, ValueError):
    pass


class ArchitectureNotRecognisedError(CkptfmtError, ValueError):
    pass


class AmbiguousArchitectureError(ArchitectureNotRecognisedError):
    """`candidates`: the configs (as dicts) that fit the weights equally well."""

    def __init__(self, message: str, *, path=None, candidates: list | None = None):
        super().__init__(message, path=path)
        self.candidates = candidates or []


class LegacyCheckpointError(CkptfmtError, ValueError):
    pass


class UnsafePickleError(LegacyCheckpointError):
    pass


class IntegrityError(CkptfmtError, ValueError):
    pass


class InputError(CkptfmtError, ValueError):
    pass


class DeviceError(CkptfmtError, RuntimeError):
    pass


class PluginError(CkptfmtError, RuntimeError):
    pass


class CkptfmtWarning(UserWarning):
    """Something the user should act on, though the operation went ahead."""


class MissingDependencyError(CkptfmtError, ImportError):
    pass
