"""What `diff` computes: everything two checkpoints hold, compared; the CLI only renders it.

The config, the training record, the provenance (its dates are shown, not compared: two
conversions of one file differ in nothing else) and every tensor. Tensors of the same name with
another dtype are common tensors with a dtype change; `values` compares them after casting both
to the wider type. "Identical" means all of it.

Two files that record each tensor's digest (format 3) are compared by their headers: a tensor is
identical when its recorded digests are, and no tensor data is read, nor torch imported, unless
`values` asks for the differences of those that differ. The digests are taken as recorded;
`verify` is what checks the data against them.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config.model_config import ModelConfig, config_differences
from .errors import CheckpointNotFoundError

if TYPE_CHECKING:
    from .sources.source import Source

__all__ = ["diff"]

_DATES = ("created_at",)


@dataclass
class _Side:
    config: ModelConfig | None
    training: dict[str, Any]
    provenance: dict[str, Any] | None  # None for a source that is not ckptfmt's, which records none
    source: Source

    @functools.cached_property
    def sha256(self) -> str:
        """The source's own digest, which its conversion records; computed only when asked."""
        return self.source.sha256()

    @functools.cached_property
    def state_dict(self) -> dict[str, Any]:
        """The tensors, read (memory-mapped) only when a comparison needs their data."""
        return self.source.tensors()

    def digests(self) -> dict[str, str]:
        """Each tensor's own digest that the header records, by name (ties included)."""
        header = self.source.header
        if header is None:
            return {}
        aliases = header.aliases
        return {name: header.tensors[aliases.get(name, name)].digest for name in header.shapes()
                if header.tensors[aliases.get(name, name)].digest is not None}


def _read(path: Path) -> _Side:
    """One side of a diff: its tensors as they are stored, and the config the one resolution
    gives it (what load_model would build)."""
    from .resolve import read_source, resolve

    if not path.exists():
        raise CheckpointNotFoundError("no such file", path=path)
    resolution = resolve(read_source(path, light=True), check=False)
    header = resolution.header
    provenance = header.provenance() if header is not None and header.is_ckptfmt else None
    return _Side(resolution.config, resolution.source.training, provenance, resolution.source)


def _converted_from(source: _Side, converted: _Side) -> bool:
    """Whether `converted` records `source` (anything `convert` takes: a legacy file, a DCP
    folder, safetensors written by someone else) as what it was converted from: by the digest
    of the source that the conversion recorded."""
    recorded = (converted.provenance or {}).get("source") or {}
    return source.provenance is None and bool(recorded.get("sha256")) and recorded["sha256"] == source.sha256


def _flat(document: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(document, dict) and document:
        flat: dict[str, Any] = {}
        for key, value in document.items():
            flat.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) and value else f"{prefix}{key}"))
        return flat
    return {prefix.rstrip("."): document}


def _document_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    first, second = _flat(a) if a else {}, _flat(b) if b else {}
    return [
        f"{key}: {_shown(first, key)} != {_shown(second, key)}"
        for key in sorted(set(first) | set(second)) if first.get(key, _UNSET) != second.get(key, _UNSET)
    ]


_UNSET = object()


def _shown(document: dict[str, Any], key: str) -> str:
    return repr(document[key]) if key in document else "(not set)"


def _compare_tensors(a: _Side, b: _Side, values: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The common tensors whose shape changed, and each other common tensor's verdict: by the
    digests both headers record where they do, by the bytes otherwise."""
    shapes_a, shapes_b = a.source.shapes, b.source.shapes
    dtypes_a, dtypes_b = a.source.dtypes(), b.source.dtypes()
    digests_a, digests_b = a.digests(), b.digests()
    changed, tensors = [], []
    for name in sorted(set(shapes_a) & set(shapes_b)):
        if shapes_a[name] != shapes_b[name]:
            changed.append({"name": name, "a": [dtypes_a[name], list(shapes_a[name])],
                            "b": [dtypes_b[name], list(shapes_b[name])]})
            continue
        entry: dict[str, Any] = {"name": name}
        if dtypes_a[name] != dtypes_b[name]:
            entry["dtype"] = [dtypes_a[name], dtypes_b[name]]
            entry["identical"] = False
        elif name in digests_a and name in digests_b:
            entry["identical"] = digests_a[name] == digests_b[name]
        else:
            entry["identical"] = _same_bytes(a.state_dict[name], b.state_dict[name])
        if values and not entry["identical"] and math.prod(shapes_a[name]):
            entry["max_abs_diff"] = _max_abs_diff(a.state_dict[name], b.state_dict[name])
        tensors.append(entry)
    return changed, tensors


def _same_bytes(ta: Any, tb: Any) -> bool:
    import numpy as np

    from .format.writer import tensor_bytes

    return bool(np.array_equal(tensor_bytes(ta), tensor_bytes(tb)))


def _max_abs_diff(ta: Any, tb: Any) -> float:
    import torch

    wider = torch.promote_types(ta.dtype, tb.dtype)
    if wider.is_complex:
        return float((ta.to(wider) - tb.to(wider)).abs().max())
    return float((ta.to(wider).double() - tb.to(wider).double()).abs().max())


def diff(a: str | os.PathLike, b: str | os.PathLike, *, values: bool = False) -> dict[str, Any]:
    """Compare two checkpoints, .pth or .safetensors in any mix: config, training record,
    provenance and weights.

    Returns:
        A dict: `config`, `training`, `provenance` (lines `key: a != b`), `dates` (the creation
        dates, when they differ), `only_in_a`, `only_in_b`, `changed` (tensors whose shape
        changed), `tensors` (each common tensor: identical or not, its dtypes when they differ,
        with `values` the max absolute difference), `differs_in` (the parts that differ),
        `identical`, and `conversion`: when one is a source `convert` takes and the other records it as
        its source, what that records (the companion's binding is then no difference).

    Example:
        >>> d = diff("best_model.pth", "best_model.safetensors")
        >>> d["identical"], d["differs_in"]
        (True, [])
    """
    side_a, side_b = _read(Path(a)), _read(Path(b))
    if side_a.config is not None and side_b.config is not None:
        config = config_differences(side_a.config, side_b.config)
    elif (side_a.config is None) != (side_b.config is None):
        config = [f"config: {'none' if side_a.config is None else 'present'} != {'none' if side_b.config is None else 'present'}"]
    else:
        config = []
    # What a conversion itself adds (the companion's binding, provenance) is no difference of
    # the checkpoint: a file and its lossless conversion are identical, the provenance said aside.
    conversion = _converted_from(side_a, side_b) or _converted_from(side_b, side_a)
    training = _document_differences(*(
        {k: v for k, v in side.training.items() if not (conversion and k == "optimizer")} for side in (side_a, side_b)))
    provenance: list[str] = []
    dates = None
    if side_a.provenance is not None and side_b.provenance is not None:
        undated = [{k: v for k, v in side.provenance.items() if k not in _DATES} for side in (side_a, side_b)]
        provenance = _document_differences(*undated)
        created = [side.provenance.get("created_at") for side in (side_a, side_b)]
        if created[0] != created[1]:
            dates = {"a": created[0], "b": created[1]}
    changed, tensors = _compare_tensors(side_a, side_b, values)
    only_a = sorted(set(side_a.source.shapes) - set(side_b.source.shapes))
    only_b = sorted(set(side_b.source.shapes) - set(side_a.source.shapes))
    weights_differ = bool(only_a or only_b or changed or not all(t["identical"] for t in tensors))
    differs_in = [part for part, differs in (("config", config), ("training record", training),
                                              ("provenance", provenance), ("weights", weights_differ)) if differs]
    return {
        "a": str(a), "b": str(b),
        "config": config, "training": training, "provenance": provenance, "dates": dates,
        "only_in_a": only_a, "only_in_b": only_b,
        "changed": changed,
        "tensors": tensors,
        "differing": [t["name"] for t in tensors if not t["identical"]],
        "differs_in": differs_in,
        "identical": not differs_in,
        "conversion": (side_b.provenance if side_b.provenance is not None else side_a.provenance)["source"]
        if conversion else None,
    }
