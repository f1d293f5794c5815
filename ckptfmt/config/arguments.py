"""An architecture's arguments, checked against its builder's signature.

A config carries the constructor arguments of its architecture, and the builder's own
signature says what they may be: names come from its parameters (an unknown name is refused,
named), types from its annotations where it has them (an `int` parameter refuses 64.0 and True),
and defaults are filled in, so that a file never depends on a default that a later version of
the code might change. Every value must be plain JSON. Standard library only: the builder is
given, never imported here.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..io.jsondoc import describe, plain_json

__all__ = ["RESERVED_NAMES", "Signature"]

# The config's own fields. A builder whose parameter takes one of these names could not be told
# apart from them in a flat config, so it is refused at registration.
RESERVED_NAMES = (
    "model_type", "schema_version", "version", "description", "trained_on", "training_config",
    "task", "class_names", "normalization", "seg_threshold",
)

_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


class _NoMatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


@dataclass(frozen=True)
class Signature:
    """The named parameters of a builder (a class or a factory function), with their resolved
    annotations; `takes_any` when it also takes `**kwargs`."""

    owner: str
    parameters: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    takes_any: bool

    @classmethod
    def of(cls, builder: Callable[..., Any]) -> "Signature":
        signature = inspect.signature(builder)
        named = {
            p.name: p for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        hints = {name: _resolve(p.annotation, builder) for name, p in named.items()}
        # An annotation that cannot be resolved (a name imported only for type checkers) checks nothing.
        hints = {name: hint for name, hint in hints.items() if not isinstance(hint, str)}
        takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        return cls(getattr(builder, "__name__", repr(builder)), named, hints, takes_any)

    def reserved(self) -> list[str]:
        # `params` is no config field, but it is the attribute that holds the arguments.
        return [name for name in self.parameters if name in (*RESERVED_NAMES, "params")]

    def complete(self, params: Mapping[str, Any], *, model_type: str) -> dict[str, Any]:
        """Check `params` and fill in the defaults; returns plain JSON values, in signature
        order, then any extra names a `**kwargs` builder takes.

        Raises:
            ConfigError: an unknown name, a missing argument without a default, a value of the
                wrong type, or a value (or default) that cannot be JSON; each named.
        """
        unknown = sorted(set(params) - set(self.parameters))
        if unknown and not self.takes_any:
            known = ", ".join(self.parameters) or "none"
            raise ConfigError(
                f"{model_type!r} ({self.owner}) has no argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; its arguments: {known}"
            )
        result: dict[str, Any] = {}
        for name, parameter in self.parameters.items():
            if name in params:
                value = plain_json(params[name], what=name)
            elif parameter.default is not parameter.empty:
                try:
                    value = plain_json(parameter.default, what=name)
                except ConfigError:
                    raise ConfigError(
                        f"{model_type!r} ({self.owner}) takes {name!r} with the default "
                        f"{describe(parameter.default)}, which a config cannot hold (JSON values "
                        f"only); give {name} a JSON value, or register a factory that takes one"
                    ) from None
            else:
                raise ConfigError(
                    f"{model_type!r} ({self.owner}) needs the argument {name!r}, which the config "
                    "does not give"
                )
            hint = self.hints.get(name, inspect.Parameter.empty)
            if parameter.default is not parameter.empty and _same(value, parameter.default):
                # `extra: dict = None` is common: the builder's own default is always accepted.
                hint = inspect.Parameter.empty
            try:
                value = _conform(value, hint)
            except _NoMatch as exc:
                raise ConfigError(f"{name} must be {exc.expected}, not {_shown(value)}") from None
            result[name] = _as_json(value)
        for name in unknown:
            result[name] = plain_json(params[name], what=name)
        return result

    def build_kwargs(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The builder's keyword arguments: JSON lists become tuples where the parameter is
        annotated as a tuple or defaults to one (JSON has no tuples)."""
        kwargs = {}
        for name, value in params.items():
            parameter = self.parameters.get(name)
            wants_tuple = parameter is not None and (
                isinstance(parameter.default, tuple)
                or typing.get_origin(self.hints.get(name)) is tuple
                or self.hints.get(name) is tuple
            )
            kwargs[name] = tuple(value) if wants_tuple and isinstance(value, list) else value
        return kwargs


def _resolve(annotation: Any, builder: Callable[..., Any]) -> Any:
    """A string annotation (from `from __future__ import annotations`) evaluated in the
    builder's module, one at a time so that one unresolvable name spoils only itself."""
    if not isinstance(annotation, str):
        return annotation
    function = inspect.unwrap(builder.__init__ if isinstance(builder, type) else builder)
    namespace = getattr(function, "__globals__", {})
    try:
        return eval(annotation, dict(namespace))  # noqa: S307 - the builder's own source code
    except Exception:
        return annotation


def _conform(value: Any, hint: Any) -> Any:
    """`value` if it fits `hint` (an int given for a float becomes a float), else _NoMatch.
    Annotations this cannot read (classes, callables, type variables) accept any JSON value."""
    if hint in (inspect.Parameter.empty, Any, object):
        return value
    if hint is None or hint is type(None):
        if value is None:
            return None
        raise _NoMatch("None")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _conform(value, arg)
            except _NoMatch:
                pass
        raise _NoMatch(" or ".join(_expected(arg) for arg in args))
    if origin is typing.Literal:
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
        raise _NoMatch(_expected(hint))
    if hint is bool or hint is int or hint is str:
        if type(value) is hint:
            return value
        raise _NoMatch(_expected(hint))
    if hint is float:
        if type(value) in (int, float):
            return float(value)
        raise _NoMatch(_expected(hint))
    if hint in _SEQUENCES or origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)) or isinstance(value, str):
            raise _NoMatch(_expected(hint))
        try:
            if (hint is tuple or origin is tuple) and args and args[-1] is not Ellipsis:
                if len(args) != len(value):
                    raise _NoMatch(_expected(hint))
                return tuple(_conform(v, a) for v, a in zip(value, args))
            item = args[0] if args else Any
            return [_conform(v, item) for v in value]
        except _NoMatch:
            raise _NoMatch(_expected(hint)) from None
    if hint in _MAPPINGS or origin in _MAPPINGS:
        if not isinstance(value, dict):
            raise _NoMatch(_expected(hint))
        item = args[1] if len(args) == 2 else Any
        try:
            return {k: _conform(v, item) for k, v in value.items()}
        except _NoMatch:
            raise _NoMatch(_expected(hint)) from None
    return value


def _expected(hint: Any) -> str:
    names = {bool: "a bool", int: "an int", float: "a number", str: "a string", type(None): "None", None: "None"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(arg) for arg in args)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        if (hint is tuple or origin is tuple) and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_expected(a) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if hint in _MAPPINGS or origin in _MAPPINGS:
        return "a dict"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    text = _expected(hint)
    for article in ("an ", "a "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text


def _same(value: Any, default: Any) -> bool:
    try:
        return type(value) is type(default) and value == default or (value is None and default is None)
    except Exception:  # a default whose __eq__ does not compare with plain data
        return False


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _as_json(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value
