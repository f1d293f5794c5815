"""The registry: model types are looked up by name only, never imported from a file's words."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch

from ckptfmt import ModelConfig, UnknownModelTypeError, registered_model_types
from ckptfmt import registry
from ckptfmt.registry import get_model_entry, register_model

from .helpers import save_small


def test_builtin_multitask_is_registered_with_infer_config():
    entry = get_model_entry("multitask")
    assert entry.infer_config is not None
    assert entry.parameter_names == ("base_filters", "depth", "in_channels", "seg_out_channels", "cls_num_classes")


def test_unknown_model_type_lists_the_known_ones():
    with pytest.raises(UnknownModelTypeError) as excinfo:
        get_model_entry("vit")
    known = ", ".join(registered_model_types())
    assert str(excinfo.value) == (
        f"model_type 'vit' is not registered here (known: {known}). Import the module that registers it "
        "(its @register_model('vit')), or install the package that provides it (entry-point group "
        "'ckptfmt.models')"
    )


def test_decorator_returns_the_class_unchanged(monkeypatch):
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    class Tiny(torch.nn.Module):
        pass

    assert register_model("tiny")(Tiny) is Tiny
    assert get_model_entry("tiny").builder is Tiny
    with pytest.raises(ValueError, match="must be a plain identifier"):
        register_model("my.module")


def test_third_party_architecture_registers_through_entry_points(monkeypatch, tmp_path):
    """A package's entry point is listed without importing it, and loaded on first use."""
    module = tmp_path / "thirdparty_arch.py"
    module.write_text(
        "import torch\n"
        "class Wide(torch.nn.Module):\n"
        "    def __init__(self, in_features: int = 1, classes: int = 2):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(in_features, classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    points = [EntryPoint(name="wide", value="thirdparty_arch:Wide", group=registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "_entry_points", lambda: points)
    import sys

    assert "wide" in registered_model_types() and "thirdparty_arch" not in sys.modules
    config = ModelConfig(model_type="wide", classes=3)
    assert config.params == {"in_features": 1, "classes": 3}
    assert get_model_entry("wide").expected_state(config.params) == {"fc.weight": ((3, 1), "F32"), "fc.bias": ((3,), "F32")}


@pytest.mark.parametrize("model_type", registered_model_types())
def test_every_registered_architecture_round_trips(tmp_path, model_type):
    """Each architecture's infer_config recovers the config of its own weights."""
    entry = get_model_entry(model_type)
    if entry.infer_config is None:
        pytest.skip(f"{model_type} registers no infer_config")
    path, model, config = save_small(tmp_path)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert entry.infer_config(shapes) == config.get_model_params()
