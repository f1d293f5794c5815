"""The layouts legacy checkpoints come in, and where each of their keys goes.

A legacy file holds a bare state dict, or a dict with the state dict under one key beside
everything else a training loop saved: a hand-written loop's `epoch`, `metrics`, `optimizer`,
`scheduler`, `scaler` and `args`; timm's `arch`, `args`, `amp_scaler`, `state_dict_ema`;
Lightning's `epoch`, `global_step`, `pytorch-lightning_version`, `hyper_parameters`,
`optimizer_states`, `lr_schedulers`, `callbacks`, `loops` and its precision plugin's scaler state.
With `unsafe_pickle`, it may hold a whole model (`torch.save(model)`), whose `state_dict()` is
taken.

Every other key goes to one place, and `destinations` says which:

- the weights: the state dict;
- the training record (JSON, in the header, shown by `inspect`): `epoch` and `global_step`,
  `metrics`, `hyper_parameters` under their own key, and any other value that is plain data
  (0-d tensors read as numbers) under `extra`;
- the companion (`NAME.optimizer.safetensors`): optimizer, scheduler and scaler states, and
  any other value that holds tensors, inf or non-string keys, exactly as it was;
- dropped, with the reason: what neither can hold (a set, bytes, an object of a class).

Besides, what the file records of its model is kept for the resolution (`resolve`) to use as a
config: `hyper_parameters` as plain data, and the arguments a pickled model of a registered
architecture was built with.

Reading never identifies. `module.` (DataParallel, DDP) and `_orig_mod.` (torch.compile) wrap a
model without changing it, and are stripped whenever every key carries them. Where else the
network sits (the whole, or a LightningModule's attribute of any name, or a wrapper inside one)
is not decided here: `candidate_prefixes` lists the places, identification chooses among them
once, and `LegacyCheckpoint.take_network` then moves the tensors outside the chosen one to the
companion, by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config.model_config import ModelConfig
from ..errors import CkptfmtError, LegacyCheckpointError
from ..format.companion import check_storable, unstorable_tensor
from ..io.jsondoc import MAX_INT_DIGITS, has_surrogate, plain_json

__all__ = ["LegacyCheckpoint", "STATE_DICT_KEYS", "candidate_prefixes", "unwrap"]

STATE_DICT_KEYS = (
    "state_dict", "model_state_dict", "model", "net", "network", "model_state", "weights",
    "params", "module", "generator",
)
# Keys whose value, when it has the shape of the state, goes to that section of the companion.
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim", "optimizer_state", "opt", "optimizer_states")
SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict", "lr_scheduler_state_dict", "sched",
                  "lr_schedulers")
# timm's NativeScaler writes amp_scaler; Lightning writes its precision plugin's scaler state
# under the plugin's class name.
SCALER_KEYS = ("scaler", "grad_scaler", "amp_scaler", "scaler_state_dict", "MixedPrecision", "MixedPrecisionPlugin",
               "NativeMixedPrecisionPlugin", "native_amp_scaling_state")
HYPER_PARAMETERS = "hyper_parameters"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A value whose JSON is larger goes to the companion: the header's metadata holds 1 MiB in all.
MAX_RECORD_VALUE_BYTES = 256 << 10
BARE = "(the whole file: a bare state dict)"


@dataclass
class LegacyCheckpoint:
    """What a legacy file held, unwrapped: the state dict, and where everything else goes."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    serialization: str = ""  # "torch zip" or "torch legacy (< 1.6)"
    sha256: str = ""
    # The training record's JSON: epoch, global_step, metrics, hyper_parameters, extra.
    training: dict[str, Any] = field(default_factory=dict)
    # The companion's sections (see training.SECTIONS), as they were.
    companion: dict[str, Any] = field(default_factory=dict)
    wrapper_key: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    # "weights", "config", "training", "companion" -> the file's keys that went there.
    destinations: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why it was not carried over
    conversions: list[str] = field(default_factory=list)  # what stand-ins turned into plain values
    # What the file records of its model: a pickled model's arguments (as its config), and the
    # hyper-parameters as plain data (whose arguments of an architecture may be the config).
    config: ModelConfig | None = None
    hyper_parameters: dict[str, Any] | None = None
    pickled_model: str | None = None  # the class of a whole pickled model
    notes: list[str] = field(default_factory=list)  # what the user should know
    # For a zip file read memory-mapped: each storage's data pointer -> its bytes' offset in the
    # file, checked against the zip records (see legacy.py), so that a writer copies tensors
    # from the file and never touches the mapping.
    mapped: dict[int, int] = field(default_factory=dict)
    # (device, inode, size, mtime) of the file that was read, to tell it from one put in its place.
    identity: tuple[int, int, int, int] | None = None

    def file_offset(self, tensor: torch.Tensor) -> int | None:
        """Where a contiguous tensor's bytes lie in the file, or None (not mapped, or strided)."""
        if not self.mapped or not tensor.is_contiguous() or tensor.numel() == 0:
            return None
        base = self.mapped.get(tensor.untyped_storage().data_ptr())
        return None if base is None else base + tensor.storage_offset() * tensor.element_size()

    @property
    def optimizer_state(self) -> Any:
        return self.companion.get("optimizer")

    def take_network(self, prefix: str) -> None:
        """The network is the tensors under `prefix` (an attribute of the module the file saved,
        chosen by identification), the prefix stripped. Tensors beside it (a loss's class
        weights, a metric's buffers) go to the companion, by their names, so nothing is lost."""
        if not prefix:
            return
        others = {name: tensor for name, tensor in self.state_dict.items() if not name.startswith(prefix)}
        self.state_dict = {name[len(prefix):]: tensor for name, tensor in self.state_dict.items()
                           if name.startswith(prefix)}
        self.stripped_prefixes.append(prefix)
        if others:
            _to_companion(self, f"tensors outside {prefix!r}", "extra", others)
            # Listed first, as they stood in the file: beside the network, before the other keys.
            moved = self.destinations.get("companion", [])
            if moved and moved[-1] == f"tensors outside {prefix!r}":
                moved.insert(0, moved.pop())
            self.notes.append(
                f"the network is the module's {prefix[:-1]!r}; its other tensors ({', '.join(sorted(others)[:5])}"
                f"{', ...' if len(others) > 5 else ''}) go to the companion"
            )


def unwrap(obj: Any, path: Path, *, conversions: list[str] | None = None) -> LegacyCheckpoint:
    """Sort what a legacy file held (already read into plain values and tensors) into a
    LegacyCheckpoint. Raises LegacyCheckpointError when it holds no state dict."""
    rest: dict[Any, Any] = {}
    wrapper = None
    if isinstance(obj, torch.nn.Module) or _is_state_dict(obj):
        found = obj
    elif isinstance(obj, dict):
        keys = [k for k in STATE_DICT_KEYS if _is_weights(obj.get(k))] or [k for k, v in obj.items() if _is_weights(v)]
        if not keys:
            shown = ", ".join(repr(k) for k in list(obj)[:10])
            raise LegacyCheckpointError(
                f"holds a dict with no state dict in it (keys: {shown}); expected tensors by name, "
                f"or under one of {', '.join(STATE_DICT_KEYS)}",
                path=path,
            )
        wrapper = keys[0]
        found, rest = obj[wrapper], {k: v for k, v in obj.items() if k != wrapper}
    else:
        raise LegacyCheckpointError(
            f"holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead", path=path
        )
    checkpoint = LegacyCheckpoint(path, {}, wrapper_key=wrapper, conversions=conversions or [])
    if isinstance(found, torch.nn.Module):
        _take_model(checkpoint, found)
    else:
        checkpoint.state_dict = dict(found)
    checkpoint.destinations["weights"] = [str(wrapper) if wrapper is not None else (
        "(the whole file: a pickled model)" if checkpoint.pickled_model else BARE)]
    for name, tensor in checkpoint.state_dict.items():
        # Refused here, as neither diff nor convert can read their bytes; a dtype safetensors
        # lacks is still shown by inspect, and refused by the writer with the cast to make.
        problem = unstorable_tensor(tensor, dtype=False)
        if problem is not None:
            raise LegacyCheckpointError(f"tensor {name!r} is {problem}", path=path)

    hyper_parameters = rest.pop(HYPER_PARAMETERS, None)
    plain_hyper_parameters = _record_value(hyper_parameters) if isinstance(hyper_parameters, dict) else _NOT_PLAIN
    if isinstance(plain_hyper_parameters, dict):
        checkpoint.hyper_parameters = plain_hyper_parameters
    checkpoint.stripped_prefixes = _strip_wrappers(checkpoint.state_dict)
    if hyper_parameters is not None:
        rest = {HYPER_PARAMETERS: hyper_parameters, **rest}
    for key, value in rest.items():
        _place(checkpoint, key, value)
    return checkpoint


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _is_weights(value: Any) -> bool:
    return _is_state_dict(value) or isinstance(value, torch.nn.Module)


def _take_model(checkpoint: LegacyCheckpoint, model: torch.nn.Module) -> None:
    """A whole pickled model (only an unsafe load builds one): its state dict, and its
    constructor arguments when a registered architecture recorded or recognises them."""
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    checkpoint.pickled_model = name
    checkpoint.state_dict = dict(model.state_dict())
    try:
        checkpoint.config = ModelConfig.from_model(model)
    except CkptfmtError as exc:
        checkpoint.notes.append(f"the pickled {name} gives no config (" + exc.message_words + ")")


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Strip the prefixes of wrappers that change nothing (DataParallel's and DDP's `module.`,
    torch.compile's `_orig_mod.`, nested in any order) while every key carries one."""
    stripped = []
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        rest = {k[len(prefix):]: v for k, v in state_dict.items()}
        state_dict.clear()
        state_dict.update(rest)
        stripped.append(prefix)
    return stripped


def candidate_prefixes(names: Iterable[str]) -> list[str]:
    """Where a network may sit among a state dict's tensor names, most likely first: the whole
    (""); each attribute holding tensors (a LightningModule keeps its network as `self.model`,
    `self.seg_model`, any name), larger groups first; and inside each, the one attribute that
    holds all of it (a wrapper kept in an attribute: `model.net.`, `model._orig_mod.`)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        head, dot, rest = name.partition(".")
        if dot:
            groups.setdefault(head + ".", []).append(rest)
    ordered = sorted(groups, key=lambda prefix: (-len(groups[prefix]), prefix))
    inner = []
    for prefix in ordered:
        heads = {rest.partition(".")[0] for rest in groups[prefix]}
        if len(heads) == 1 and all("." in rest for rest in groups[prefix]):
            inner.append(prefix + heads.pop() + ".")
    return ["", *ordered, *inner]


def _place(checkpoint: LegacyCheckpoint, key: Any, value: Any) -> None:
    name = str(key)
    section = _section(key, value)
    if section is not None and section not in checkpoint.companion:
        _to_companion(checkpoint, name, section, value)
        return
    plain = _record_value(value)
    if key in ("epoch", "global_step") and type(plain) is int and plain >= 0:
        checkpoint.training[key] = plain
    elif key == "metrics" and isinstance(plain, dict) and all(type(v) in (int, float) for v in plain.values()):
        checkpoint.training[key] = plain
    elif key == HYPER_PARAMETERS and isinstance(plain, dict) and _fits_record({key: plain}):
        checkpoint.training[key] = plain
    elif plain is not _NOT_PLAIN and _fits_record({"extra": {name: plain}}):
        checkpoint.training.setdefault("extra", {})[name] = plain
    elif plain is _NOT_PLAIN and isinstance(value, dict) and not _holds_tensors(value) \
            and (split := _split_plain(value, name))[0] and _fits_record({"extra": {name: split[0]}}):
        # One argument that JSON cannot hold (a set, say) costs that argument, not all of `args`;
        # a dict with tensors (an EMA's weights) goes to the companion whole.
        where = "hyper_parameters" if key == HYPER_PARAMETERS else "extra"
        if where == "extra":
            checkpoint.training.setdefault("extra", {})[name] = split[0]
        else:
            checkpoint.training[key] = split[0]
        for leaf, leaf_value in split[1].items():
            _to_companion(checkpoint, leaf, "extra", leaf_value)
    else:
        _to_companion(checkpoint, name, "extra", value)
        return
    checkpoint.destinations.setdefault("training", []).append(name)


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(item) for item in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensors(item) for item in value)


def _split_plain(value: dict, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dict's plain JSON part, nested dicts split alike; and the rest, by dotted name."""
    plain: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{where}.{key}"
        converted = _record_value(item) if isinstance(key, str) else _NOT_PLAIN
        if converted is not _NOT_PLAIN:
            plain[key] = converted
        elif isinstance(key, str) and isinstance(item, dict):
            plain[key], inner = _split_plain(item, name)
            rest.update(inner)
        else:
            rest[name] = item
    return plain, rest


def _to_companion(checkpoint: LegacyCheckpoint, name: str, section: str, value: Any) -> None:
    candidate = {name: value} if section == "extra" else value
    try:
        check_storable({section: candidate})
    except CkptfmtError as exc:
        checkpoint.dropped[name] = f"neither JSON nor the companion can hold it: {exc.message}"
        return
    if section == "extra":
        checkpoint.companion.setdefault("extra", {})[name] = value
    else:
        checkpoint.companion[section] = value
    checkpoint.destinations.setdefault("companion", []).append(name)


def _section(key: Any, value: Any) -> str | None:
    """The companion section a key's value belongs to, when it has that state's shape."""
    states = value if isinstance(value, list) and value else [value]
    if key in OPTIMIZER_KEYS and all(isinstance(s, dict) and {"state", "param_groups"} <= set(s) for s in states):
        return "optimizer"
    if key in SCHEDULER_KEYS and all(isinstance(s, dict) for s in states):
        return "scheduler"
    if key in SCALER_KEYS and isinstance(value, dict):
        return "scaler"
    return None


_NOT_PLAIN = object()


def _record_value(value: Any) -> Any:
    """`value` as plain JSON data (0-d tensors read as numbers), or _NOT_PLAIN."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or unstorable_tensor(value) is not None:
            return _NOT_PLAIN
        return _record_value(value.item())
    if isinstance(value, str) and has_surrogate(value):
        return _NOT_PLAIN  # not valid Unicode: no strict JSON reader takes it
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)  # "torch.bfloat16", "cuda:0": what a training script's arguments mean by them
    if isinstance(value, int):
        return int(value) if len(str(abs(value))) <= MAX_INT_DIGITS else _NOT_PLAIN
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else _NOT_PLAIN
    if isinstance(value, (list, tuple)):
        items = [_record_value(v) for v in value]
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return _NOT_PLAIN
        items = {k: _record_value(v) for k, v in value.items()}
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items.values()) else items
    return _NOT_PLAIN


def _fits_record(entry: dict[str, Any]) -> bool:
    """Whether an entry of the training record keeps to the header's JSON rules, and is small
    enough to leave room for the rest."""
    try:
        plain_json(entry, what="the training record")
    except CkptfmtError:
        return False
    return len(json.dumps(entry)) <= MAX_RECORD_VALUE_BYTES
