"""Building a library's model without memory: on torch's meta device, or, where a constructor
computes on its tensors, with only its parameters sent there, in the building thread alone; the
buffers that the weights do not replace stay real. The first tests need no library."""

from __future__ import annotations

import threading

import pytest
import torch
from ckptfmt.models._meta import build_empty, build_for_shapes

import ckptfmt

from .libraries import assert_rebuilt_identically, require, with_batch_statistics


class DropPathRates(torch.nn.Module):
    """As timm's and MONAI's transformers do: Python numbers computed from a tensor in
    __init__ (which the meta device cannot answer), and a buffer the state dict does not hold."""

    def __init__(self, while_building=lambda: None):
        super().__init__()
        self.rates = torch.linspace(0, 0.1, 3).tolist()
        self.first = torch.nn.Linear(4, 4)
        while_building()
        self.second = torch.nn.Linear(4, 4)
        self.register_buffer("index", torch.arange(6).view(2, 3), persistent=False)


class IndexedBuffer(torch.nn.Module):
    """Builds on the meta device, but holds a buffer that the weights do not replace."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("index", torch.arange(6).view(2, 3), persistent=False)


def devices(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    return {p.device.type for p in model.parameters()}, {b.device.type for b in model.buffers()}


def test_a_constructor_that_computes_on_its_tensors_gets_its_parameters_on_meta_and_its_buffers_real():
    for build in (build_for_shapes, build_empty):
        model = build(DropPathRates)
        assert devices(model) == ({"meta"}, {"cpu"})
        assert model.rates == pytest.approx([0.0, 0.05, 0.1])
        assert torch.equal(model.index, torch.arange(6).view(2, 3))
    assert devices(torch.nn.Linear(2, 2)) == ({"cpu"}, set()), "after the build, modules are built as torch builds them"


def test_build_empty_leaves_no_buffer_on_meta_that_the_weights_do_not_hold():
    """On the meta device that buffer would stay empty after load_state_dict(assign=True)."""
    assert devices(build_for_shapes(IndexedBuffer)) == ({"meta"}, {"meta"})
    model = build_empty(IndexedBuffer)
    assert devices(model) == ({"meta"}, {"cpu"})
    assert torch.equal(model.index, torch.arange(6).view(2, 3))


def test_torch_nn_is_left_as_torch_made_it_while_a_model_is_built():
    """Regression: building with parameters on meta replaced nn.Module.register_parameter for the
    whole process while it ran."""
    register = torch.nn.Module.register_parameter
    seen = []
    build_for_shapes(lambda: DropPathRates(while_building=lambda: seen.append(torch.nn.Module.register_parameter)))
    assert seen == [register] and torch.nn.Module.register_parameter is register
    assert register.__code__.co_filename.endswith("torch/nn/modules/module.py")


def test_another_thread_builds_real_modules_while_one_builds_on_meta():
    """Regression: while one thread built a model with parameters on meta, every module another
    thread built in the meantime got meta parameters too (the patch was process-wide)."""
    elsewhere: dict[str, torch.nn.Module] = {}
    started, done = threading.Event(), threading.Event()

    def other_thread():
        started.wait(timeout=60)
        elsewhere["model"] = torch.nn.Linear(3, 3)
        done.set()

    def halfway():  # the build is under way: the other thread builds its module now
        started.set()
        assert done.wait(timeout=60)

    thread = threading.Thread(target=other_thread)
    thread.start()
    model = build_for_shapes(lambda: DropPathRates(while_building=halfway))
    thread.join()
    assert devices(model) == ({"meta"}, {"cpu"})
    assert devices(elsewhere["model"]) == ({"cpu"}, set())
    assert torch.count_nonzero(elsewhere["model"].weight) > 0, "initialised for real"


@pytest.mark.zoo
def test_a_timm_model_with_relative_position_indices_loads_with_them_computed(tmp_path):
    """test_coatnet builds on the meta device, but its relative position indices are buffers
    the weights do not hold: they are computed as timm computes them, and the outputs are the
    model's exactly."""
    timm = require("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_coatnet", num_classes=3)
    size = model.pretrained_cfg["input_size"][1:]
    model = with_batch_statistics(model, torch.randn(2, 3, *size))
    path = ckptfmt.save(model, tmp_path / "coatnet.safetensors")
    empty = build_empty(lambda: timm.create_model("test_coatnet", num_classes=3))
    held = set(empty.state_dict())
    left = {name: buffer for name, buffer in empty.named_buffers() if name not in held}
    assert left and not any(buffer.is_meta for buffer in left.values())
    real = dict(model.named_buffers())
    assert all(torch.equal(buffer, real[name]) for name, buffer in left.items())
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    assert_rebuilt_identically(model, [path], x, tmp_path)


@pytest.mark.zoo
def test_a_timm_swin_v2_whose_buffers_are_made_on_its_parameters_device_loads(tmp_path):
    """Regression: Swin V2 fills its relative position tables on its parameters' device while it
    is built, so with its parameters on meta and its buffers on the CPU the build raised
    NotImplementedError ("Cannot copy out of meta tensor") and its checkpoints did not load. It is
    built on the CPU for real."""
    require("timm")
    torch.manual_seed(0)
    model = ckptfmt.create_model("timm", "swinv2_tiny_window8_256", num_classes=2, embed_dim=24,
                                 depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]).eval()
    path = ckptfmt.save(model, tmp_path / "swinv2.safetensors")
    loaded = ckptfmt.load_model(path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
