"""Which architecture a bare state dict is, read off its tensors.

Each registered architecture's `infer_config` is asked, in two rounds: the user's own and
ckptfmt's built-in ones first, then the fallbacks (the adapters of the field's libraries), so
that a library is consulted only when nothing more specific recognises the weights. What
recognises them are the candidates. One candidate is the answer. Several (twins: the same
tensor names and shapes) are told apart by a probe: the file's weights are loaded into each and
run on one fixed input. When every output is exactly equal, the candidates compute the same
function, the most preferred is chosen and the others are recorded; when they differ, or the
probe cannot run, the file is refused with the candidates listed. Never a guess.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config.model_config import ModelConfig
from ..config.registry import ModelEntry, get_model_entry, registered_model_types
from ..errors import (
    AmbiguousArchitectureError,
    ArchitectureNotRecognisedError,
    CkptfmtError,
    MissingDependencyError,
    PluginError,
    Words,
    overrides_words,
)

__all__ = ["Identification", "candidate_configs", "identify", "infer_model_config"]

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class Identification:
    """The identified config, the twins it was chosen over (same function, by the probe), and
    the prefix under which the network sits in the state dict ("" for the whole)."""

    config: ModelConfig
    twins: list[ModelConfig] = field(default_factory=list)
    prefix: str = ""

    def record(self) -> dict[str, Any] | None:
        """What provenance keeps of the choice, or None when there was no choice to make."""
        if not self.twins:
            return None
        return {
            "chosen": self.config.summary(),
            "twins": [twin.summary() for twin in self.twins],
            "probe": "the same weights gave exactly equal outputs in every candidate",
        }


def candidate_configs(
    shapes: Shapes, *, model_type: str | None = None, path: str | os.PathLike | None = None,
    failures: list[str] | None = None,
) -> list[ModelConfig]:
    """Every config that a registered architecture's infer_config reads off these shapes, most
    preferred first (see the module's docstring for the order).

    Raises:
        ArchitectureNotRecognisedError: none does; the message gives each one's reason.
    """
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    reasons: list[str] = []
    not_installed: list[str] = []  # architectures whose library is missing: said once, short
    entries = _entries([model_type] if model_type else registered_model_types(), reasons, failures, strict=bool(model_type))
    for fallback in (False, True):
        found: list[tuple[int, str, ModelConfig]] = []
        for entry in entries:
            if entry.fallback != fallback:
                continue
            for config in _ask(entry, shapes, reasons, failures, not_installed, strict=bool(model_type)):
                found.append((entry.preference, entry.name, config))
        if found:
            found.sort(key=lambda item: (item[0], item[1]))
            return [config for _, _, config in found]
    if not_installed:
        reasons.append(f"not considered: {', '.join(not_installed)} (not installed)")
    raise ArchitectureNotRecognisedError(
        "no registered architecture recognises these weights ("
        + (Words.joined("; ", reasons) if reasons else "none registered") + ")",
        path=path,
    )


def _entries(names: list[str], reasons: list[str], failures: list[str] | None, *, strict: bool) -> list[ModelEntry]:
    entries = []
    for name in names:
        try:
            entries.append(get_model_entry(name))
        except CkptfmtError as exc:
            if strict:
                raise
            reasons.append(f"{name}: " + exc.message_words)
            # A plugin that failed to import was said once by the registry, not once per file.
            if failures is not None and not isinstance(exc, PluginError):
                failures.append(exc.message_words)
    return entries


def _ask(entry: ModelEntry, shapes: dict, reasons: list[str], failures: list[str] | None, not_installed: list[str],
         *, strict: bool) -> list[ModelConfig]:
    if entry.infer_config is None:
        reasons.append(f"{entry.name}: registers no infer_config")
        return []
    try:
        found = entry.infer_config(shapes)
        return [ModelConfig(entry.name, **params) for params in (found if isinstance(found, list) else [found])]
    except ArchitectureNotRecognisedError as exc:
        reasons.append(f"{entry.name}: " + exc.message_words)
    except MissingDependencyError:
        if strict:
            raise
        not_installed.append(entry.name)
    except CkptfmtError as exc:
        if strict:
            raise
        reasons.append(f"{entry.name}: " + exc.message_words)
        if failures is not None:
            failures.append(f"model_type {entry.name!r} failed on these weights: " + exc.message_words)
    except (Exception, SystemExit) as exc:  # a plugin's own code, sys.exit() included: its failure, not the batch's
        if strict:
            raise ArchitectureNotRecognisedError(f"model_type {entry.name!r}: infer_config raised {type(exc).__name__}: {exc}") from None
        message = f"infer_config raised {type(exc).__name__}: {exc}"
        reasons.append(f"{entry.name}: {message}")
        if failures is not None:
            failures.append(f"model_type {entry.name!r}: {message}")
    return []


def infer_model_config(
    shapes: Shapes, *, model_type: str | None = None, path: str | os.PathLike | None = None,
    failures: list[str] | None = None,
) -> ModelConfig:
    """The one config that the registered architectures read off tensor shapes alone.

    Args:
        shapes: tensor names to shape tuples.
        model_type: ask only this architecture.
        failures: where to record a plugin that failed (raised something other than
            ArchitectureNotRecognisedError); the others are still asked.

    Raises:
        ArchitectureNotRecognisedError: none recognises the shapes; the message gives each
            one's reason.
        AmbiguousArchitectureError: several do (twins); only `identify`, with the weights, can
            tell them apart.

    Example:
        >>> infer_model_config({name: tuple(t.shape) for name, t in model.state_dict().items()})
        ModelConfig('multitask', base_filters=4, depth=2, ...)
    """
    candidates = candidate_configs(shapes, model_type=model_type, path=path, failures=failures)
    if len(candidates) > 1:
        raise _ambiguous(candidates, "the shapes alone cannot tell them apart", path)
    return candidates[0]


def identify(
    state_dict: Mapping[str, Any], *, model_type: str | None = None, path: str | os.PathLike | None = None,
    failures: list[str] | None = None, prefixes: Sequence[str] = ("",),
) -> Identification:
    """The architecture of a state dict: its candidates by shape, then, for twins, the probe.

    Args:
        prefixes: where the network may sit, most likely first (see
            `layouts.candidate_prefixes`): the first whose tensors an architecture recognises
            holds the network, and `Identification.prefix` says which. Every architecture is
            asked about the whole first, so a network is never taken for a part of itself.

    Raises:
        ArchitectureNotRecognisedError: nothing recognises it (the reasons are the whole's).
        AmbiguousArchitectureError: twins that compute different functions, or that cannot be
            run; the message lists them and the option that settles it.

    Example:
        >>> identify(torch.load("unet.pth", weights_only=True)).config.summary()
        'multitask(base_filters=4, cls_num_classes=2, depth=2, in_channels=1, seg_out_channels=1)'
    """
    first_error = None
    for prefix in prefixes:
        network = {name[len(prefix):]: t for name, t in state_dict.items() if name.startswith(prefix)}
        if not network:
            continue
        shapes = {name: tuple(t.shape) for name, t in network.items()}
        try:
            # A plugin that fails is reported once, for the whole, not again for each part.
            candidates = candidate_configs(shapes, model_type=model_type, path=path,
                                           failures=failures if first_error is None else None)
        except ArchitectureNotRecognisedError as exc:
            first_error = first_error or exc
            continue
        if len(candidates) == 1:
            return Identification(candidates[0], prefix=prefix)
        same, reason = _probe(candidates, network)
        if not same:
            raise _ambiguous(candidates, reason, path)
        return Identification(candidates[0], candidates[1:], prefix=prefix)
    raise first_error or ArchitectureNotRecognisedError("holds no tensors to recognise", path=path)


def _ambiguous(candidates: list[ModelConfig], reason: str, path) -> AmbiguousArchitectureError:
    shown = "; ".join(config.summary() for config in candidates)
    first = candidates[0]
    return AmbiguousArchitectureError(
        f"fits {len(candidates)} architectures with the same tensor names and shapes ({shown}), and {reason}",
        path=path, candidates=[config.to_dict() for config in candidates],
        fix=Words(
            f"say which with model_type= and overrides=, e.g. "
            f"`model_type={first.model_type!r}, overrides={dict(sorted(first.params.items()))!r}`",
            f"say which with --model-type and --set, e.g. `--model-type {first.model_type} "
            f"{overrides_words(dict(sorted(first.params.items()))).cli}`",
        ),
    )


def _probe(candidates: list[ModelConfig], state_dict: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether every candidate, given these weights, computes exactly the same outputs on one
    fixed input; and if not, why."""
    import torch

    results = []
    x = None
    for config in candidates:
        entry = get_model_entry(config.model_type)
        task = entry.describe_task(config.params)
        if task is None:
            return False, f"{config.model_type} declares no task, so the probe cannot run it"
        if x is None:
            x = task.example_input(2, seed=0).to(next(iter(state_dict.values())).dtype)
        try:
            model = entry.build_on_meta(config.params)
            model.load_state_dict(dict(state_dict), strict=True, assign=True)
            with torch.no_grad():
                output = model.eval()(x)
        except (Exception, SystemExit) as exc:  # a candidate that cannot run these weights on the probe
            return False, f"the probe could not run {config.summary()} ({type(exc).__name__}: {str(exc)[:200]})"
        results.append(_flatten(output))
    first = results[0]
    for config, result in zip(candidates[1:], results[1:]):
        if len(result) != len(first) or not all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, result)
        ):
            return False, f"the probe gives different outputs for {candidates[0].summary()} and {config.summary()}"
    return True, ""


def _flatten(output: Any) -> list:
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _flatten(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten(item)]
    return [output]
