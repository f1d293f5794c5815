"""Configs against tensors: a config (or a built model) checked against a file's tensor shapes
and dtypes before anything is allocated.

A mismatch is our error naming the field, the tensor and both shapes, never torch's wall of
size-mismatch lines after the memory is spent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import ShapeMismatchError
from .model_config import ModelConfig
from .registry import get_model_entry

__all__ = ["check_shapes", "check_state", "module_state"]

Shapes = Mapping[str, tuple[int, ...]]


# What may stand where the architecture has a tensor of a kind: a cast (--dtype fp16) keeps
# floats floats; an integer where a float belongs is a damaged or foreign file.
_KINDS = {"F": "floating point", "B": "floating point", "I": "integer", "U": "integer", "C": "complex"}


def _kind(dtype: str) -> str:
    return "bool" if dtype == "BOOL" else _KINDS.get(dtype[0], dtype)


def _mixed_floats(expected: Mapping[str, tuple[tuple[int, ...], str]], dtypes: Mapping[str, str]) -> tuple[str, str, str] | None:
    """`(tensor, its dtype, the file's other dtype)` when the file holds the architecture's
    floating-point tensors in more than one dtype where the architecture has them in one; else
    None. A whole-file cast keeps them in one: a model loaded with `assign=True` keeps each
    tensor's dtype, and one F64 among F32s fails in the forward pass, not at loading."""
    wanted = {dtype for _, dtype in expected.values() if _kind(dtype) == "floating point"}
    if len(wanted) != 1:
        return None  # no floats, or an architecture that mixes them itself
    names = [name for name, (_, dtype) in expected.items()
             if _kind(dtype) == "floating point" and name in dtypes and _kind(dtypes[name]) == "floating point"]
    counts: dict[str, int] = {}
    for name in names:
        counts[dtypes[name]] = counts.get(dtypes[name], 0) + 1
    if len(counts) < 2:
        return None
    common = max(counts, key=counts.get)  # the first of the most frequent, in the architecture's order
    odd = next(name for name in names if dtypes[name] != common)
    return odd, dtypes[odd], common


def check_state(
    expected: Mapping[str, tuple[tuple[int, ...], str]], shapes: Shapes, dtypes: Mapping[str, str] | None = None,
    *, strict: bool = True,
) -> list[str]:
    """The mismatches between what a model holds (`{name: (shape, dtype)}`) and what a file
    holds: missing, unexpected, of another shape, of another kind of dtype (an integer where
    the model has a float), or floats of mixed dtypes where the model has one. Empty when they
    fit."""
    problems = []
    for name, (want, want_dtype) in expected.items():
        have = shapes.get(name)
        if have is None:
            if strict:
                problems.append(f"{name} {list(want)}; the file has no such tensor")
        elif tuple(have) != tuple(want):
            problems.append(f"{name} {list(want)}; the file has {list(have)}")
        elif dtypes is not None and name in dtypes and _kind(dtypes[name]) != _kind(want_dtype):
            problems.append(f"{name} as {want_dtype}; the file has it as {dtypes[name]}")
    if strict:
        problems += [
            f"no tensor {name}; the file has {name} {list(shapes[name])}" for name in shapes if name not in expected
        ]
    if dtypes is not None and (mixed := _mixed_floats(expected, dtypes)) is not None:
        name, dtype, common = mixed
        problems.append(f"{name} as {common}, like the file's other floating-point tensors; the file has it as {dtype}")
    return problems


def check_shapes(
    config: ModelConfig, shapes: Shapes, *, dtypes: Mapping[str, str] | None = None,
    path: str | os.PathLike | None = None, overridden: tuple[str, ...] = (), strict: bool = True,
) -> None:
    """Check a config against a state dict's shapes (and dtypes), on the meta device; nothing
    is allocated.

    Raises:
        ShapeMismatchError: naming the field, the tensor and both shapes, e.g. `base_filters=32
            expects enc.0.0.weight [32, 1, 3, 3]; the file has [64, 1, 3, 3]`.
    """
    config = config.checked(path=path)
    entry = get_model_entry(config.model_type)
    expected = entry.expected_state(config.params)
    problems = check_state(expected, shapes, dtypes, strict=strict)
    if not problems:
        return
    if len(problems) == 1 and dtypes is not None and (mixed := _mixed_floats(expected, dtypes)) is not None:
        # The config is not to blame: the file's dtypes are, whatever the config says.
        name, dtype, common = mixed
        raise ShapeMismatchError(
            f"tensor {name} is {dtype} where the file's other floating-point tensors are {common}; "
            f"{config.model_type} holds its floating-point tensors in one dtype and cannot run them mixed. "
            "Save the weights with all of them in one dtype",
            path=path,
        )
    fields, inferred = _fields_the_weights_contradict(entry, config, shapes, overridden)
    params = config.params
    culprit = f"{fields[0]}={params[fields[0]]!r}" if fields else "the config"
    inferred_say = f" (the weights say {', '.join(f'{f}={inferred[f]!r}' for f in fields)})" if fields else ""
    more = f", and {len(problems) - 1} more mismatch{'es' if len(problems) > 2 else ''}" if len(problems) > 1 else ""
    fix = "remove the override" if set(fields) & set(overridden) else "fix the config"
    raise ShapeMismatchError(f"{culprit} expects {problems[0]}{more}{inferred_say}; {fix}", path=path)


def _fields_the_weights_contradict(
    entry, config: ModelConfig, shapes: Shapes, overridden: tuple[str, ...],
) -> tuple[list[str], dict[str, Any]]:
    """The arguments whose value differs from what the architecture's infer_config reads off the
    weights (overridden ones first), and what it reads; nothing when it cannot say."""
    if entry.infer_config is None:
        return [], {}
    try:
        inferred = entry.infer_config({name: tuple(s) for name, s in shapes.items()})
    except Exception:  # these weights are not this architecture's, or the plugin failed
        return [], {}
    params = config.params
    fields = [name for name in params if name in inferred and inferred[name] != params[name]]
    return sorted(fields, key=lambda name: name not in overridden), inferred


def module_state(model: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{name: (shape, dtype)}` of a built model's state dict."""
    from ..format.writer import DTYPE_NAMES

    return {name: (tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype))) for name, t in model.state_dict().items()}
