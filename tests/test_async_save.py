"""Saving while training goes on: `ckptfmt.async_save` and the staging buffer it copies into."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import OutputExistsError, WriteError, read_header
from ckptfmt.format.companion import read_training_state
from ckptfmt.staging import StagingBuffer

from .helpers import run, small_model, state_dicts_bit_identical


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, _ = small_model(seed, base_filters=8, depth=3)
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=0.1)
    _step(model, optimizer)
    return model, optimizer


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    seg, cls = model(torch.rand(2, 1, 16, 16))
    (seg.mean() + cls.mean()).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_an_async_save_holds_the_state_at_the_call_while_the_model_trains_on(tmp_path):
    """The file of an async save whose model trains on at once has, bit for bit, the tensors
    (weights and optimizer state) of a blocking save made at the call."""
    model, optimizer = _trained()
    blocking = ckptfmt.save(model, tmp_path / "blocking/model.safetensors", optimizer=optimizer, epoch=1)
    future = ckptfmt.async_save(model, tmp_path / "async/model.safetensors", optimizer=optimizer, epoch=1)
    for _ in range(3):
        _step(model, optimizer)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1)

    assert future.result() == tmp_path / "async/model.safetensors"
    assert state_dicts_bit_identical(load_file(future.result()), load_file(blocking))
    assert read_header(future.result()).weights_sha256 == read_header(blocking).weights_sha256
    saved, expected = (read_training_state(path.with_name("model.optimizer.safetensors"))["optimizer"]
                       for path in (future.result(), blocking))
    assert saved["state"].keys() == expected["state"].keys()
    assert all(torch.equal(saved["state"][i][name], expected["state"][i][name])
               for i in expected["state"] for name in expected["state"][i])
    assert ckptfmt.verify(future.result()).ok


def test_an_async_save_error_is_raised_by_result_and_by_the_next_save_when_nobody_asked(tmp_path):
    model, _ = _trained()
    taken = ckptfmt.save(model, tmp_path / "taken.safetensors")

    asked = ckptfmt.async_save(model, taken)
    with pytest.raises(OutputExistsError, match="already exists"):
        asked.result()
    ckptfmt.async_save(model, tmp_path / "after_asked.safetensors").result()  # an error asked for is not raised again

    ignored = ckptfmt.async_save(model, taken)
    _wait_quietly(ignored)
    with pytest.raises(OutputExistsError, match="already exists") as raised:
        ckptfmt.async_save(model, tmp_path / "next.safetensors")
    assert raised.value.path == str(taken)
    assert not (tmp_path / "next.safetensors").exists()  # the call that raised saved nothing
    assert ckptfmt.async_save(model, tmp_path / "next.safetensors").result().exists()  # raised once


def _wait_quietly(future) -> None:
    """Wait for a future without asking for its outcome, as a caller that never looks would."""
    import concurrent.futures

    concurrent.futures.wait([future])


def test_a_second_async_save_to_a_path_waits_for_the_first(tmp_path):
    model, optimizer = _trained()
    path = tmp_path / "model.safetensors"
    first = ckptfmt.async_save(model, path, optimizer=optimizer)
    _step(model, optimizer)
    second = ckptfmt.async_save(model, path, optimizer=optimizer, overwrite=True)
    assert first.done()  # the second call returned only once the first save had finished
    assert first.result() == second.result() == path
    assert state_dicts_bit_identical(load_file(path), {k: v for k, v in model.state_dict().items()})


def test_an_async_save_told_not_to_wait_refuses_a_path_still_in_flight(tmp_path):
    """wait=False: a save whose path is still being written raises WriteError at once. The first
    save is held in flight by its architecture's own check, which waits for the test."""
    release = threading.Event()

    class Gated(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.layer = torch.nn.Linear(width, width)

    def check(arguments):
        if threading.current_thread() is not threading.main_thread():
            release.wait(timeout=60)

    ckptfmt.register_model("gated_for_async_save", check=check)(Gated)
    model = Gated()
    path = tmp_path / "model.safetensors"
    first = ckptfmt.async_save(model, path)
    try:
        with pytest.raises(WriteError, match="a save to it is still in flight") as raised:
            ckptfmt.async_save(model, path, overwrite=True, wait=False)
        assert "wait=True" in raised.value.fix
        assert not first.done()
    finally:
        release.set()
    assert first.result() == path and ckptfmt.verify(path).ok


@pytest.mark.subprocess  # Its own process: what the interpreter does when it exits is the point.
def test_the_interpreter_waits_at_exit_for_a_save_in_flight(tmp_path):
    code = (
        "import sys, torch, ckptfmt\n"
        "from ckptfmt.models.multitask_unet import MultiTaskUNet\n"
        "model = MultiTaskUNet(base_filters=32, depth=4)\n"
        "optimizer = torch.optim.Adam(model.parameters())\n"
        "ckptfmt.async_save(model, sys.argv[1], optimizer=optimizer, epoch=2)\n"
        "print('returned')\n"
    )
    result = run("-c", code, str(tmp_path / "model.safetensors"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "returned" and result.stderr == ""
    report = ckptfmt.verify(tmp_path / "model.safetensors")
    assert report.ok, report
    assert read_header(tmp_path / "model.safetensors").training()["epoch"] == 2


def test_a_staging_buffer_reuses_its_memory_and_keeps_ties():
    """The second snapshot of a state of the same names, shapes and dtypes copies into the
    memory of the first; tensors tied in the state are tied in the copy, stored once."""
    shared = torch.randn(8, 4)
    state = {"embed.weight": shared, "head.weight": shared, "bias": torch.zeros(4),
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    buffer = StagingBuffer()
    first = buffer.snapshot(state)
    pointers = {name: first[name].data_ptr() for name in ("embed.weight", "bias")}
    before = shared.clone()
    shared.add_(1)
    assert torch.equal(first["embed.weight"], before)  # a copy, not a view of the live tensor
    assert first["head.weight"] is first["embed.weight"]
    assert first["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert first["optimizer"]["state"][0]["step"].item() == 3.0

    second = buffer.snapshot(state)
    assert {name: second[name].data_ptr() for name in pointers} == pointers
    assert torch.equal(second["embed.weight"], shared)
