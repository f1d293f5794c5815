"""Rank 0's part of a distributed operation, and telling the other ranks how it went, with
torch's `broadcast_object_list`: an error on rank 0 is raised on every rank, so that no rank
goes on to wait for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import CkptfmtError

__all__ = ["on_rank0", "shared"]



def on_rank0(work: Callable[[], Any], *, share: Callable[[Any], Any] = lambda result: result,
             group: Any = None) -> tuple:
    """Run `work` on rank 0 and tell every rank how it went: `(result on rank 0, shared)`,
    where `shared` is `share(result)`, sent to every rank. An error on rank 0 is raised on
    every rank (rank 0 raises its own), so that no rank goes on to wait for the others. `group`: the
    process group to tell them through (the default one when None).

    Example:
        >>> result, told = on_rank0(lambda: write_index(...))
    """
    import torch.distributed as dist

    outcome: list[Any] = [None]
    result = error = None
    if dist.get_rank() == 0:
        try:
            result = work()
            outcome = [("ok", share(result))]
        except BaseException as exc:
            error = exc
            # Our error travels whole (its class and fields, the fix in both spellings); anything
            # else, which may not pickle, as its text.
            failure = exc if isinstance(exc, CkptfmtError) else f"{type(exc).__name__}: {exc}"
            outcome = [("error", failure)]
    dist.broadcast_object_list(outcome, src=0, group=group)
    if error is not None:
        raise error
    status, told = outcome[0]
    if status == "error":
        raise told if isinstance(told, CkptfmtError) else CkptfmtError(f"rank 0 failed: {told}")
    return result, told


def shared(outcome: tuple) -> Any:
    """The result on rank 0, what rank 0 shared elsewhere."""
    import torch.distributed as dist

    result, told = outcome
    return result if dist.get_rank() == 0 else told
