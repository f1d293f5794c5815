"""Every registered architecture gets these tests by registering: saved with the arguments it
was built with, it is rebuilt in a fresh process with the same config and state dict, bit for
bit, and with identical outputs when its task gives an input to run it on; loaded in this process,
its outputs equal the original's bit for bit; infer_config recovers a config that fits its bare
state dict; `convert` identifies its legacy `.pth`."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptfmt
from ckptfmt import MissingDependencyError, ModelConfig, PluginError, Task, registered_model_types
from ckptfmt.config.registry import ModelEntry, get_model_entry

from .helpers import run, state_dicts_bit_identical


@dataclass
class Example:
    entry: ModelEntry
    config: ModelConfig
    model: torch.nn.Module
    task: Task | None


@pytest.fixture(params=registered_model_types())
def example(request) -> Example:
    try:
        entry = get_model_entry(request.param)
    except PluginError as exc:  # an adapter whose library is not installed in this environment
        pytest.skip(exc.message)
    torch.manual_seed(0)
    try:  # checking an adapter's config, or building its model, needs its library
        config = ModelConfig(request.param, **(entry.example or {}))
        model = entry.build(config.params)
    except MissingDependencyError as exc:
        pytest.skip(exc.message)
    task = entry.describe_task(config.params)
    if task is not None:
        # A training step's worth of batch statistics, so that buffers are not their defaults.
        with torch.no_grad():
            model.train()(task.example_input(4, seed=1))
    return Example(entry, config, model.eval(), task)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        result = model(x)
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.subprocess  # Its own process: nothing of the model is in memory there, only the file.
def test_saved_without_a_config_it_is_rebuilt_in_a_fresh_process(example, tmp_path):
    """What can be checked of every architecture: rebuilt in a fresh process, its config and its
    state dict are the original's, bit for bit. With a task, there is an input to run it on, and
    its outputs are the original's too."""
    path = ckptfmt.save(example.model, tmp_path / "model.safetensors")
    assert ModelConfig.from_checkpoint(path).checked() == example.config
    x = example.task.example_input() if example.task is not None else None
    if x is not None:
        save_file({"x": x}, tmp_path / "x.safetensors")
    code = (
        "import sys, torch, ckptfmt\n"
        "from pathlib import Path\n"
        "from safetensors.torch import load_file, save_file\n"
        "from tests.test_architectures import outputs\n"
        "model, config, _ = ckptfmt.load_model_with_config(sys.argv[1])\n"
        "Path(sys.argv[2], 'config.json').write_text(config.to_json())\n"
        "torch.save(model.state_dict(), Path(sys.argv[2], 'state.pt'))\n"
        "if Path(sys.argv[2], 'x.safetensors').exists():\n"
        "    got = outputs(model, load_file(Path(sys.argv[2], 'x.safetensors'))['x'])\n"
        "    save_file({str(i): t.contiguous() for i, t in enumerate(got)}, Path(sys.argv[2], 'y.safetensors'))\n"
    )
    result = run("-c", code, str(path), str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == example.config
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state_dicts_bit_identical(state, example.model.state_dict())
    if x is None:
        return
    expected = outputs(example.model, x)
    got = load_file(tmp_path / "y.safetensors")
    assert len(got) == len(expected)
    assert all(torch.equal(got[str(i)], t) for i, t in enumerate(expected))


@pytest.mark.parametrize("threads", [1, 2])
def test_load_model_reproduces_the_original_bit_for_bit(example, tmp_path, threads):
    """Regression guard: a reload once differed from the in-memory model by one ulp on the CPU.
    The weights load as views of a memory map; their alignment must not change the results."""
    if example.task is None:
        pytest.skip("declares no task, so no input to run it on")
    path = ckptfmt.save(example.model, tmp_path / "model.safetensors")
    loaded = ckptfmt.load_model(path)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sides = [None] if example.task.input_size else [None, 3 * example.task.input_multiple * 4, 75]
        for side in sides:
            if side is not None and side % example.task.input_multiple:
                side += -side % example.task.input_multiple
            x = example.task.example_input(3, side=side, seed=side or 0)
            for got, want in zip(outputs(loaded, x), outputs(example.model, x), strict=True):
                assert torch.equal(got, want), f"differs at input side {side}, {threads} threads"
    finally:
        torch.set_num_threads(previous)


def test_infer_config_recovers_a_config_that_fits_its_weights(example):
    if example.entry.infer_config is None:
        pytest.skip("registers no infer_config")
    state = example.model.state_dict()
    inferred = example.entry.infer_config({name: tuple(t.shape) for name, t in state.items()})
    assert all(example.config.params[name] == value for name, value in inferred.items())
    config = ModelConfig(example.config.model_type, **inferred)
    shapes = {name: shape for name, (shape, _) in example.entry.expected_state(config.params).items()}
    assert shapes == {name: tuple(t.shape) for name, t in state.items()}


def test_convert_identifies_its_bare_state_dict(example, tmp_path):
    if example.entry.infer_config is None:
        pytest.skip("registers no infer_config")
    torch.save(example.model.state_dict(), tmp_path / "legacy.pth")
    result = ckptfmt.convert(tmp_path / "legacy.pth")
    assert result.config.model_type == example.config.model_type
    assert result.config_source == "inferred"
    loaded = ckptfmt.load_model(result.output)
    assert state_dicts_bit_identical(loaded.state_dict(), example.model.state_dict())
