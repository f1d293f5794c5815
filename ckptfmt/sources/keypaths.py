"""Where the flat values of a torch.distributed.checkpoint folder go back in its state dict.

DCP stores a nested state dict flat (`optim.state.0.step`) and records each key's path in it
(`("optim", "state", 0, "step")`: a str step is a dict key, an int one a list index, as DCP's own
`set_element` has it). The paths come from the folder's `.metadata`, so they are bounded before
they are walked: no deeper than a legacy file may nest, lists no longer than the folder's entries
could fill, and no two values at one place (one would be lost) or one inside another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LegacyCheckpointError

__all__ = ["check_key_paths", "crafted", "nest"]

# Lists the key paths make hold at most this many places beyond two per entry of the folder: an
# optimizer state keyed by parameter number leaves a hole for each parameter without state.
SPARE_LIST_PLACES = 100_000


def crafted(problem: str, path: Path) -> LegacyCheckpointError:
    """A DCP `.metadata` refused for what it says, as every such refusal is worded."""
    return LegacyCheckpointError(f"{problem}; the folder is damaged or was crafted", path=path)


def check_key_paths(planner: Any, path: Path) -> None:
    """DCP's planner data, when there is any: each key's path in the nested state dict, no
    deeper than a legacy file may nest (its length is checked before its steps are: a pickle can
    share one endless path among many keys).

    Example:
        >>> check_key_paths({"optim.state.0.step": ("optim", "state", 0, "step")}, Path(".metadata"))
    """
    from .legacy import MAX_NESTING

    if planner is None:
        return
    if type(planner) is not dict:
        raise crafted("planner_data is not a dict of key paths", path)
    for key, steps in planner.items():
        if type(key) is not str or type(steps) not in (tuple, list) or not steps:
            raise crafted("planner_data is not a dict of key paths", path)
        if len(steps) > MAX_NESTING:
            raise crafted(f"the key path of {key[:200]!r} is {len(steps):,} steps deep, deeper than the "
                          f"{MAX_NESTING} levels a checkpoint may nest", path)
        if not all(type(step) in (str, int) and (type(step) is str or step >= 0) for step in steps):
            raise crafted(f"the key path of {key[:200]!r} holds a step that is neither a name nor a list index", path)


class _Node(dict):
    """A container the key paths make: a dict, or a list once every key under it is an int (as
    DCP's own `set_element` has it). Values put in place are never `_Node`s, so a key path that
    runs into one is told apart from one that runs through a container."""


def nest(flat: dict[str, Any], planner: dict[str, Any], path: Path) -> dict[str, Any]:
    """The flat values put back in their nested places, each at the key path DCP records (its
    own name where none is recorded). Two values mapped to one place, or one mapped through
    another, are refused naming both: nothing is silently dropped.

    Example:
        >>> nest({"model.w": 1, "step": 2}, {"model.w": ("model", "w"), "step": ("step",)}, Path(".metadata"))
        {'model': {'w': 1}, 'step': 2}
    """
    root = _Node()
    owners: dict[tuple, str] = {}
    for fqn, value in flat.items():
        steps = tuple(planner.get(fqn, (fqn,)))
        container = root
        for depth, step in enumerate(steps[:-1]):
            child = container.setdefault(step, _Node())
            if type(child) is not _Node:
                raise crafted(f"the key path of {fqn!r} goes through the value of {owners[steps[:depth + 1]]!r}", path)
            container = child
        if steps[-1] in container:
            other = owners.get(steps) or next(name for place, name in owners.items() if place[:len(steps)] == steps)
            raise crafted(f"{other!r} and {fqn!r} are both mapped to {_shown_steps(steps)}: one would be lost", path)
        container[steps[-1]] = value
        owners[steps] = fqn
    places = [2 * len(flat) + SPARE_LIST_PLACES]
    return {key: _built(value, (key,), places, path) for key, value in root.items()}


def _built(value: Any, where: tuple, places: list[int], path: Path) -> Any:
    """A `_Node` as the dict or list it stands for (values as they are). A list is as long as
    its largest index + 1, holes None; `places` is what all lists may still hold, spent before
    a list is made."""
    if type(value) is not _Node:
        return value
    ints = [key for key in value if type(key) is int]
    if not ints:
        return {key: _built(item, (*where, key), places, path) for key, item in value.items()}
    if len(ints) != len(value):
        raise crafted(f"the key paths under {_shown_steps(where)} use it both as a list and as a dict", path)
    length = max(ints) + 1
    places[0] -= length
    if places[0] < 0:
        raise crafted(f"the key paths index the list at {_shown_steps(where)} up to {length - 1:,}: more list places "
                      "than the folder's entries could fill", path)
    built: list[Any] = [None] * length
    for key, item in value.items():
        built[key] = _built(item, (*where, key), places, path)
    return built


def _shown_steps(steps: tuple) -> str:
    return ".".join(map(str, steps))[:200]
