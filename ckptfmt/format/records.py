"""The schemas of a header's JSON documents, checked where they are read.

A file may hold JSON of the right syntax and the wrong shape: metrics as a list, a provenance
`source` that is a string, an optimizer binding whose `file` is a number. Each document has one
function here, called by `Header.training()` and `Header.provenance()`, so that `inspect`,
`verify` and loading all see the same checked document, and a malformed one is our HeaderError
naming the key, never a foreign exception further on. Keys a later ckptfmt may add are allowed;
the keys this one knows must have their types.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from ..errors import HeaderError
from ..io.files import check_plain_name

__all__ = ["check_binding", "check_provenance", "check_training"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _fail(document: str, where: str, expected: str, value: Any, path) -> HeaderError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return HeaderError(
        f"metadata {document!r}: {where} must be {expected}, not {shown}; the file is damaged or was "
        "not written by ckptfmt",
        path=path,
    )


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_binding(binding: Any, *, document: str, key: str, path: str | os.PathLike | None) -> dict[str, str]:
    """`{"file": plain name in the same folder, "sha256": hex digest}`, as a checkpoint binds a
    companion file."""
    if not isinstance(binding, dict) or set(binding) - {"file", "sha256"} or "file" not in binding:
        raise _fail(document, key, 'an object {"file": ..., "sha256": ...}', binding, path)
    check_plain_name(binding["file"], key=f"metadata {document!r}: {key}.file", path=path, error=HeaderError)
    if not isinstance(binding.get("sha256"), str) or not _SHA256.fullmatch(binding["sha256"]):
        raise _fail(document, f"{key}.sha256", "a sha256 hex digest", binding.get("sha256"), path)
    return binding


def check_training(training: dict[str, Any], *, path: str | os.PathLike | None, document: str = "ckptfmt.training") -> dict[str, Any]:
    """The training record: epoch and global_step counts, metrics numbers by name, companion
    bindings."""
    for key in ("epoch", "global_step"):
        if key in training and training[key] is not None and not _count(training[key]):
            raise _fail(document, key, "a non-negative int", training[key], path)
    metrics = training.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise _fail(document, "metrics", "an object of numbers by name", metrics, path)
        for name, value in metrics.items():
            if value is not None and not _number(value):
                raise _fail(document, f"metrics[{name!r}]", "a number", value, path)
    for key in ("optimizer", "scheduler", "scaler"):
        if training.get(key) is not None:
            check_binding(training[key], document=document, key=key, path=path)
    return training


_SOURCE_TEXT = ("file", "sha256", "serialization", "state_dict_key", "pickled_model")
_SOURCE_LISTS = ("stripped_prefixes", "read_as_plain")
_IDENTIFIED_TEXT = ("chosen", "probe")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def check_provenance(provenance: dict[str, Any], *, path: str | os.PathLike | None, document: str = "ckptfmt.provenance") -> dict[str, Any]:
    """When and by what a file was written; for a conversion, its source, cast, options, and the
    config identified among twins."""
    for key in ("created_at", "ckptfmt", "torch"):
        if key in provenance and not isinstance(provenance[key], str):
            raise _fail(document, key, "a string", provenance[key], path)
    source = provenance.get("source")
    if source is not None:
        if not isinstance(source, dict):
            raise _fail(document, "source", "an object", source, path)
        for key in _SOURCE_TEXT:
            if key in source and source[key] is not None and not isinstance(source[key], str):
                raise _fail(document, f"source.{key}", "a string", source[key], path)
        for key in _SOURCE_LISTS:
            if source.get(key) is not None and not _strings(source[key]):
                raise _fail(document, f"source.{key}", "a list of strings", source[key], path)
    identified = provenance.get("identified")
    if identified is not None:
        if not isinstance(identified, dict):
            raise _fail(document, "identified", 'an object {"chosen": ..., "twins": [...], "probe": ...}', identified,
                        path)
        for key in _IDENTIFIED_TEXT:
            if key in identified and not isinstance(identified[key], str):
                raise _fail(document, f"identified.{key}", "a string", identified[key], path)
        if "twins" in identified and not _strings(identified["twins"]):
            raise _fail(document, "identified.twins", "a list of strings", identified["twins"], path)
    cast = provenance.get("cast")
    if cast is not None:
        if not isinstance(cast, dict) or not isinstance(cast.get("to"), str):
            raise _fail(document, "cast", 'an object {"to": dtype, "from": {dtype: count}}', cast, path)
        counts = cast.get("from", {})
        if not isinstance(counts, dict) or not all(isinstance(k, str) and _count(v) for k, v in counts.items()):
            raise _fail(document, "cast.from", "an object of counts by dtype", counts, path)
        overflowed = cast.get("overflowed", {})
        if not isinstance(overflowed, dict) or not all(
                isinstance(k, str) and type(v) in (int, float) for k, v in overflowed.items()):
            raise _fail(document, "cast.overflowed", "an object of magnitudes by tensor", overflowed, path)
    options = provenance.get("options")
    if options is not None and not isinstance(options, dict):
        raise _fail(document, "options", "an object of the conversion's options", options, path)
    return provenance
