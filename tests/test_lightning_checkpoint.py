"""`ckptfmt.lightning.ModelCheckpoint` with a real `lightning.Trainer` on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

import ckptfmt

lightning = pytest.importorskip("lightning")
from ckptfmt.lightning import ModelCheckpoint, read_lightning_checkpoint  # noqa: E402


class LitRegressor(lightning.LightningModule):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)]


@pytest.fixture(scope="module")
def registered():
    ckptfmt.register_model("lit_regressor")(LitRegressor)
    return LitRegressor


def _data() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(callback, **limits) -> lightning.Trainer:
    return lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback], deterministic=True, **limits)


def test_a_run_stopped_and_resumed_through_the_callback_ends_as_an_uninterrupted_one(registered, tmp_path):
    """Stopped after 8 steps (2 epochs), resumed in a new Trainer with a new callback on the same
    folder and a module of other weights: the same weights, optimizer and scheduler states,
    epoch and global step as a run of 16 steps that never stopped."""
    torch.manual_seed(0)
    whole = registered()
    uninterrupted = _trainer(ModelCheckpoint(tmp_path / "whole"), max_epochs=4)
    uninterrupted.fit(whole, _data())

    torch.manual_seed(0)
    _trainer(ModelCheckpoint(tmp_path / "run"), max_epochs=2).fit(registered(), _data())
    torch.manual_seed(1)
    resumed_module = registered()
    checkpoint = ModelCheckpoint(tmp_path / "run")
    assert checkpoint.latest == tmp_path / "run/step-00000008.safetensors"
    resumed = _trainer(checkpoint, max_epochs=4)
    resumed.fit(resumed_module, _data(), ckpt_path=checkpoint.latest)

    assert (resumed.current_epoch, resumed.global_step) == (uninterrupted.current_epoch, uninterrupted.global_step) == (4, 16)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed_module.state_dict().values()))
    expected, got = uninterrupted.optimizers[0].state_dict(), resumed.optimizers[0].state_dict()
    assert expected["param_groups"] == got["param_groups"]
    assert all(torch.equal(expected["state"][i][name], got["state"][i][name])
               for i in expected["state"] for name in expected["state"][i])
    assert (resumed.lr_scheduler_configs[0].scheduler.state_dict()
            == uninterrupted.lr_scheduler_configs[0].scheduler.state_dict())
    assert checkpoint.latest == tmp_path / "run/step-00000016.safetensors"
    assert ckptfmt.verify(checkpoint.latest).ok


def test_the_callback_keeps_the_top_k_by_the_monitored_metric(registered, tmp_path):
    checkpoint = ModelCheckpoint(tmp_path, monitor="train_loss", mode="min", save_top_k=2, every_n_train_steps=2)
    torch.manual_seed(0)
    _trainer(checkpoint, max_epochs=3).fit(registered(), _data())

    kept = checkpoint.manager.checkpoints
    losses = [c.metrics["train_loss"] for c in kept]
    assert kept[-1].step == 12 and len(kept) <= 3
    assert checkpoint.best_model_path == str(min(kept, key=lambda c: c.metrics["train_loss"]).path)
    assert checkpoint.best_model_score.item() == min(losses)
    assert os.path.samefile(tmp_path / "best_model.safetensors", checkpoint.best_model_path)
    assert os.path.samefile(tmp_path / "last_model.safetensors", checkpoint.last_model_path)
    rebuilt = ckptfmt.load_model(tmp_path / "best_model.safetensors")  # the LightningModule, from the file alone
    assert type(rebuilt) is registered
    state = read_lightning_checkpoint(checkpoint.best_model_path)
    assert state["global_step"] == kept[losses.index(min(losses))].step
    assert {"loops", "callbacks", "optimizer_states", "lr_schedulers", "state_dict"} <= set(state)


def test_a_file_the_callback_did_not_write_is_refused_for_resuming_with_the_way_to_read_it(registered, tmp_path):
    path = ckptfmt.save(registered(), tmp_path / "plain.safetensors")
    with pytest.raises(ckptfmt.ConfigError, match="holds no Lightning trainer state") as raised:
        read_lightning_checkpoint(path)
    assert "ckptfmt.load_model" in raised.value.fix
