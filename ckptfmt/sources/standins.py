"""Inert stand-ins for the objects that training checkpoints pickle beside their tensors.

torch's weights-only unpickler builds only what its allowlist names, and training checkpoints
hold a few types beyond it: a `pathlib` path, an `argparse.Namespace` (the `args` of timm's and
many hand-written scripts), Lightning's `AttributeDict`, a `collections.defaultdict`, OmegaConf
containers, and members of the user's own `Enum`s. For these, `torch.serialization.
safe_globals` is given `(stand_in, "module.qualname")` pairs: the name read from the file maps to
a class or function of ours, so the class the file names is never imported and none of its
code runs. After loading, `thaw` turns what the stand-ins recorded into plain values and lists
each conversion, which provenance keeps.

The fixed stand-ins (`FIXED`), and what each becomes:

- `pathlib.PosixPath`, `PurePosixPath`, `WindowsPath`, `PureWindowsPath`, `Path`, `PurePath`
  (also as `pathlib._local.*`, Python 3.13's spelling): the path as a string, joined with
  `PurePosixPath`/`PureWindowsPath`, which touch no file;
- `argparse.Namespace`: a dict of its attributes;
- Lightning's `AttributeDict` (`lightning.fabric.utilities.data`, `lightning_fabric.utilities.
  data`, `pytorch_lightning.utilities.parsing`): the dict it is;
- `collections.defaultdict`: a dict of its items (the default factory is not kept);
- OmegaConf `DictConfig` and `ListConfig`: a dict or list of their content, with
  interpolations (`${...}`) and `???` kept as the strings they are, never resolved; their
  value nodes (`omegaconf.nodes.*`) become their values, and their metadata
  (`omegaconf.base.Metadata`, `ContainerMetadata`, with the `typing` and `builtins` types it
  names) is read and discarded.

A user's `Enum` cannot be listed in advance. Every other global whose top-level module is not
in the standard library gets a recorder: a class of ours that remembers how the pickle used it
and does nothing else. A recorder used the way an Enum member pickles, `REDUCE(cls, (value,))`
with one int, str, bool or finite float and nothing more, becomes that value, and provenance
records `module.Class(value) -> value`. Nothing in a pickle proves that a class is an Enum
(`Decimal("1.5")` has the same shape); what is kept is the argument, as data, never the result
of a call. Used in any other way (a whole model's NEWOBJ and BUILD, several arguments), or from
a module in `NEVER_VALUES`, a recorder makes the file refused naming its global, as torch would
have. The standard library's globals get no recorder at all: torch refuses them itself, naming
them, so `os.system`, `builtins.eval` or `subprocess.Popen` stay refused exactly as before.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import enum
import math
import pathlib
import pickletools
import sys
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

__all__ = ["FIXED", "NEVER_VALUES", "Refused", "contents", "globals_in_legacy_pickles", "python3_name",
           "stand_ins_for", "thaw"]

# Libraries whose functions load code or data: a recorder of theirs is never read as a value,
# whatever its shape (`torch.hub.load("repo")` has an Enum member's shape too).
NEVER_VALUES = ("torch", "numpy", "dill", "cloudpickle", "joblib", "pandas", "yaml", "ruamel", "jinja2")
# At most this many conversions are listed, each cut to MAX_NOTE characters: the list goes into
# provenance, in a header whose metadata holds 1 MiB in all.
MAX_LISTED = 50
MAX_NOTE = 300


class Refused(Exception):
    """A global the stand-ins cannot turn into a plain value: the file is refused naming it."""

    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = global_name


class _Named:
    """Base of the stand-in classes: the global they stand in for, for messages and records."""

    global_name = "?"


class _Namespace(dict, _Named):
    """argparse.Namespace pickles as NEWOBJ(cls, ()) then BUILD(vars(namespace))."""

    global_name = "argparse.Namespace"

    def __setstate__(self, state: Any) -> None:
        self["__state__"] = state  # anything but a dict is not a Namespace's: thaw refuses it
        if isinstance(state, dict):
            del self["__state__"]
            self.update(state)


class _Path(str, _Named):
    """What a path stand-in returns: the path's text, remembering which class it was."""


class _Malformed(_Named):
    """A stand-in called with arguments of a shape its class never pickles with."""

    def __init__(self, global_name: str):
        self.global_name = global_name


def _path_of(flavour: type, name: str):
    def stand_in(*parts: Any) -> Any:
        # A path pickles as REDUCE(cls, path.parts); the pure flavour joins them, touching no file.
        if not all(type(part) is str for part in parts):
            return _Malformed(name)
        text = _Path(str(flavour(*parts)))
        text.global_name = name
        return text

    return stand_in


def _defaultdict(*args: Any) -> dict:
    # REDUCE(defaultdict, (factory,)) then SETITEMS: an exact dict takes the items (the
    # unpickler sets items only on exact dicts); the factory is not kept.
    return {}


class _OmegaContainer(_Named):
    """DictConfig / ListConfig: NEWOBJ(cls, ()) then BUILD({"_content": ..., "_metadata": ...,
    "_parent": ...}). Only the content is kept: the parent is a back-reference (a cycle)."""

    kind = "?"

    def __setstate__(self, state: Any) -> None:
        self.content = state.get("_content") if isinstance(state, dict) else _Malformed(self.global_name)


class _OmegaNode(_Named):
    """A value node: NEWOBJ(cls, ()) then BUILD({"_val": value, "_metadata": ..., "_parent": ...})."""

    def __setstate__(self, state: Any) -> None:
        self.value = state.get("_val") if isinstance(state, dict) else _Malformed(self.global_name)


class _Discarded(_Named):
    """OmegaConf's metadata (types, flags, a resolver cache): read, and not kept."""

    def __setstate__(self, state: Any) -> None:
        pass


class _TypeName(_Named):
    """A type named as a value (`typing.Any` in OmegaConf's metadata). Not callable: a pickle
    that tries to call it fails."""

    def __init__(self, global_name: str):
        self.global_name = global_name


def _named(base: type, name: str, **attributes: Any) -> type:
    return type(base.__name__, (base,), {"global_name": name, **attributes})


_OMEGA_NODES = ("AnyNode", "IntegerNode", "FloatNode", "StringNode", "BooleanNode", "BytesNode", "PathNode",
                "EnumNode", "UnionNode")
_TYPE_NAMES = ("typing.Any", "typing.Dict", "typing.List", "typing.Tuple", "typing.Optional", "typing.Union",
               "builtins.dict", "builtins.list", "builtins.int", "builtins.float", "builtins.str",
               "builtins.bool", "builtins.bytes", "builtins.tuple", "builtins.object")
_ATTRIBUTE_DICTS = ("lightning.fabric.utilities.data.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
                    "pytorch_lightning.utilities.parsing.AttributeDict")

FIXED: dict[str, Any] = {
    **{f"{module}.{cls.__name__}": _path_of(flavour, f"{module}.{cls.__name__}")
       for module in ("pathlib", "pathlib._local")
       for cls, flavour in ((pathlib.PosixPath, pathlib.PurePosixPath), (pathlib.PurePosixPath, pathlib.PurePosixPath),
                            (pathlib.WindowsPath, pathlib.PureWindowsPath),
                            (pathlib.PureWindowsPath, pathlib.PureWindowsPath), (pathlib.Path, pathlib.PurePosixPath),
                            (pathlib.PurePath, pathlib.PurePosixPath))},
    "argparse.Namespace": _Namespace,
    # AttributeDict is a dict subclass filled by SETITEMS, which the unpickler allows only on an
    # exact dict: dict itself stands in.
    **{name: dict for name in _ATTRIBUTE_DICTS},
    "collections.defaultdict": _defaultdict,
    "omegaconf.dictconfig.DictConfig": _named(_OmegaContainer, "omegaconf.dictconfig.DictConfig", kind="dict"),
    "omegaconf.listconfig.ListConfig": _named(_OmegaContainer, "omegaconf.listconfig.ListConfig", kind="list"),
    **{f"omegaconf.nodes.{node}": _named(_OmegaNode, f"omegaconf.nodes.{node}") for node in _OMEGA_NODES},
    **{name: _named(_Discarded, name) for name in ("omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata")},
    **{name: _TypeName(name) for name in _TYPE_NAMES},
}


class _Recorder(_Named):
    """Stands in for a global that no fixed stand-in covers. REDUCE calls `cls(*args)` (so
    __init__ runs), NEWOBJ only `cls.__new__(cls, *args)`, BUILD `__setstate__(state)`; each
    is recorded and nothing else happens."""

    def __new__(cls, *args: Any) -> "_Recorder":
        self = object.__new__(cls)
        self.args, self.how, self.state = args, "NEWOBJ", None
        return self

    def __init__(self, *args: Any) -> None:
        self.how = "REDUCE"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def python3_name(name: str) -> str:
    """A global's name as Python 3 (and torch's unpickler) resolves it: protocol-2 pickles spell
    `subprocess.call` as `commands.call`, and torch prints builtins bare (`exec`)."""
    module, _, attribute = name.rpartition(".")
    if not module:
        return f"builtins.{attribute}"
    module, attribute = _compat_pickle.NAME_MAPPING.get((module, attribute), (module, attribute))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attribute}"


def _top_module(name: str) -> str:
    return name.split(".", 1)[0]


def stand_ins_for(names: Iterable[str]) -> list[tuple[Any, str]]:
    """The `(stand_in, name)` pairs for `torch.serialization.safe_globals` that cover `names`
    (globals a pickle needs beyond torch's own allowlist): the fixed stand-ins, and a recorder
    for each global outside the standard library. The standard library's are left out, so that
    torch refuses them, naming them."""
    pairs = []
    for name in names:
        spelled = python3_name(name)  # torch looks up `name`; Python 3 would import `spelled`
        if name in FIXED:
            pairs.append((FIXED[name], name))
        elif _top_module(spelled) not in sys.stdlib_module_names:
            pairs.append((_named(_Recorder, spelled), name))
    return pairs


def globals_in_legacy_pickles(f: BinaryIO) -> list[str]:
    """The globals named in a pre-1.6 torch file's pickles (magic number, protocol, system info,
    the object), as `module.name` spelled in the file, read op by op without building anything;
    what follows them is raw storage data. A damaged pickle ends the scan: loading it will say
    what is wrong."""
    names: list[str] = []
    for _ in range(4):
        try:
            for opcode, argument, _ in pickletools.genops(f):
                if opcode.name == "GLOBAL":
                    module, _, attribute = argument.partition(" ")
                    names.append(f"{module}.{attribute}")
        except (ValueError, EOFError, UnicodeDecodeError, OverflowError):
            break
    return list(dict.fromkeys(names))


def contents(value: Any) -> list[Any] | None:
    """What a stand-in holds, for walking the unpickled graph; None for anything else."""
    if isinstance(value, _OmegaContainer):
        return [getattr(value, "content", None)]
    if isinstance(value, _OmegaNode):
        return [getattr(value, "value", None)]
    if isinstance(value, _Recorder):
        return [*value.args, value.state]
    return None


def thaw(value: Any, *, where: str, conversions: list[str]) -> Any:
    """`value` with every stand-in turned into the plain value it stands for, and the types that
    an unsafe (weights_only=False) load builds for real turned into the same plain values; other
    objects (tensors, numbers, containers) are kept as they are. Each conversion is appended to
    `conversions` as `where: what -> result`.

    Call it only on a graph already checked to be of bounded size and depth.

    Raises:
        Refused: a recorder that is not an Enum member's value, a stand-in used in a way its
            class never pickles, or a class named as a value.
    """
    return _thaw(value, where, conversions)


def _note(conversions: list[str], where: str, text: str) -> None:
    if len(conversions) < MAX_LISTED:
        note = f"{where or '(top level)'}: {text}"
        conversions.append(note if len(note) <= MAX_NOTE else note[: MAX_NOTE - 3] + "...")
    elif len(conversions) == MAX_LISTED:
        conversions.append("... (more conversions not listed)")


def _thaw(value: Any, where: str, conversions: list[str]) -> Any:
    if isinstance(value, enum.Enum):  # an unsafe load's real members (IntEnum, StrEnum included)
        return _enum_value(value, where, conversions)
    if isinstance(value, _Path):
        _note(conversions, where, f"{value.global_name} -> {str(value)!r}")
        return str(value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    if type(value).__module__.split(".", 1)[0] == "omegaconf":  # an unsafe load's real containers
        _note(conversions, where, f"{type(value).__module__}.{type(value).__qualname__} -> its content")
        return _thaw(_omegaconf_container(value), where, conversions)
    if isinstance(value, _Namespace):
        if "__state__" in value:
            raise Refused(value.global_name)
        _note(conversions, where, f"{value.global_name} -> dict")
        return _thaw_items(value, where, conversions)
    if isinstance(value, Mapping):
        return _thaw_items(value, where, conversions)
    if isinstance(value, list):
        return [_thaw(v, f"{where}[{i}]", conversions) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_thaw(v, f"{where}[{i}]", conversions) for i, v in enumerate(value))
    if isinstance(value, (set, frozenset)):
        try:
            return type(value)(_thaw(v, where, conversions) for v in value)
        except TypeError:  # a stand-in became a dict, which a set cannot hold
            raise Refused("builtins.set") from None
    if isinstance(value, (_OmegaContainer, _OmegaNode)):
        held = getattr(value, "content" if isinstance(value, _OmegaContainer) else "value", None)
        if isinstance(held, _Malformed):
            raise Refused(value.global_name)
        if isinstance(value, _OmegaContainer):
            _note(conversions, where, f"{value.global_name} -> {value.kind}")
        return _thaw(held, where, conversions)
    if isinstance(value, _Recorder):
        return _recorded_value(value, where, conversions)
    if isinstance(value, _Malformed):
        raise Refused(value.global_name)
    if isinstance(value, type) and issubclass(value, _Recorder):
        raise Refused(value.global_name)
    if isinstance(value, (_Named, type)) and isinstance(getattr(value, "global_name", None), str):
        _note(conversions, where, f"{value.global_name} (named as a value) -> its name")
        return value.global_name
    if isinstance(value, pathlib.PurePath):
        _note(conversions, where, f"{type(value).__name__} -> {str(value)!r}")
        return str(value)
    if isinstance(value, argparse.Namespace):
        _note(conversions, where, "argparse.Namespace -> dict")
        return _thaw_items(vars(value), where, conversions)
    return value


def _thaw_items(value: Mapping, where: str, conversions: list[str]) -> dict:
    return {_thaw(k, where, conversions): _thaw(v, _at(where, k), conversions) for k, v in value.items()}


def _at(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _recorded_value(recorded: _Recorder, where: str, conversions: list[str]) -> Any:
    args = recorded.args
    enum_shaped = (
        recorded.how == "REDUCE" and recorded.state is None and len(args) == 1
        and type(args[0]) in (int, str, bool, float)
        and not (type(args[0]) is float and not math.isfinite(args[0]))
    )
    if not enum_shaped or _top_module(recorded.global_name) in NEVER_VALUES:
        raise Refused(recorded.global_name)
    _note(conversions, where, f"{recorded.global_name}({args[0]!r}) -> {args[0]!r}, read as an Enum member's value")
    return args[0]


def _enum_value(member: enum.Enum, where: str, conversions: list[str]) -> Any:
    value = member.value
    _note(conversions, where, f"{type(member).__module__}.{type(member).__qualname__}.{member.name} -> {value!r}")
    return value


def _omegaconf_container(value: Any) -> Any:
    from omegaconf import OmegaConf  # loaded already: the unsafe load built this container

    return OmegaConf.to_container(value, resolve=False)

