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

Errors are data. Each carries the path it is about and, where there is one, the fix, held as a
`Fix` in both spellings: Python's arguments (`overwrite=True`, `model_type='timm'`) and the
command line's options (`--force`, `--model-type timm`). `str(error)` says it in Python's words;
the CLI asks `error.describe(cli=True)`. Nothing reads a message's text to learn what happened:
the class and its fields say it, and re-raising keeps both (`error.at(path)`).
"""

from __future__ import annotations

import copy as copy_module
import os
from dataclasses import dataclass

__all__ = [
    "Fix",
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


@dataclass(frozen=True)
class Fix:
    """What the user can do about an error, in the words of each place it reaches them.

    Example:
        >>> Fix("pass overwrite=True to replace it", "pass --force to replace it")
    """

    python: str
    cli: str

    def __str__(self) -> str:
        return self.python


class CkptfmtError(Exception):
    """Base of every ckptfmt error.

    Args:
        message: what is wrong, and where (a key, a tensor, an argument).
        path: the file the error is about (or None).
        fix: what to do about it, said after the message (`"; "` between them); a plain
            string where the fix names no argument or option.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, fix: Fix | str | None = None):
        self.problem = message
        self.fix = Fix(fix, fix) if isinstance(fix, str) else fix
        self.path = os.fspath(path) if path is not None else None
        super().__init__(self.describe())

    @property
    def message(self) -> str:
        """The problem and its fix, in Python's words, without the path."""
        return self._joined(cli=False)

    def _joined(self, *, cli: bool) -> str:
        if self.fix is None:
            return self.problem
        return f"{self.problem}; {self.fix.cli if cli else self.fix.python}"

    def describe(self, *, cli: bool = False) -> str:
        """The whole message, the path first; with `cli`, the fix in the command line's options."""
        text = self._joined(cli=cli)
        return f"{self.path}: {text}" if self.path else text

    def at(self, path: str | os.PathLike | None = None, *, problem: str | None = None) -> "CkptfmtError":
        """This error, of the same class and with the same fields, about `path` (and, given
        `problem`, said with that text): for re-raising where the path is known."""
        copy = copy_module.copy(self)
        if path is not None:
            copy.path = os.fspath(path)
        if problem is not None:
            copy.problem = problem
        copy.args = (copy.describe(),)
        copy.__traceback__ = None
        return copy

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

    def __init__(self, message: str, *, path=None, fix: Fix | str | None = None, candidates: list | None = None):
        self.candidates = candidates or []
        super().__init__(message, path=path, fix=fix)


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
