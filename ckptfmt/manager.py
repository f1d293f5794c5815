"""A folder of checkpoints kept during training: `CheckpointManager`.

Checkpoints are named by step (`step-00001200.safetensors`, with its optimizer companion), each
written by `ckptfmt.save`, whose training record holds the step and the metrics. The folder is
its own record: a manager opened on it reads what it holds from the headers, and there is no
other database to drift from the files.

`last_model.safetensors` and `best_model.safetensors`, the names training scripts and tools
read, are the folder's stable entry points: hard links to the latest and the best step files
(copies where the file system has no hard links), each replaced in one step. A step file's
header binds its companion by name, so the manager keeps every step that an entry point names.

What is kept: the latest `keep_last` steps, and the best `keep_best` by the metric. Retention
runs only once a new checkpoint is committed and the entry points name it; a checkpoint is
deleted main file first, companion after. So a crash at any point leaves at least the kept set,
each checkpoint whole or its main file gone; the next manager opened on the folder removes
companions left without their main file and points the entry points at the right steps.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model, save
from .config.capture import unwrap_model
from .config.sidecar import SIDECAR_SUFFIX, read_sidecar, write_sidecar
from .errors import (
    CheckpointNotFoundError,
    CkptfmtError,
    ConfigError,
    HeaderError,
    OutputExistsError,
    ShapeMismatchError,
)
from .format.companion import OPTIMIZER_SUFFIX, load_training_state
from .format.digest import check_digest
from .format.header import read_header
from .format.writer import read_state_dict
from .io.atomic import atomic_link
from .saving_async import SaveFuture, in_background

__all__ = ["BEST_NAME", "Checkpoint", "CheckpointManager", "LAST_NAME"]

logger = logging.getLogger("ckptfmt")

LAST_NAME = "last_model.safetensors"
BEST_NAME = "best_model.safetensors"
_STEP_FILE = re.compile(r"step-(\d{8,})\.safetensors")
_STEP_COMPANION = re.compile(r"(step-\d{8,})" + re.escape(OPTIMIZER_SUFFIX))


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a manager's folder: its step, its metrics, its file."""

    step: int
    metrics: dict[str, float] = field(compare=False)
    path: Path


class CheckpointManager:
    """Keep the right checkpoints in a folder during training: the latest, and the best by a metric.

    Args:
        directory: the folder (created on the first save). Opened on a folder that holds
            checkpoints already, the manager knows them from their headers.
        keep_last: how many of the latest steps to keep (None: every one). At least 1: resuming
            needs the latest.
        keep_best: how many of the best by `metric` to keep beside them. With a metric, the best
            is always kept, for `best_model.safetensors` names it.
        metric: the name of the metric (as passed in `save(metrics=...)`) that ranks checkpoints.
        mode: "min" (a loss) or "max" (an accuracy, a Dice score): which end is best.
        asynchronous: `save` returns once the state is copied into host memory, and the write,
            the entry points and retention happen in the background (see `ckptfmt.async_save`);
            one save is in flight at a time, and the next `save` waits for it.

    Example:
        >>> manager = CheckpointManager("runs/joint", keep_last=2, keep_best=1, metric="dice", mode="max")
        >>> for step in range(100, 1001, 100):
        ...     train(model, optimizer, steps=100)
        ...     manager.save(model, step=step, metrics={"dice": evaluate(model)}, optimizer=optimizer)
        >>> manager.best.name, manager.latest.name
        ('step-00000700.safetensors', 'step-00001000.safetensors')
        >>> manager.restore(model, optimizer=optimizer, which="best")
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep_last: int | None = 1, keep_best: int = 0,
        metric: str | None = None, mode: str = "min", asynchronous: bool = False,
    ) -> None:
        self.directory = Path(directory)
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise ConfigError(f"keep_last must be an int of at least 1 (the latest is kept for resuming), or None "
                              f"to keep every checkpoint, not {keep_last!r}", path=self.directory)
        if type(keep_best) is not int or keep_best < 0:
            raise ConfigError(f"keep_best must be a non-negative int, not {keep_best!r}", path=self.directory)
        if keep_best and metric is None:
            raise ConfigError(f"keep_best={keep_best} needs the metric that ranks the checkpoints",
                              path=self.directory, fix="pass metric='NAME' (a key of the metrics given to save)")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', not {mode!r}", path=self.directory)
        self.keep_last, self.keep_best, self.metric, self.mode = keep_last, keep_best, metric, mode
        self.asynchronous = asynchronous
        self._lock = threading.Lock()
        self._future: SaveFuture | None = None
        self._checkpoints = self._read_folder()
        self._tidy()

    # -- what the folder holds ----------------------------------------------------------------

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The committed checkpoints, oldest first."""
        with self._lock:
            return list(self._checkpoints)

    @property
    def latest(self) -> Path | None:
        """The file of the latest step, or None before the first save."""
        with self._lock:
            return self._checkpoints[-1].path if self._checkpoints else None

    @property
    def best(self) -> Path | None:
        """The file of the best checkpoint by the metric, or None (no metric, or none has it)."""
        with self._lock:
            ranked = self._ranked(self._checkpoints)
            return ranked[0].path if ranked else None

    # -- saving ---------------------------------------------------------------------------------

    def save(
        self, model: torch.nn.Module, *, step: int, metrics: dict[str, float] | None = None,
        optimizer: Any = None, scheduler: Any = None, scaler: Any = None, **options: Any,
    ) -> Path:
        """Save a checkpoint of `step`, then point the entry points at it and apply retention.

        Args:
            model: the model, as for `ckptfmt.save`.
            step: the optimizer steps taken; later than every checkpoint of the folder.
            metrics: numbers by name, kept in the header; `metric` ranks the checkpoints by one.
            optimizer, scheduler, scaler: their states go to the checkpoint's companion.
            **options: the other options of `ckptfmt.save` (epoch, extra, the config's fields).

        Returns:
            The checkpoint's path. With `asynchronous=True` it is being written when this
            returns: `wait()` waits for it, and the next `save` does too.

        Raises:
            ConfigError: `step` is not after the latest checkpoint's.
            CkptfmtError: what `ckptfmt.save` raises; with `asynchronous=True`, that of the
                save before (from this call, or from `wait()`).
        """
        self.wait()
        if type(step) is not int or step < 0:
            raise ConfigError(f"step must be a non-negative int, not {step!r}", path=self.directory)
        path = self.directory / f"step-{step:08d}.safetensors"
        latest = self.checkpoints[-1] if self._checkpoints else None
        if latest is not None and step <= latest.step:
            if step == latest.step:
                raise OutputExistsError(f"holds a checkpoint of step {step} already", path=path,
                                        fix="save each step once; the manager keeps the latest")
            raise ConfigError(
                f"step {step} is not after the latest checkpoint's (step {latest.step}, {latest.path.name}); "
                "the steps of a folder only go forward", path=self.directory,
                fix="resume from the latest (restore()), or save the new run into another folder",
            )
        options = {**options, "global_step": step, "metrics": metrics}
        state = {name: value for name, value in (("optimizer", optimizer), ("scheduler", scheduler),
                                                 ("scaler", scaler)) if value is not None}
        if not self.asynchronous:
            self._commit(save(model, path, **state, **options))
            return path

        def write(copy: dict[str, Any]) -> None:
            self._commit(save(model, path, state_dict=copy.pop("model"), **copy, **options))

        self._future = in_background(path, {"model": unwrap_model(model).state_dict(), **state}, write)
        return path

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its error if it failed."""
        future, self._future = self._future, None
        if future is not None:
            future.result()

    # -- restoring ------------------------------------------------------------------------------

    def restore(
        self, model: torch.nn.Module | None = None, *, optimizer: Any = None, scheduler: Any = None,
        scaler: Any = None, which: str | int = "latest",
    ) -> torch.nn.Module:
        """Load a checkpoint's weights into `model` (or a model rebuilt from the file, in train
        mode, when None), and its training state into the optimizer, scheduler and scaler given.

        Args:
            which: "latest", "best", or a step.

        Returns:
            The model.

        Raises:
            CheckpointNotFoundError: no such checkpoint in the folder.
            ShapeMismatchError: the model's tensors do not fit the checkpoint's.
            IntegrityError: the weights or the companion do not match their digests.
        """
        self.wait()
        checkpoint = self._select(which)
        if model is None:
            model = load_model(checkpoint.path, verify=True).train()
        else:
            header = read_header(checkpoint.path)
            check_digest(header)
            try:
                unwrap_model(model).load_state_dict(read_state_dict(checkpoint.path))
            except RuntimeError as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise ShapeMismatchError(f"does not fit the model given ({first})", path=checkpoint.path) from None
        if any(value is not None for value in (optimizer, scheduler, scaler)):
            load_training_state(checkpoint.path, optimizer, scheduler=scheduler, scaler=scaler)
        return model

    def _select(self, which: str | int) -> Checkpoint:
        checkpoints = self.checkpoints
        if which == "latest":
            found = checkpoints[-1:]
        elif which == "best":
            found = self._ranked(checkpoints)[:1]
        elif type(which) is int:
            found = [c for c in checkpoints if c.step == which]
        else:
            raise ConfigError(f"which must be 'latest', 'best' or a step, not {which!r}", path=self.directory)
        if not found:
            steps = ", ".join(str(c.step) for c in checkpoints) or "none"
            raise CheckpointNotFoundError(f"holds no {which if type(which) is str else f'step {which}'} checkpoint "
                                          f"(steps: {steps})", path=self.directory)
        return found[0]

    # -- retention --------------------------------------------------------------------------------

    def _ranked(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        """The checkpoints that have the metric, best first; of equal values, the earlier."""
        if self.metric is None:
            return []
        scored = [c for c in checkpoints if isinstance(c.metrics.get(self.metric), (int, float))
                  and math.isfinite(c.metrics[self.metric])]
        sign = 1 if self.mode == "min" else -1
        return sorted(scored, key=lambda c: (sign * c.metrics[self.metric], c.step))

    def _kept(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        latest = checkpoints if self.keep_last is None else checkpoints[-self.keep_last:]
        best = self._ranked(checkpoints)[:max(self.keep_best, 1)] if self.metric else []
        return [c for c in checkpoints if c in latest or c in best]

    def _commit(self, path: Path) -> None:
        """A checkpoint is written: record it, point the entry points at it, then retention."""
        checkpoint = _read_checkpoint(path)
        with self._lock:
            self._checkpoints = sorted([*self._checkpoints, checkpoint], key=lambda c: c.step)
            checkpoints = list(self._checkpoints)
        self._point_entries(checkpoints)
        kept = self._kept(checkpoints)
        for each in checkpoints:
            if each not in kept:
                _delete(each)
                with self._lock:
                    self._checkpoints.remove(each)
        self._unbind_missing()

    def _point_entries(self, checkpoints: list[Checkpoint]) -> None:
        targets = {LAST_NAME: checkpoints[-1:], BEST_NAME: self._ranked(checkpoints)[:1]}
        for name, target in targets.items():
            if not target:
                continue
            entry = self.directory / name
            if entry.exists() and os.path.samefile(entry, target[0].path):
                continue
            atomic_link(target[0].path, entry)
            sidecar = read_sidecar(self.directory)
            digest = read_header(entry).weights_sha256
            if sidecar is not None and sidecar.weights.get(name) != digest:
                write_sidecar(self.directory, sidecar.config, name, digest)

    def _unbind_missing(self) -> None:
        """The folder's sidecar binds the step files that are there, and no other: a deleted
        step's binding would name weights that `verify` of the folder cannot find."""
        sidecar = read_sidecar(self.directory)
        if sidecar is None:
            return
        gone = {name for name in sidecar.weights
                if _STEP_FILE.fullmatch(name) and not (self.directory / name).exists()}
        if gone:
            write_sidecar(self.directory, sidecar.config, unbind=gone)

    # -- opening ---------------------------------------------------------------------------------

    def _read_folder(self) -> list[Checkpoint]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        return sorted((_read_checkpoint(self.directory / name) for name in names if _STEP_FILE.fullmatch(name)),
                      key=lambda c: c.step)

    def _tidy(self) -> None:
        """Undo what a crash left: companions whose checkpoint's main file is gone, entry points
        that name another step than they should. Retention waits for the next save: this
        manager's settings may keep less than the run that wrote the folder."""
        if not self.directory.is_dir():
            return
        steps = {c.path.name.removesuffix(".safetensors") for c in self._checkpoints}
        try:
            for name in sorted(os.listdir(self.directory)):
                orphan = _STEP_COMPANION.fullmatch(name)
                if orphan and orphan.group(1) not in steps:
                    (self.directory / name).unlink()
            if self._checkpoints:
                self._point_entries(self._checkpoints)
            self._unbind_missing()
        except (OSError, CkptfmtError) as exc:  # a read-only folder still serves restore()
            logger.warning("%s: could not tidy the folder (%s); its checkpoints are as listed", self.directory, exc)


def _read_checkpoint(path: Path) -> Checkpoint:
    training = read_header(path).training()
    step = training.get("global_step")
    if step is None:
        raise HeaderError(
            "has no step (global_step) in its training record, so a CheckpointManager cannot place it",
            path=path, fix="move it out of the manager's folder, or re-save it with ckptfmt.save(..., global_step=N)",
        )
    return Checkpoint(step=step, metrics=dict(training.get("metrics") or {}), path=path)


def _delete(checkpoint: Checkpoint) -> None:
    """Main file first: once it is gone the checkpoint is gone, and a companion left behind by a
    crash is an orphan the next opening removes (and the folder's sidecar's binding of it, which
    retention drops after)."""
    checkpoint.path.unlink(missing_ok=True)
    stem = checkpoint.path.name.removesuffix(".safetensors")
    for name in (stem + OPTIMIZER_SUFFIX, stem + SIDECAR_SUFFIX):
        checkpoint.path.with_name(name).unlink(missing_ok=True)
