"""The checks of a config's fields: those that need no architecture (its own fields, JSON
arguments) and those the architecture makes (its signature, its own check, its task)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..io.jsondoc import plain_json
from .registry import TASKS, Task, check_model_type_name, get_model_entry

__all__ = ["DEFAULT_SEG_THRESHOLD", "NORMALIZATION_MODES", "SEED_MODEL_TYPE", "TEXT_FIELDS", "check_architecture",
           "check_normalization", "check_structure"]

# The original system had one architecture, so its API and its sidecars name none. Its configs
# still load, and `ModelConfig(base_filters=64, depth=4)` still means that architecture.
SEED_MODEL_TYPE = "multitask"
NORMALIZATION_MODES = ("none", "minmax", "zscore", "fixed")
DEFAULT_SEG_THRESHOLD = 0.5
# The descriptive fields every config has, with their defaults.
TEXT_FIELDS = {"version": "1.0", "description": "", "trained_on": "", "training_config": ""}


def check_structure(fields: dict[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks that need no architecture: the config's own fields, and JSON arguments."""
    fields = dict(fields)
    check_model_type_name(fields["model_type"])
    for name in TEXT_FIELDS:
        if not isinstance(fields[name], str):
            raise ConfigError(f"{name} must be a string, not {fields[name]!r}")
    task = fields["task"]
    if task is not None and task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    names = fields["class_names"]
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"class_names must be a list of strings, not {names!r}")
        fields["class_names"] = tuple(names)
    fields["normalization"] = check_normalization(
        {"mode": "none"} if fields["normalization"] is None else fields["normalization"], None
    )
    threshold = fields["seg_threshold"]
    if threshold is not None:
        if type(threshold) not in (int, float) or not 0 < threshold < 1:
            raise ConfigError(f"seg_threshold must be a number between 0 and 1, not {threshold!r}")
        if task == "classification":
            raise ConfigError("seg_threshold is for models that segment; a classification model has none")
        fields["seg_threshold"] = float(threshold)
    checked_params = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"config key {name!r} is neither a config field nor an argument name")
        checked_params[name] = plain_json(value, what=name)
    return fields, checked_params


def check_architecture(fields: dict[str, Any], params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks the architecture makes: its signature and annotations, its own check, its
    task; every default filled in."""
    entry = get_model_entry(fields["model_type"])
    params = entry.complete(params)
    task: Task | None = entry.describe_task(params)
    fields = dict(fields)
    if task is not None:
        if fields["task"] is not None and fields["task"] != task.kind:
            raise ConfigError(f"task {fields['task']!r} does not match the architecture, which does {task.kind}")
        fields["task"] = task.kind
    if fields["task"] is not None and "segmentation" in fields["task"] and fields["seg_threshold"] is None:
        fields["seg_threshold"] = DEFAULT_SEG_THRESHOLD
    if fields["task"] == "classification" and fields["seg_threshold"] is not None:
        raise ConfigError("seg_threshold is for models that segment; a classification model has none")
    if task is not None:
        names = fields["class_names"]
        classes = task.classes if task.classes is not None else task.mask_channels
        if names is not None and classes is not None and len(names) != classes:
            raise ConfigError(f"class_names has {len(names)} names but the model has {classes} classes")
        fields["normalization"] = check_normalization(fields["normalization"], task.in_channels)
    return fields, params


def check_normalization(value: Any, in_channels: int | None) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("mode") not in NORMALIZATION_MODES:
        raise ConfigError(
            f"normalization must be an object whose mode is one of {', '.join(NORMALIZATION_MODES)}, "
            f"not {value!r}"
        )
    expected = {"mode", "mean", "std"} if value["mode"] == "fixed" else {"mode"}
    if set(value) != expected:
        raise ConfigError(
            f"normalization mode {value['mode']!r} takes exactly the keys {', '.join(sorted(expected))}, "
            f"not {', '.join(sorted(value))}"
        )
    if value["mode"] != "fixed":
        return dict(value)
    result = {"mode": "fixed"}
    counts = (1,) if in_channels is None else (1, in_channels)
    for key in ("mean", "std"):
        numbers = value[key]
        if not isinstance(numbers, list):
            numbers = [numbers]
        fits = in_channels is None or len(numbers) in counts
        if not numbers or not fits or not all(type(n) in (int, float) and math.isfinite(n) for n in numbers):
            one_per = f" or a list of {in_channels}" if in_channels else " or a list, one per input channel"
            raise ConfigError(f"normalization {key} must be a finite number{one_per}, not {value[key]!r}")
        result[key] = [float(n) for n in numbers]
    if any(s <= 0 for s in result["std"]):
        raise ConfigError(f"normalization std must be positive, not {value['std']!r}")
    return result
