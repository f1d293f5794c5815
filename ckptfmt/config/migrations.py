"""Older config schemas, migrated: one small pure function per step, each saying why it exists,
in the shape of Lightning's migration index. A config of a newer schema than these is refused
where it is read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .fields import SEED_MODEL_TYPE

__all__ = ["MIGRATIONS"]


def _v0_to_v1(config: dict[str, Any]) -> dict[str, Any]:
    """The original system wrote no schema_version; its keys are a subset of v1's."""
    return {"model_type": SEED_MODEL_TYPE, **config, "schema_version": 1}


def _v1_to_v2(config: dict[str, Any]) -> dict[str, Any]:
    """v1 held the U-Net's five arguments and its inference fields for every model_type, and a
    missing model_type meant the U-Net. v2 holds any architecture's arguments under the same flat
    keys, and the task; v1's keys keep their meaning, and the task is filled in from the
    architecture when the config is checked."""
    return {"model_type": SEED_MODEL_TYPE, **config, "schema_version": 2}


# schema N -> function turning an N dict into an N+1 dict.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1, 1: _v1_to_v2}
