"""Lightning's `ModelCheckpoint`, writing ckptfmt files instead of pickles: `ModelCheckpoint`.

It saves when Lightning's would (`every_n_train_steps`, `every_n_epochs`, after validation when
the monitored metric comes from it), through a `CheckpointManager`: step files kept by the
monitored metric and by recency, `best_model.safetensors` and `last_model.safetensors` beside
them. What Lightning's own checkpoint holds is all there, without pickle: the module's weights in
the checkpoint, its arguments in the config (the LightningModule is a registered architecture,
as any model ckptfmt saves), the optimizers' and schedulers' states in the companion, and the
rest of the trainer's state (loop progress, callbacks' states, the precision plugin's scaler)
in the companion's `extra` section.

Resuming goes through Lightning's own restore: at `setup` the callback lets the trainer's
checkpoint IO read ckptfmt files (any other file is read as before), so
`trainer.fit(module, ckpt_path=checkpoint.latest)` (or `ckpt_path="best"`) restores the weights,
the optimizers, the schedulers, the epoch and the global step exactly as a `.ckpt` would.
The module's hyper-parameters are not copied into the companion: the config holds its arguments.

Only this module imports lightning; `import ckptfmt` does not.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins import CheckpointIO

from .errors import ConfigError
from .format.companion import companion_path, read_training_state
from .format.digest import check_digest
from .format.header import read_header
from .format.writer import read_state_dict
from .manager import CheckpointManager

__all__ = ["ModelCheckpoint", "read_lightning_checkpoint"]

# Lightning keeps the module's (and the datamodule's) hyper-parameters; a ckptfmt file keeps the
# module's arguments in its config, and resuming restores neither.
_HYPER_PARAMETERS = {
    key for owner in (pl.LightningModule, pl.LightningDataModule)
    for key in (owner.CHECKPOINT_HYPER_PARAMS_KEY, owner.CHECKPOINT_HYPER_PARAMS_NAME, owner.CHECKPOINT_HYPER_PARAMS_TYPE)
}


class ModelCheckpoint(Checkpoint):
    """Save ckptfmt checkpoints during `Trainer.fit`, as Lightning's `ModelCheckpoint` does.

    Args:
        dirpath: the folder of the checkpoints (a `CheckpointManager`'s).
        monitor: the logged metric that ranks checkpoints; None keeps the latest only.
        mode: "min" or "max", for `monitor`.
        save_top_k: how many of the best by `monitor` to keep (-1: all). Without `monitor`, how
            many of the latest (-1: all; 0 with `save_last`: the latest one, else none is saved).
        save_last: the latest checkpoint is always kept, as `last_model.safetensors`, since
            resuming needs it; `save_last=True` with `save_top_k=0` saves it alone.
        every_n_train_steps, every_n_epochs: when to save, as Lightning's; neither given: after
            every epoch.
        save_on_train_epoch_end: save at the end of the training epoch rather than after
            validation (default: as Lightning decides, by whether validation runs).
        asynchronous: write in the background, training blocked only while the state is copied.

    The LightningModule must be a registered architecture (`@ckptfmt.register_model("name")`),
    so that its checkpoints rebuild it.

    Example:
        >>> checkpoint = ModelCheckpoint("runs/lit", monitor="val_loss", save_top_k=2, every_n_epochs=1)
        >>> trainer = lightning.Trainer(max_epochs=10, callbacks=[checkpoint])
        >>> trainer.fit(module, data, ckpt_path=checkpoint.latest)   # resumes if there is a checkpoint
        >>> ckptfmt.load_model(checkpoint.best_model_path)
    """

    def __init__(
        self, dirpath: str | os.PathLike, *, monitor: str | None = None, mode: str = "min", save_top_k: int = 1,
        save_last: bool | None = None, every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None, asynchronous: bool = False,
    ) -> None:
        super().__init__()
        if type(save_top_k) is not int or save_top_k < -1:
            raise ConfigError(f"save_top_k must be an int of -1 or more, not {save_top_k!r}", path=dirpath)
        if every_n_train_steps and every_n_epochs:
            raise ConfigError("every_n_train_steps and every_n_epochs are exclusive; give one", path=dirpath)
        self.monitor, self.save_top_k, self.save_last = monitor, save_top_k, save_last
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (0 if every_n_train_steps else 1)
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._active = save_top_k != 0 or bool(save_last)
        keep_all = save_top_k == -1
        ranked = monitor is not None and save_top_k != 0
        self.manager = CheckpointManager(
            dirpath, keep_last=None if keep_all else (1 if ranked or not self._active else save_top_k or 1),
            keep_best=max(save_top_k, 0) if ranked else 0, metric=monitor if ranked else None, mode=mode,
            asynchronous=asynchronous,
        )
        self._deferred = False
        self._module: pl.LightningModule | None = None
        self._metrics: dict[str, float] = {}

    # -- what Lightning's ModelCheckpoint tells ----------------------------------------------------

    @property
    def dirpath(self) -> Path:
        return self.manager.directory

    @property
    def latest(self) -> Path | None:
        """The latest checkpoint, for `trainer.fit(ckpt_path=...)`; None when there is none."""
        return self.manager.latest

    @property
    def best(self) -> Path | None:
        """The best checkpoint by `monitor`; None without one."""
        return self.manager.best

    @property
    def best_model_path(self) -> str:
        """As Lightning's (what `ckpt_path="best"` reads): the best checkpoint, else ""."""
        return str(self.best or "")

    @property
    def last_model_path(self) -> str:
        return str(self.latest or "")

    @property
    def best_model_score(self) -> torch.Tensor | None:
        best = next((c for c in self.manager.checkpoints if c.path == self.best), None)
        return torch.tensor(best.metrics[self.monitor]) if best is not None else None

    # -- when to save (Lightning's triggers) -----------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning restores from ckpt_path: its checkpoint IO must read our files.
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, _CkptfmtCheckpointIO):
            trainer.strategy.checkpoint_io = _CkptfmtCheckpointIO(io)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            if self.monitor is not None and self.monitor not in trainer.callback_metrics:
                self._deferred = True  # the metric comes from validation: save once it has run
                return
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saves_on_train_epoch_end(trainer) and self._epoch_due(trainer):
            self._save(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._deferred:
            self._deferred = False
            self._save(trainer, pl_module)
        elif not self._saves_on_train_epoch_end(trainer) and self._epoch_due(trainer):
            self._save(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.manager.wait()

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _saves_on_train_epoch_end(self, trainer: pl.Trainer) -> bool:
        """Lightning's rule: after validation when it runs within the epoch, else at its end."""
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        if trainer.check_val_every_n_epoch != 1:
            return False
        batches = trainer.num_val_batches
        if (sum(batches) if isinstance(batches, list) else batches) == 0:
            return True
        return trainer.val_check_interval == 1.0

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        latest = self.manager.checkpoints[-1:] if self.manager.latest else []
        if (not self._active or trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit"
                or (latest and latest[0].step == trainer.global_step)):
            return
        self._module = pl_module
        self._metrics = _finite_metrics(trainer.callback_metrics)
        # Lightning gathers its state (and runs the on_save_checkpoint hooks) on every rank, and
        # rank 0 hands it to the checkpoint IO, which gives it back to `_write`.
        trainer.save_checkpoint(self.dirpath / f"step-{trainer.global_step:08d}.safetensors", weights_only=False,
                                storage_options=self)

    def _write(self, checkpoint: dict[str, Any]) -> None:
        state = {key: value for key, value in checkpoint.items() if key not in _HYPER_PARAMETERS}
        del state["state_dict"]  # the manager takes the module's own, as ckptfmt.save does
        self.manager.save(
            self._module, step=state.pop("global_step"), epoch=state.pop("epoch"), metrics=self._metrics,
            optimizer=state.pop("optimizer_states", None) or None, scheduler=state.pop("lr_schedulers", None) or None,
            extra=state,
        )


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint that `ModelCheckpoint` wrote, as the dict Lightning's own `.ckpt` holds (for
    Lightning's restore), its weights' and companion's digests checked.

    Raises:
        ConfigError: the file was not written by `ckptfmt.lightning.ModelCheckpoint`.
        IntegrityError: the weights or the companion do not match their digests.

    Example:
        >>> read_lightning_checkpoint("runs/lit/last_model.safetensors")["global_step"]
        1200
    """
    path = Path(path)
    header = read_header(path)
    check_digest(header)
    training = header.training()
    binding = training.get("optimizer")
    sections = read_training_state(companion_path(path, binding), sha256=binding["sha256"]) if binding else {}
    extra = sections.get("extra")
    if not isinstance(extra, dict) or "loops" not in extra:
        raise ConfigError(
            "holds no Lightning trainer state (it was not written by ckptfmt.lightning.ModelCheckpoint), so a "
            "Trainer cannot resume from it", path=path,
            fix="load its weights with ckptfmt.load_model, or its optimizer state with ckptfmt.load_training_state",
        )
    return {**extra, "state_dict": read_state_dict(path), "epoch": training.get("epoch"),
            "global_step": training.get("global_step"), "optimizer_states": sections.get("optimizer", []),
            "lr_schedulers": sections.get("scheduler", [])}


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The logged metrics a training record can hold: finite numbers (a NaN loss is left out)."""
    numbers = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            numbers[name] = value
    return numbers


class _CkptfmtCheckpointIO(CheckpointIO):
    """The trainer's checkpoint IO, reading ckptfmt files too and handing `ModelCheckpoint`'s saves
    to it; everything else goes to the IO it wraps."""

    def __init__(self, wrapped: CheckpointIO) -> None:
        self.wrapped = wrapped

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if isinstance(storage_options, ModelCheckpoint):
            storage_options._write(checkpoint)
        else:
            self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if str(path).endswith(".safetensors"):
            return read_lightning_checkpoint(path)
        return self.wrapped.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wrapped.teardown()
