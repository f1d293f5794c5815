"""The architectures that installed packages declare, listed without importing them: the
entry-point group `ckptfmt.models`, read from the distributions on sys.path (see
`installed_entry_points`). Loading what an entry point names is the registry's (`_load_plugin`)."""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "installed_entry_points"]

ENTRY_POINT_GROUP = "ckptfmt.models"


@functools.cache
def installed_entry_points() -> tuple:
    """The group's entry points, listed as importlib.metadata lists them, without importing it.

    Example:
        >>> [point.name for point in installed_entry_points()][:2]
        ['monai', 'multitask']

    Importing importlib.metadata costs 15 to 20 ms, a sixth of what `inspect` costs, while
    reading the few `entry_points.txt` files on sys.path costs one or two. So the folders on
    sys.path are read here the way importlib.metadata reads them: each folder's `*.dist-info`
    and `*.egg-info` in listing order, each distribution (by normalised name) taken from the
    first folder that has it. Whatever this does not read, importlib.metadata lists: a zip file
    or an egg on sys.path, or a finder on sys.meta_path that finds distributions of its own.
    """
    import os
    import sys
    from importlib.machinery import PathFinder

    if [finder for finder in sys.meta_path if hasattr(finder, "find_distributions")] != [PathFinder]:
        return _listed_by_importlib()
    seen: set[str] = set()
    points: list[_EntryPoint] = []
    for entry in sys.path:
        folder = entry or "."
        if not isinstance(folder, str) or folder.lower().endswith(".egg"):
            return _listed_by_importlib()
        try:
            children = os.listdir(folder)
        except NotADirectoryError:  # a zip file
            return _listed_by_importlib()
        except OSError:  # gone, or not readable: importlib.metadata skips it too
            continue
        for child in children:
            if not child.lower().endswith((".dist-info", ".egg-info")):
                continue
            name = re.sub(r"[-_.]+", "_", child.lower().rpartition(".")[0].partition("-")[0])
            if not name:  # importlib.metadata would read its name from its METADATA
                return _listed_by_importlib()
            if name in seen:
                continue
            seen.add(name)
            try:
                with open(os.path.join(folder, child, "entry_points.txt"), encoding="utf-8") as file:
                    text = file.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
                continue
            except (OSError, ValueError):  # what importlib.metadata would raise, let it say so
                return _listed_by_importlib()
            if f"[{ENTRY_POINT_GROUP}]" in text:
                points += _group_of(text)
    return tuple(points)


def _group_of(text: str) -> list[_EntryPoint]:
    """The entry points of our group in an `entry_points.txt`, read as importlib.metadata reads
    it: lines stripped, `#` comments and blank lines skipped, `[section]`, `name = value`."""
    points, section = [], None
    for line in map(str.strip, text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line.strip("[]")
        elif section == ENTRY_POINT_GROUP:
            name, _, value = line.partition("=")
            points.append(_EntryPoint(name.strip(), value.strip()))
    return points


def _listed_by_importlib() -> tuple:
    from importlib.metadata import entry_points

    return tuple(_EntryPoint(point.name, point.value) for point in entry_points(group=ENTRY_POINT_GROUP))


class _EntryPoint(tuple):
    """An entry point as (name, value): what importlib.metadata's gives, without it."""

    __slots__ = ()

    def __new__(cls, name: str, value: str):
        return super().__new__(cls, (name, value))

    name = property(lambda self: self[0])
    value = property(lambda self: self[1])

    def load(self) -> Any:
        """The object named by `module:attribute.path`, its module imported."""
        import importlib

        module, _, attributes = self.value.partition(":")
        target = importlib.import_module(module.strip())
        for attribute in filter(None, attributes.strip().split(".")):
            target = getattr(target, attribute)
        return target
