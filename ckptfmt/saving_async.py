"""Saving while training goes on: `async_save`, and the background saves it shares with
`CheckpointManager`.

The caller is blocked only while the state is copied into host memory (`staging`); the write
itself (digest, read back and compared, fsync, sidecar, the optimizer's companion) is
`ckptfmt.save`'s, run on a thread of its own, with the same atomicity: a crash during it leaves
the previous file whole. Each save has its own thread, not a daemon: the interpreter waits for
it at exit. It also waits before the thread pools that the writer syncs files with stop taking
work (which `atexit` would be too late for), through the hook `concurrent.futures` uses itself.

A failed save raises its error from `.result()`; if nobody asks for it, the next background save
raises it (one failure per call) and saves nothing, so that no failure passes unseen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import Any, TypeVar

import torch

from .checkpoint import safetensors_path, save
from .config.capture import unwrap_model
from .errors import WriteError
from .staging import StagingBuffer

__all__ = ["SaveFuture", "async_save", "in_background"]

T = TypeVar("T")

_lock = threading.Lock()
_in_flight: dict[Path, SaveFuture] = {}
_unreported: list[SaveFuture] = []  # failed, and nobody has asked for their error yet
_exit_hook: list[bool] = []


class SaveFuture(Future):
    """A `concurrent.futures.Future` of a background save, which remembers whether its outcome
    was asked for (`result()`, `exception()`), so that an error nobody asked for is raised by
    the next save instead."""

    asked = False

    def result(self, timeout: float | None = None) -> Any:
        self.asked = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.asked = True
        return super().exception(timeout)


def async_save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
    wait: bool = True,
    **options: Any,
) -> SaveFuture:
    """Save as `ckptfmt.save` does, in the background: return once the state is copied.

    The model's state dict and the optimizer's, scheduler's and scaler's states are copied into
    host memory (reused from the last save, pinned for CUDA tensors) before this returns, and
    written from there: train on at once, and the file holds the state at the call, bit for bit
    the tensors a blocking `ckptfmt.save` would have written.

    At most one save is in flight per path. A call for a path that is still being written waits
    for that save first (`wait=False` raises WriteError instead).

    Args:
        model, path, optimizer, scheduler, scaler, state_dict, extra: as for `ckptfmt.save`.
        wait: whether to wait for a save to the same path still in flight, or raise.
        **options: every other option of `ckptfmt.save` (config, epoch, metrics, global_step,
            overwrite, max_shard_size, and the config's fields).

    Returns:
        A `concurrent.futures.Future` whose `result()` is the path written (that of the index
        for shards), or raises what the save raised.

    Raises:
        WriteError: with `wait=False`, a save to `path` is still in flight.
        CkptfmtError: an earlier background save failed and nobody asked its future for the
            error; nothing is saved by this call.

    Example:
        >>> future = ckptfmt.async_save(model, "runs/step-1000.safetensors", optimizer=optimizer,
        ...                             epoch=3, global_step=1000)
        >>> optimizer.step()                  # the file gets the weights of the call
        >>> future.result()
        PosixPath('runs/step-1000.safetensors')
    """
    path = safetensors_path(path, stacklevel=3)
    state = {"model": state_dict if state_dict is not None else unwrap_model(model).state_dict()}
    for name, value in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler), ("extra", extra)):
        if value is not None:
            state[name] = value

    def write(copy: dict[str, Any]) -> Path:
        return save(model, path, state_dict=copy.pop("model"), **copy, **options)

    return in_background(path, state, write, wait=wait)


def in_background(path: Path, state: Mapping[str, Any], write: Callable[[dict[str, Any]], T], *,
                  wait: bool = True) -> SaveFuture:
    """Snapshot `state` (objects with a `state_dict()` are asked for it) and run `write(copy)` on
    a thread of its own, as the one save in flight for `path`; the future of what it returns.
    The mechanism of `async_save`, for the other background saves (a CheckpointManager's, a
    distributed one's) to share: the same waiting, the same reporting of errors, the same wait at
    exit."""
    raise_unreported()
    key = Path(os.path.abspath(path))
    future = _claim(key, path, wait=wait)
    buffer = None
    try:
        raise_unreported()  # the save waited for may have failed
        buffer = StagingBuffer.take()
        copy = buffer.snapshot({name: value.state_dict() if hasattr(value, "state_dict") else value
                                for name, value in state.items()})
    except BaseException as exc:
        _finish(key, buffer, future, exc, report=False)
        raise
    _register_exit_hook()
    threading.Thread(target=_run, args=(key, buffer, future, write, copy), name=f"ckptfmt-save {path.name}",
                     daemon=False).start()
    return future


def raise_unreported() -> None:
    """Raise the error of a background save that failed without anyone asking for it."""
    with _lock:
        failed = next((future for future in _unreported if not future.asked), None)
        _unreported[:] = [future for future in _unreported if not future.asked and future is not failed]
    if failed is not None:
        failed.result()


def wait_for_saves() -> None:
    """Wait until no background save is in flight (what the interpreter does at exit)."""
    while True:
        with _lock:
            pending = list(_in_flight.values())
        if not pending:
            return
        wait_for(pending)


def _claim(key: Path, path: Path, *, wait: bool) -> SaveFuture:
    while True:
        with _lock:
            previous = _in_flight.get(key)
            if previous is None:
                future = _in_flight[key] = SaveFuture()
                future.set_running_or_notify_cancel()
                return future
        if not wait:
            raise WriteError(
                "a save to it is still in flight",
                path=path, fix="wait for it (its future's result()), or call async_save with wait=True, which waits",
            )
        wait_for([previous])


def _run(key: Path, buffer: StagingBuffer, future: SaveFuture, write: Callable, copy: dict[str, Any]) -> None:
    try:
        result = write(copy)
    except BaseException as exc:
        _finish(key, buffer, future, exc, report=True)
    else:
        _finish(key, buffer, future, None, result=result)


def _finish(key: Path, buffer: StagingBuffer | None, future: SaveFuture, error: BaseException | None, *,
            report: bool = False, result: Any = None) -> None:
    """Free the path and the buffer for the next save, then settle the future: whoever waits on
    it finds both free."""
    if buffer is not None:
        buffer.give_back()
    with _lock:
        del _in_flight[key]
        if report:
            _unreported.append(future)
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _register_exit_hook() -> None:
    # threading's own exit hooks run before the interpreter joins threads, newest first: one
    # registered after concurrent.futures' (imported by the writer) waits for the saves before
    # its pools stop taking the writer's fsyncs.
    with _lock:
        if _exit_hook:
            return
        _exit_hook.append(True)
    threading._register_atexit(wait_for_saves)
