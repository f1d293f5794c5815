"""JSON that crosses the file boundary: one set of rules, for reading and for writing.

Configs, training records, provenance and the optimizer's structure travel as JSON inside
files that may be hostile. The reader refuses what Python's json module lets through (duplicate
keys, NaN and Infinity, integers of thousands of digits, deep nesting); the writer applies the
same rules to what it is about to write, so that nothing is written that the reader, and
`verify`, would then refuse. Standard library only.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import re
import types
from typing import Any

from ..errors import CkptfmtError, ConfigError, HeaderError

__all__ = [
    "MAX_DEPTH", "MAX_INT_DIGITS", "describe", "dumps_strict", "has_surrogate", "loads_strict", "plain_json", "shown_text",
]

MAX_DEPTH = 32
# 2**63 has 19 digits; anything longer is not a tensor size, a count or an epoch.
MAX_INT_DIGITS = 19


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a surrogate code point, and so is not valid Unicode (one that came
    from a lone `\\udc80` escape, or from a file name Python read with surrogateescape).

    Python's json writes such a string as a "\\udc80" escape and reads it back, but safetensors
    (Rust's serde_json) and every strict reader refuse it. Even a high and a low one side by side
    are two code points in a str, not the one character they encode in UTF-16, so any is refused.
    """
    if text.isascii():  # O(1) in CPython
        return False
    try:
        text.encode("utf-8")  # UTF-8 cannot encode a surrogate; a C-speed scan, faster than a regex
    except UnicodeEncodeError:
        return True
    return False


def shown_text(text: str, limit: int = 60) -> str:
    """`text` quoted for a message, cut short when long."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def loads_strict(
    text: str, *, what: str, path: str | os.PathLike | None = None, error: type[CkptfmtError] = HeaderError,
) -> Any:
    """Parse JSON from an untrusted file, refusing what the json module lets through.

    Refused: a byte-order mark, duplicate keys, NaN and Infinity (also by overflow, as 1e999),
    integers of more than 19 digits, nesting deeper than 32, and strings that are not valid
    Unicode (a lone surrogate, as the escape "\\udc80" gives).

    Example:
        >>> loads_strict('{"depth": 4}', what="config")
        {'depth': 4}
    """
    # Nearly every document breaks no rule, so the C parser reads it unhooked and the rules are
    # checked on the result and on the text between its strings, at C speed: a header of
    # thousands of tensors is read in well under a millisecond. Only a document that may break
    # one is parsed again, hooked, to name what is wrong. A 100,000-deep nesting stops the C
    # parser at the recursion limit.
    if text.startswith("\ufeff"):
        raise error(f"{what} starts with a byte-order mark; save it as plain UTF-8", path=path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}", path=path) from None
    except RecursionError:
        raise error(f"{what} nests deeper than {MAX_DEPTH} levels", path=path) from None
    except ValueError:  # an integer past Python's int-from-text limit; the hooked parse names it
        pass
    else:
        if _keeps_the_rules(text, value):
            return value
    return _loads_hooked(text, what, path, error)


def _loads_hooked(text: str, what: str, path, error: type[CkptfmtError]) -> Any:
    """`loads_strict`'s rules applied as the parser goes, each break named: exact, and slower."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result:
                raise error(f"{what} has the key {key!r} twice", path=path)
            result[key] = value
        return result

    def constant(name: str) -> float:
        raise error(f"{what} contains {name}, which is not valid JSON", path=path)

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise error(
                f"{what} contains a {len(digits)}-digit integer; at most {MAX_INT_DIGITS} allowed",
                path=path,
            )
        return int(digits)

    def real(digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            raise error(f"{what} contains {digits}, which overflows to infinity", path=path)
        return value

    if _depth(text) > MAX_DEPTH:  # before the parser recurses into it
        raise error(f"{what} nests deeper than {MAX_DEPTH} levels", path=path)
    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_float=real, parse_int=integer)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}", path=path) from None
    # The json module has no hook for strings; the value is at most MAX_DEPTH deep by now.
    bad = _surrogate_string(value)
    if bad is not None:
        raise error(
            f"{what} holds the string {shown_text(bad)}, which is not valid Unicode (a lone surrogate); "
            "safetensors and other strict JSON readers refuse it",
            path=path,
        )
    return value


def _surrogate_string(value: Any) -> str | None:
    """The first string in `value` (a key or a value) that holds a surrogate, or None."""
    if type(value) is str:
        return value if has_surrogate(value) else None
    if type(value) is dict:
        for key, item in value.items():
            if has_surrogate(key):
                return key
            if (found := _surrogate_string(item)) is not None:
                return found
    elif type(value) is list:
        for item in value:
            if (found := _surrogate_string(item)) is not None:
                return found
    return None


def _keeps_the_rules(text: str, value: Any) -> bool:
    """Whether `value`, parsed from `text` by the json module, breaks none of the rules that
    `loads_strict` adds: a quick and certain yes, or no when unsure."""
    # In valid JSON a backslash occurs only in strings, as the first of an escape pair; left to
    # right, escaped backslashes go first, then escaped quotes, and the quotes left delimit.
    unescaped = text.replace("\\\\", "").replace('\\"', "") if "\\" in text else text
    between_strings = "".join(unescaped.split('"')[0::2])
    if "N" in between_strings or "I" in between_strings or _LONG_DIGITS.search(between_strings):
        return False  # NaN or Infinity (no other literal has a capital), or a long integer
    if "E" in between_strings or between_strings.count("e") != between_strings.count("true") + between_strings.count("false"):
        return False  # an exponent, as in 1e999, which overflows; without one, 19 digits stay finite
    keys = 0  # every key the parser kept; fewer than the text's colons means a duplicate
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(MAX_DEPTH):
        below = []
        for item in level:
            if type(item) is dict:
                keys += len(item)
                item = item.values()
            for inner in item:
                if type(inner) in _CONTAINERS:
                    below.append(inner)
        if not below:
            if keys != between_strings.count(":"):
                return False
            # Last, once the depth is known to be small: a string that is not valid Unicode. A
            # surrogate pair escape ("\\ud83d\\ude00", one emoji) is read as one character, and fine.
            if has_surrogate(text):
                return False
            return not (_SURROGATE_ESCAPE.search(text) and has_surrogate(json.dumps(value, ensure_ascii=False)))
        level = below
    return False  # deeper than MAX_DEPTH


_CONTAINERS = (dict, list)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_LONG_DIGITS = re.compile("[0-9]{%d}" % (MAX_INT_DIGITS + 1))  # JSON's digits are ASCII
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# Besides a raw one, a surrogate reaches a parsed string only from a \\uD800-\\uDFFF escape. Not
# every such escape leaves one (a pair is one character; an escaped backslash may come before
# "ud8.."), so the value settles it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _depth(text: str) -> int:
    """How deeply the JSON in `text` nests: its brackets outside strings, counted."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def plain_json(
    value: Any, *, what: str, path: str | os.PathLike | None = None, error: type[CkptfmtError] = ConfigError,
) -> Any:
    """`value` as plain JSON data that `loads_strict` will read back equal, or `error` naming
    the place that breaks a rule.

    Tuples become lists, and number types that are not Python's own (numpy's, say) become int or
    float. A class, a function, a module, a tensor or any other object is refused, named.

    Example:
        >>> plain_json({"channels": (8, 16)}, what="argument 'x'")
        {'channels': [8, 16]}
    """
    return _plain(value, what, 0, path, error)


def _plain(value: Any, where: str, depth: int, path, error) -> Any:
    if isinstance(value, str):
        if has_surrogate(value):
            raise error(f"{where} is the string {shown_text(value)}, which is not valid Unicode (a lone surrogate); "
                        "JSON cannot hold it for safetensors and other strict readers", path=path)
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        value = int(value)
        if len(str(abs(value))) > MAX_INT_DIGITS:
            raise error(f"{where} is a {len(str(abs(value)))}-digit integer; at most {MAX_INT_DIGITS} digits are allowed", path=path)
        return value
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise error(f"{where} is {value!r}, which JSON cannot hold", path=path)
        return value
    if isinstance(value, (list, tuple, dict)) and depth >= MAX_DEPTH:
        raise error(f"{where} nests deeper than {MAX_DEPTH} levels", path=path)
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]", depth + 1, path, error) for index, item in enumerate(value)]
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{where} has the key {key!r} ({type(key).__name__}); JSON keys are strings", path=path)
            if has_surrogate(key):
                raise error(f"{where} has the key {shown_text(key)}, which is not valid Unicode (a lone surrogate); "
                            "JSON cannot hold it for safetensors and other strict readers", path=path)
            result[key] = _plain(item, f"{where}[{key!r}]", depth + 1, path, error)
        return result
    raise error(
        f"{where} is {describe(value)}, which cannot be written as JSON (numbers, strings, booleans, "
        "None, and lists and dicts of those)",
        path=path,
    )


def describe(value: Any) -> str:
    """A short, safe description of an object for an error message."""
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    if isinstance(value, types.ModuleType):
        return f"the module {value.__name__}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"the function {getattr(value, '__module__', '?')}.{value.__qualname__}"
    return f"a {type(value).__module__}.{type(value).__qualname__}".replace("a builtins.", "a ")


def dumps_strict(
    value: Any, *, what: str, path: str | os.PathLike | None = None, error: type[CkptfmtError] = ConfigError,
) -> str:
    """`value` as compact JSON with sorted keys, after `plain_json`'s checks."""
    return json.dumps(plain_json(value, what=what, path=path, error=error), sort_keys=True, allow_nan=False)
