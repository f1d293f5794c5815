"""Identifying a library's model from a state dict's tensor names and shapes, by one index.

A `SignatureIndex` holds each model of a library by digests of its tensors (`index_entry`): the
digest of its tensor names, which the look-up goes by, and the digest of its shapes without
those that an argument changes (the classifier that num_classes sizes, the first convolution
that in_chans widens), with where to read that argument. `identify(shapes)` is the one loop
that timm, torchvision and smp share: look up the names, keep the entries whose other shapes
fit, read the arguments off the shapes, and confirm each candidate by building it on the meta
device. Each adapter declares only its library, its list of names and how to build one.

The index is built on first need, in worker processes (`_index_workers`), and cached in the
user's cache folder under a key of everything its entries depend on: the library's version and
those of the libraries its models are made of, torch's version, `INDEX_FORMAT`, and the content
of ckptfmt's own modules that build and read it. Changed code never gets an old index's answer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptfmt.errors import ArchitectureNotRecognisedError
from ckptfmt.io.files import CACHE_ENV, cache_folder

from ._index_workers import ADAPTERS, index_all
from ._library import library_version
from ._meta import Shapes, build_for_shapes, first_difference, shapes_of

__all__ = ["INDEX_FORMAT", "SignatureIndex", "index_entry", "keys_digest", "shapes_digest"]

# Bumped when what an index entry holds changes, so that an older cache is rebuilt, not misread.
INDEX_FORMAT = 2

_MODELS_FOLDER = Path(__file__).parent


def keys_digest(names: Iterable[str]) -> str:
    """The digest of a set of tensor names, whatever their order.

    Example:
        >>> keys_digest(["fc.weight", "fc.bias"]) == keys_digest({"fc.bias": (2,), "fc.weight": (2, 3)})
        True
    """
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:24]


def shapes_digest(shapes: Shapes, *, leave_out: Collection[str | None] = ()) -> str:
    """The digest of tensor names and shapes, those in `leave_out` left out.

    Example:
        >>> shapes_digest({"fc.weight": (2, 3)}) != shapes_digest({"fc.weight": (5, 3)})
        True
    """
    text = "\n".join(f"{name}:{list(shapes[name])}" for name in sorted(shapes) if name not in leave_out)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def index_entry(name: str, shapes: Shapes, *, leave_out: Iterable[str | None] = (),
                reads: dict[str, tuple[str | None, int]] | None = None, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One index entry of model `name` built with `args`, whose state dict has these shapes.

    `reads` says which argument is read off which tensor's dimension (`{"num_classes":
    ("fc.weight", 0)}`), kept in its order (the config's); those tensors, and any other in
    `leave_out`, are left out of the shapes' digest, so that a state dict with another
    num_classes still finds the entry. A read whose tensor is None is dropped.

    Example:
        >>> index_entry("resnet18", shapes, reads={"num_classes": ("fc.weight", 0)})
        {'name': 'resnet18', 'keys': '...', 'body': '...', 'leave_out': ['fc.weight'],
         'reads': [['num_classes', 'fc.weight', 0]], 'args': {}}
    """
    # A list, not a dict: the cache is written with sorted keys, and the config keeps this order.
    reads = [[argument, tensor, dim] for argument, (tensor, dim) in (reads or {}).items() if tensor is not None]
    left_out = [*dict.fromkeys([*(t for t in leave_out if t is not None), *(tensor for _, tensor, _ in reads)])]
    return {"name": name, "keys": keys_digest(shapes), "body": shapes_digest(shapes, leave_out=left_out),
            "leave_out": left_out, "reads": reads, "args": dict(args or {})}


def _one_config(arguments: dict[str, Any], shapes: Shapes) -> list[dict[str, Any]]:
    return [arguments]


@dataclasses.dataclass(eq=False)
class SignatureIndex:
    """A library's models by the digests of their tensor names and shapes, so that a state
    dict is looked up, not compared with every model's; and `identify`, which turns a look-up
    into the configs that fit exactly.

    Each adapter declares:
        library: the index's name, and its adapter module's (a worker imports it by that name
            from a fixed table, and calls its `index_entries(name) -> list of index_entry`).
        distribution, depends_on: the library's distribution, and those its models are made of.
        names: the names to index (built into entries by the adapter's `index_entries`).
        build: `f(config) -> model`, the adapter's own builder.
        unknown: the reason given when no model has these tensor names.
        unfit: `f(named, shaped) -> reason` when some model has these names but none fits: the
            names of those whose tensor names fit, and of those whose shapes fit too.
        name_argument: the argument an entry's name is given as.
        prefix: the tensors indexed are those under it (smp indexes its encoders).
        configs: `f(arguments, shapes) -> configs` to build from an entry's arguments (smp's: one
            per architecture); by default the arguments themselves.
        unbuildable: the exceptions that mean a config cannot be built (so it does not fit).

    The index is built on first need, in fresh worker processes (never forked from the user's,
    never spawned through its __main__), with progress on stderr, and cached in
    `cache_folder()/signatures/LIBRARY-VERSION+torch-VERSION-KEY.json`.

    Example:
        >>> index = SignatureIndex("timm", distribution="timm", names=timm.list_models, build=build,
        ...                        unknown="no timm model has these tensor names", unfit=unfit)
        >>> index.identify(shapes_of(timm.create_model("convnext_atto", num_classes=3)))
        {'model_name': 'convnext_atto', 'num_classes': 3, 'in_chans': 3}
    """

    library: str
    _: dataclasses.KW_ONLY
    distribution: str
    names: Callable[[], Iterable[str]]
    build: Callable[[dict[str, Any]], nn.Module]
    unknown: str
    unfit: Callable[[list[str], list[str]], str]
    name_argument: str = "model_name"
    prefix: str = ""
    configs: Callable[[dict[str, Any], Shapes], Iterable[dict[str, Any]]] = _one_config
    unbuildable: tuple[type[Exception], ...] = ()
    depends_on: tuple[str, ...] = ()
    what: str = "models"
    _by_keys: dict[str, list[dict[str, Any]]] | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Remembered per state dict: convert asks once to strip a prefix and once to identify.
        self._answers = functools.lru_cache(maxsize=16)(self._answer)

    @functools.cached_property
    def version(self) -> str:
        return library_version(self.distribution)

    @functools.cached_property
    def key(self) -> str:
        """The digest of everything the entries depend on."""
        code = [_MODELS_FOLDER / name for name in sorted(p.name for p in _MODELS_FOLDER.glob("_*.py"))]
        code.append(_MODELS_FOLDER / f"{ADAPTERS[self.library]}.py")
        stamp = {
            "format": INDEX_FORMAT, "torch": torch.__version__,
            "libraries": {d: library_version(d) for d in (self.distribution, *self.depends_on)},
            "code": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in code},
        }
        return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def path(self) -> Path:
        torch_version = torch.__version__.split("+")[0]
        name = f"{self.library}-{self.version}+torch-{torch_version}-{self.key[:12]}.json"
        return cache_folder() / "signatures" / name

    def lookup(self, digest: str) -> list[dict[str, Any]]:
        """The entries whose tensor names have this digest.

        Example:
            >>> [entry["name"] for entry in index.lookup(keys_digest(state_dict))]
            ['resnet18']
        """
        if self._by_keys is None:
            by_keys: dict[str, list[dict[str, Any]]] = {}
            for entry in self._load_or_build():
                by_keys.setdefault(entry["keys"], []).append(entry)
            self._by_keys = by_keys
        return self._by_keys.get(digest, [])

    def identify(self, shapes: Shapes) -> dict[str, Any] | list[dict[str, Any]]:
        """The configs of the library's models whose tensor names and shapes are exactly these,
        with the arguments read off the shapes: one config, or a list of them for twins (models
        with the same tensors, which the probe tells apart or refuses).

        Raises:
            ArchitectureNotRecognisedError: no model of the library fits, saying why.

        Example:
            >>> index.identify(shapes_of(timm.create_model("convnext_atto", num_classes=7)))
            {'model_name': 'convnext_atto', 'num_classes': 7, 'in_chans': 3}
        """
        found = self._answers(tuple((name, tuple(shape)) for name, shape in shapes.items()))
        if isinstance(found, str):
            raise ArchitectureNotRecognisedError(found)
        return found[0] if len(found) == 1 else list(found)

    def _answer(self, items: tuple) -> list[dict[str, Any]] | str:
        """The configs that fit, or why none does."""
        shapes = dict(items)
        part = {name[len(self.prefix):]: shape for name, shape in shapes.items() if name.startswith(self.prefix)}
        # Looked up before the library is imported (2 to 3 s): most weights asked about are not its.
        entries = sorted(self.lookup(keys_digest(part)), key=lambda e: e["name"])
        if not entries:
            return self.unknown
        shaped = [entry for entry in entries if shapes_digest(part, leave_out=entry["leave_out"]) == entry["body"]]
        found = [config for entry in shaped for config in self._fitting(entry, part, shapes)]
        if not found:
            return self.unfit(sorted({e["name"] for e in entries}), sorted({e["name"] for e in shaped}))
        return found

    def _fitting(self, entry: dict[str, Any], part: Shapes, shapes: Shapes) -> Iterator[dict[str, Any]]:
        """The configs from this entry whose model, built on the meta device, has exactly
        these tensor names and shapes."""
        arguments = {self.name_argument: entry["name"], **entry["args"],
                     **{argument: part[tensor][dim] for argument, tensor, dim in entry["reads"]}}
        for config in self.configs(arguments, shapes):
            try:
                expected = shapes_of(build_for_shapes(lambda: self.build(config)))
            except self.unbuildable:
                continue
            if first_difference(expected, shapes) is None:
                yield config

    # -- the cache file ------------------------------------------------------------------------

    def _load_or_build(self) -> list[dict[str, Any]]:
        entries = self._read()
        if entries is None:
            entries = index_all(self.library, sorted(self.names()), version=self.version, what=self.what,
                                path=self.path)
            self._write(entries)
        return entries

    def _read(self) -> list[dict[str, Any]] | None:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            print(f"ckptfmt: the {self.library} index {self.path} is unreadable ({exc}); building it again",
                  file=sys.stderr)
            return None
        if (
            not isinstance(document, dict) or document.get("format") != INDEX_FORMAT
            or document.get("library") != self.library or document.get("key") != self.key
            or not isinstance(document.get("entries"), list)
            or not all(isinstance(e, dict) and isinstance(e.get("keys"), str) and isinstance(e.get("name"), str)
                       for e in document["entries"])
        ):
            print(f"ckptfmt: the {self.library} index {self.path} is not one this ckptfmt wrote; building it again",
                  file=sys.stderr)
            return None
        return document["entries"]

    def _write(self, entries: list[dict[str, Any]]) -> None:
        from ckptfmt.errors import WriteError
        from ckptfmt.io.atomic import atomic_write, write_all

        document = {"format": INDEX_FORMAT, "library": self.library, "version": self.version, "key": self.key,
                    "torch": torch.__version__, "entries": entries}
        try:
            with atomic_write(self.path, overwrite=True, durable=False) as fd:
                write_all(fd, json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
        except WriteError as exc:  # a read-only cache: identification still works, just not cached
            print(f"ckptfmt: could not cache the {self.library} index ({exc}); set {CACHE_ENV} to a "
                  "writable folder to keep it", file=sys.stderr)

