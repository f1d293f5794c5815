"""Resuming a sharded model's training (`load_training_state`): rank 0 reads the optimizer's
companion (one file, or shards and their index) with ckptfmt's own reader, and torch's
`set_optimizer_state_dict` sends each rank the part of it that its shards hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, ConfigError
from ..format.header import read_header
from ..format.index import resolve_checkpoint_path
from .rank_zero import on_rank0, shared

if TYPE_CHECKING:
    import torch

__all__ = ["load_training_state"]


def load_training_state(
    checkpoint_path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore, on every rank, the optimizer, scheduler and scaler saved with a checkpoint,
    and return its training record.

    Call it on every rank, after loading the model (`load_model`) and building the optimizer
    over its parameters as when saving. Rank 0 reads the companion (its digest checked) and
    torch's `set_optimizer_state_dict` (`full_state_dict=True, broadcast_from_rank0=True`)
    sends each rank the part of the state that belongs to its shards; the scheduler's and the
    scaler's states are sent whole. Rank 0 holds the full optimizer state while it does.
    A companion saved in one process (`ckptfmt.save(..., optimizer=)`) resumes the same way.

    Raises:
        CheckpointNotFoundError: one of them was asked for and not saved.
        IntegrityError, HeaderError: the companion is damaged or not the checkpoint's.
        ConfigError: a saved state does not fit the object given.

    Example:
        >>> model = ckptfmt.distributed.load_model(path, mesh=mesh).train()
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> ckptfmt.distributed.load_training_state(path, model, optimizer)["epoch"]
        3
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from ..format.companion import companion_path, read_training_state

    path = resolve_checkpoint_path(checkpoint_path)
    training = read_header(path).training()
    wanted = {name: target for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler))
              if target is not None}
    if not wanted:
        return training

    def read() -> dict[str, Any]:
        binding = training.get("optimizer")
        sections = read_training_state(companion_path(path, binding), sha256=binding["sha256"]) if binding else {}
        for name in wanted:
            if name not in sections:
                raise CheckpointNotFoundError(
                    f"was saved without {name} state; pass {name}= to ckptfmt.distributed.save to keep it", path=path
                )
        if optimizer is not None:
            sections["optimizer"] = _keyed_by_name(sections["optimizer"], model, optimizer, path)
        return sections

    sections = shared(on_rank0(read, share=lambda s: {k: v for k, v in s.items() if k in ("scheduler", "scaler")}))
    if optimizer is not None:
        # The broadcast gives tuples (AdamW's betas) back as lists: they are made tuples again, as
        # the optimizer has them, so that saving again writes the same companion.
        tuples = [{key for key, value in group.items() if isinstance(value, tuple)} for group in optimizer.param_groups]
        try:
            # strict=False: a parameter that never had a gradient has no state, which
            # `optimizer.load_state_dict` allows too; the param groups were checked on rank 0.
            set_optimizer_state_dict(
                model, optimizer, sections.get("optimizer", {}) if dist.get_rank() == 0 else {},
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
            )
        except Exception as exc:  # torch's own checks, whatever they raise
            raise _does_not_fit("optimizer", optimizer, exc, path) from None
        for group, keys in zip(optimizer.param_groups, tuples):
            group.update({key: tuple(group[key]) for key in keys if isinstance(group.get(key), list)})
    for name in ("scheduler", "scaler"):
        if name in wanted:
            _restore(name, wanted[name], sections[name], path)
    return training


def _keyed_by_name(state: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> Any:
    """An optimizer state dict keyed by parameter name, as `set_optimizer_state_dict` takes it.
    One saved in one process is keyed by position in the param groups: each position is
    named after the parameter that holds it in `optimizer`."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups) or any(
        not isinstance(saved, dict) or len(saved.get("params", ())) != len(live["params"])
        for saved, live in zip(groups, optimizer.param_groups)
    ):
        raise ConfigError(
            f"its saved optimizer state does not fit the {type(optimizer).__name__} given (other param groups or "
            "parameter counts); build it over the same parameters, in the same order, as when saved",
            path=path,
        )
    if all(isinstance(key, str) for group in groups for key in group["params"]):
        return state
    from ..config.registry import unwrap_model

    # The names torch's optimizer state dict gives: no torch.compile or DDP wrapper, and no
    # activation-checkpoint wrapper, in them.
    names = {id(parameter): name.replace("_checkpoint_wrapped_module.", "")
             for name, parameter in unwrap_model(model).named_parameters()}
    renamed: dict[Any, str] = {}
    for saved, live in zip(groups, optimizer.param_groups):
        renamed.update({key: names[id(parameter)] for key, parameter in zip(saved["params"], live["params"])})
    return {
        "state": {renamed[key]: value for key, value in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [renamed[key] for key in group["params"]]} for group in groups],
    }


def _restore(name: str, target: Any, state: Any, path: Path) -> None:
    try:
        target.load_state_dict(state)
    except Exception as exc:  # torch's own checks, whatever they raise
        raise _does_not_fit(name, target, exc, path) from None


def _does_not_fit(name: str, target: Any, exc: Exception, path: Path) -> ConfigError:
    """The error for saved state that torch refused to load into `target`, with the first line
    of torch's own words."""
    return ConfigError(
        f"its saved {name} state does not fit the {type(target).__name__} given ({type(exc).__name__}: "
        f"{(str(exc).strip().splitlines() or [''])[0][:200]}); build it as it was built when saved",
        path=path,
    )
