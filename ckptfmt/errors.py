"""The one exception tree of ckptfmt.

Every error carries the path it is about, and its message says what is wrong, where, and
what to do. Classes also inherit the matching builtin, so callers may catch either::

    CkptfmtError(Exception)
    ├── CheckpointNotFoundError(FileNotFoundError)   no file at the path
    ├── OutputExistsError(FileExistsError)           would overwrite; pass overwrite=True
    ├── WriteError(OSError)                          disk full, read-only folder, ...
    ├── HeaderError(ValueError)                      malformed .safetensors header or metadata
    ├── ConfigError(ValueError)                      invalid config: value, unknown key, schema
    │   ├── UnknownModelTypeError(LookupError)       model_type not registered
    │   └── UnregisteredModelError                   a model no registered architecture built
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

Errors are data. Each carries the path it is about, the problem and, where there is one, the
fix. A text that names an argument is held as `Words` in both spellings: Python's arguments
(`overwrite=True`, `model_type='timm'`) and the command line's options (`--force`,
`--model-type timm`). `str(error)` says it in Python's words; the CLI asks
`error.describe(cli=True)`. Nothing reads a message's text to learn what happened:
the class and its fields say it, and re-raising keeps both (`error.at(path)`).
"""

from __future__ import annotations

import copy as copy_module
import json
import os
import shlex
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
    "UnregisteredModelError",
    "UnsafePickleError",
    "Words",
    "WriteError",
]


class Words(str):
    """A text that names what the user can pass, in the words of each place it reaches them: as
    a string it is Python's words; `.cli` is the command line's.

    Example:
        >>> fix = Words("pass overwrite=True to replace it", "pass --force to replace it")
        >>> str(fix), fix.cli
        ('pass overwrite=True to replace it', 'pass --force to replace it')
    """

    cli: str

    def __new__(cls, python: str, cli: str | None = None) -> "Words":
        words = super().__new__(cls, python)
        words.cli = str(python) if cli is None else str(cli)
        return words

    @property
    def python(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Words({self.python!r}, {self.cli!r})"

    def __reduce__(self):
        return Words, (self.python, self.cli)

    # Joined with plain text, both spellings get it: "override rejected: " + error.problem.
    # (Python asks a str subclass's __radd__ before str's own __add__.)
    def __add__(self, other: str) -> "Words":
        return Words(self.python + str(other), self.cli + getattr(other, "cli", str(other)))

    def __radd__(self, other: str) -> "Words":
        return Words(str(other) + self.python, getattr(other, "cli", str(other)) + self.cli)

    def apply(self, change: Callable[[str], str]) -> "Words":
        """Both spellings changed alike (`words.apply(lambda s: s[0].lower() + s[1:])`)."""
        return Words(change(self.python), change(self.cli))

    @staticmethod
    def joined(separator: str, parts: Iterable[str]) -> "Words":
        """`separator.join(parts)`, keeping the parts' command-line spellings."""
        parts = [part if isinstance(part, Words) else Words(part) for part in parts]
        return Words(separator.join(p.python for p in parts), separator.join(p.cli for p in parts))


# The fix of every refusal to replace what is there: `overwrite=` in the library, `--force` in
# each command that writes.
OVERWRITE_FIX = Words("pass overwrite=True to replace it", "pass --force to replace it")


def cli_value(value: Any) -> str:
    """A value as `--set` and the other options read it: a plain word as itself, anything else
    as JSON, quoted for the shell."""
    if isinstance(value, str) and value.replace("-", "_").replace(".", "_").isidentifier():
        return value
    return shlex.quote(value if isinstance(value, str) else json.dumps(value))


def overrides_words(overrides: Mapping[str, Any]) -> Words:
    """`overrides={...}` as Python passes it, and as the `--set KEY=VALUE` options that say it."""
    return Words(f"overrides={dict(overrides)!r}",
                 " ".join(f"--set {name}={cli_value(value)}" for name, value in overrides.items()) or "--set")


class CkptfmtError(Exception):
    """Base of every ckptfmt error.

    Args:
        message: what is wrong, and where (a key, a tensor, an argument).
        path: the file the error is about (or None).
        fix: what to do about it, said after the message (`"; "` between them).

    `message` and `fix` are plain strings, or `Words` where they name an argument.
    """

    def __init__(self, message: str | Words, *, path: str | os.PathLike | None = None,
                 fix: str | Words | None = None):
        self.problem = message if isinstance(message, Words) else Words(message)
        self.fix = fix if fix is None or isinstance(fix, Words) else Words(fix)
        self.path = os.fspath(path) if path is not None else None
        super().__init__(self.describe())

    @property
    def message(self) -> str:
        """The problem and its fix, in Python's words, without the path."""
        return self._joined(cli=False)

    @property
    def message_words(self) -> Words:
        """The problem and its fix in both spellings, without the path: to quote it in another."""
        return Words(self._joined(cli=False), self._joined(cli=True))

    def _joined(self, *, cli: bool) -> str:
        problem = self.problem.cli if cli else self.problem.python
        if self.fix is None:
            return problem
        # A problem said as a whole sentence is followed by its fix as a sentence of its own.
        return f"{problem}{' ' if problem.endswith('.') else '; '}{self.fix.cli if cli else self.fix.python}"

    def describe(self, *, cli: bool = False) -> str:
        """The whole message, the path first; with `cli`, the fix in the command line's options."""
        text = self._joined(cli=cli)
        return f"{self.path}: {text}" if self.path else text

    def at(self, path: str | os.PathLike | None = None, *, problem: str | Words | None = None,
           fix: str | Words | None = None) -> "CkptfmtError":
        """This error, of the same class and with the same fields, about `path` (and, given
        `problem` or `fix`, said with those): for re-raising where more is known."""
        copy = copy_module.copy(self)
        if path is not None:
            copy.path = os.fspath(path)
        if problem is not None:
            copy.problem = problem if isinstance(problem, Words) else Words(problem)
        if fix is not None:
            copy.fix = fix if isinstance(fix, Words) else Words(fix)
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


class UnregisteredModelError(ConfigError):
    """A model whose arguments nothing recorded: its class is not a registered architecture.
    `model_class` is its class's name."""

    def __init__(self, message: str | Words, *, path=None, fix: str | Words | None = None, model_class: str = ""):
        self.model_class = model_class
        super().__init__(message, path=path, fix=fix)


class ShapeMismatchError(CkptfmtError, ValueError):
    pass


class ArchitectureNotRecognisedError(CkptfmtError, ValueError):
    pass


class AmbiguousArchitectureError(ArchitectureNotRecognisedError):
    """`candidates`: the configs (as dicts) that fit the weights equally well."""

    def __init__(self, message: str, *, path=None, fix: str | Words | None = None, candidates: list | None = None):
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
    """Something the user should act on, though the operation went ahead. Issued as
    `warnings.warn(CkptfmtWarning(message, path=..., fix=...))`, it carries its parts as an
    error does (`describe(cli=True)`); issued with a plain string, it is that string."""

    def __init__(self, message: str | Words = "", *, path: str | os.PathLike | None = None,
                 fix: str | Words | None = None):
        self.problem = message if isinstance(message, Words) else Words(message)
        self.fix = fix if fix is None or isinstance(fix, Words) else Words(fix)
        self.path = os.fspath(path) if path is not None else None
        super().__init__(self.describe())

    message = CkptfmtError.message
    message_words = CkptfmtError.message_words
    _joined = CkptfmtError._joined
    describe = CkptfmtError.describe

    def __str__(self) -> str:
        return self.args[0]


class MissingDependencyError(CkptfmtError, ImportError):
    pass
