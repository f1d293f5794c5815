"""What a conversion was asked to do: the dtype cast, checked so that numbers stay what they
were, and the options that shape the output, recorded in provenance so that a rerun with other
options is not taken for one already done.

A cast to a narrower dtype turns a finite value beyond the dtype's range into `inf` (1e6 in
fp16), and `verify` cannot tell: the digest is of what was written. So every floating-point
tensor is checked before anything is written, a bounded chunk at a time (convert streams, and
the check must not hold a second copy of a large tensor); one whose finite values would not stay
finite is refused, naming it and its largest magnitude, unless `allow_overflow` says to cast it
all the same, and then the cast record names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config.model_config import ModelConfig
from .errors import CkptfmtError, ConfigError, OutputExistsError, Words, cli_value, overrides_words
from .format.header import read_header
from .format.index import parse_size
from .format.writer import DTYPE_NAMES

__all__ = ["CAST_DTYPES", "cast_state_dict", "option_differences", "recorded_conversion", "refuse_other_options", "requested_options"]

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Elements checked at once: 16 MiB of fp32, whatever the tensor's size.
_CHUNK = 1 << 22


def cast_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: str, *, allow_overflow: bool = False,
                    path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every floating-point tensor cast to `dtype` ("fp16", "bf16", "fp32"), and the cast record
    that provenance keeps: `{"to": dtype, "from": {dtype: count}}`, plus `"overflowed": {tensor:
    largest magnitude}` when `allow_overflow` let finite values become infinite.

    Raises:
        ConfigError: a cast would turn finite values into inf (and `allow_overflow` is False);
            the message names the tensor and its largest magnitude. Nothing is cast.

    Example:
        >>> cast_state_dict({"w": torch.tensor([1e6])}, "fp16", allow_overflow=True)[1]
        {'to': 'F16', 'from': {'F32': 1}, 'overflowed': {'w': 1000000.0}}
    """
    to = CAST_DTYPES[dtype]
    overflowed = {name: magnitude for name, tensor in state_dict.items()
                  if tensor.is_floating_point() and tensor.dtype != to
                  and (magnitude := _overflow(tensor, to)) is not None}
    if overflowed and not allow_overflow:
        raise _overflow_error(overflowed, dtype, path)
    cast: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.dtype != to:
            key = DTYPE_NAMES[tensor.dtype]
            counts[key] = counts.get(key, 0) + 1
            tensor = tensor.to(to)
        cast[name] = tensor
    record: dict[str, Any] = {"to": DTYPE_NAMES[to], "from": counts}
    if overflowed:
        record["overflowed"] = overflowed
    return cast, record


def _overflow(tensor: torch.Tensor, to: torch.dtype) -> float | None:
    """The largest finite magnitude of `tensor` when casting it to `to` turns a finite value
    into inf, else None; read a chunk at a time."""
    if torch.finfo(to).max >= torch.finfo(tensor.dtype).max:
        return None  # every finite value fits
    flat = tensor.detach().reshape(-1)
    if not any(_overflows(flat[start:start + _CHUNK], to) for start in range(0, flat.numel(), _CHUNK)):
        return None
    return max(_largest_finite(flat[start:start + _CHUNK]) for start in range(0, flat.numel(), _CHUNK))


def _overflows(chunk: torch.Tensor, to: torch.dtype) -> bool:
    # Rounding is monotonic: when the chunk's two extremes are finite and stay finite, so does
    # every value between them. One pass (aminmax) instead of three element-wise ones.
    ends = torch.stack(torch.aminmax(chunk))
    if bool(torch.isfinite(ends).all()):
        return not bool(torch.isfinite(ends.to(to)).all())
    return bool((torch.isfinite(chunk) & ~torch.isfinite(chunk.to(to))).any())  # inf or NaN in it: each value


def _largest_finite(chunk: torch.Tensor) -> float:
    magnitudes = chunk.abs()
    return float(torch.where(torch.isfinite(magnitudes), magnitudes, 0).max())


def _overflow_error(overflowed: dict[str, float], dtype: str, path: str | os.PathLike | None) -> ConfigError:
    name, magnitude = next(iter(overflowed.items()))
    more = f" (and {len(overflowed) - 1} more tensor(s))" if len(overflowed) > 1 else ""
    limit = torch.finfo(CAST_DTYPES[dtype]).max
    said = (f"would turn finite values of tensor {name!r} into inf (its largest magnitude is {magnitude:g}; "
            f"{dtype} holds at most {limit:g}){more}, so nothing was written.")
    return ConfigError(
        Words(f"dtype={dtype!r} {said}", f"--dtype {dtype} {said}"),
        path=path,
        fix=Words("Keep the source's dtype or choose one that holds these values, or pass allow_overflow=True to "
                  "cast them to inf knowingly",
                  "Keep the source's dtype or choose one that holds these values, or pass --allow-overflow to "
                  "cast them to inf knowingly"),
    )


# The options that shape a conversion's output, as Python and the command line name them.
_OPTION_NAMES = {"dtype": "--dtype", "max_shard_size": "--max-shard-size", "config": "--config",
                 "overrides": "--set", "model_type": "--model-type"}


def requested_options(*, dtype: str | None = None, max_shard_size: int | str | None = None,
                      config: ModelConfig | str | os.PathLike | None = None,
                      overrides: Mapping[str, Any] | None = None, model_type: str | None = None) -> dict[str, Any]:
    """The options given to a conversion that shape its output, as provenance records them
    (`"options"`): only those given; a config by its sha256.

    Example:
        >>> requested_options(dtype="fp16", max_shard_size="2GB")
        {'dtype': 'fp16', 'max_shard_size': 2000000000}
    """
    options: dict[str, Any] = {}
    if dtype is not None:
        options["dtype"] = dtype
    if max_shard_size is not None:
        options["max_shard_size"] = parse_size(max_shard_size)
    if config is not None:
        options["config"] = _config_sha256(config)
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    if overrides:
        options["overrides"] = json.loads(json.dumps(overrides, sort_keys=True, default=str))
    if model_type is not None:
        options["model_type"] = model_type
    return options


def _config_sha256(config: ModelConfig | str | os.PathLike) -> str | None:
    """A config given as a file by its bytes, one given as a ModelConfig by its canonical JSON;
    None for a file that cannot be read (resolving it then says why)."""
    if isinstance(config, ModelConfig):
        text = json.dumps(config.to_dict(), sort_keys=True).encode()
    else:
        try:
            text = Path(config).read_bytes()
        except OSError:
            return None
    return hashlib.sha256(text).hexdigest()


def option_differences(recorded: Mapping[str, Any], asked: Mapping[str, Any]) -> list[Words]:
    """Each option whose value differs between a conversion's recorded options and those asked
    now, said in both spellings; empty when they agree.

    Example:
        >>> [str(d) for d in option_differences({"dtype": "fp32"}, {"dtype": "fp16"})]
        ["dtype: 'fp32' recorded, 'fp16' asked"]
    """
    differences = []
    for key, flag in _OPTION_NAMES.items():
        before, now = recorded.get(key), asked.get(key)
        if before == now:
            continue
        if key == "config":  # digests: which one says nothing to a reader
            said = ("none recorded, one asked" if before is None else
                    "one recorded, none asked" if now is None else "another one recorded")
            differences.append(Words(f"config: {said}", f"{flag}: {said}"))
        else:
            differences.append(Words(f"{key}: {_said(key, before)} recorded, {_said(key, now)} asked",
                                     f"{flag}: {_said(key, before, cli=True)} recorded, {_said(key, now, cli=True)} asked"))
    return differences


def _said(key: str, value: Any, *, cli: bool = False) -> str:
    if value is None:
        return "none"
    if key == "overrides" and isinstance(value, Mapping):
        return overrides_words(value).cli if cli else repr(dict(value))
    return cli_value(value) if cli else repr(value)


def recorded_conversion(output: Path) -> tuple[str, dict[str, Any]] | None:
    """The source sha256 and the options that an earlier conversion recorded in `output`, or
    None when it records no source (or cannot be read: then it is any existing file)."""
    try:
        provenance = read_header(output).provenance()
    except CkptfmtError:
        return None
    sha256 = provenance.get("source", {}).get("sha256")
    return (sha256, provenance.get("options", {})) if sha256 is not None else None


def refuse_other_options(output: Path, differences: list[Words]) -> OutputExistsError:
    """The error for an output converted from the same source with other options."""
    return OutputExistsError(
        "already exists, converted from the same source with other options (" + Words.joined("; ", differences) + ")",
        path=output,
        fix=Words("pass force=True to convert it again over it", "pass --force to convert it again over it"),
    )
