"""The registry: model types are looked up by name only, never imported from a file's words."""

from __future__ import annotations

import os
import shutil
from importlib.metadata import EntryPoint
from typing import Literal

import pytest
import torch

import ckptfmt
from ckptfmt import ConfigError, ModelConfig, UnknownModelTypeError, registered_model_types
from ckptfmt.config import registry
from ckptfmt.config.registry import get_model_entry, register_model

from .helpers import run


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
    monkeypatch.setattr(registry, "installed_entry_points", lambda: points)
    import sys

    assert "wide" in registered_model_types() and "thirdparty_arch" not in sys.modules
    config = ModelConfig(model_type="wide", classes=3)
    assert config.params == {"in_features": 1, "classes": 3}
    assert get_model_entry("wide").expected_state(config.params) == {"fc.weight": ((3, 1), "F32"), "fc.bias": ((3,), "F32")}


@pytest.mark.subprocess  # Its own processes: each lists the entry points as they are installed then.
def test_the_installed_architectures_are_listed_as_installed_now(tmp_path):
    """Each change to what is installed is seen by the next process: a package added, its
    entry points edited in place (the folder's own mtime may not change), the package removed."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    env = {"PYTHONPATH": str(site), "CKPTFMT_CACHE_DIR": str(cache)}

    def listed() -> list[str]:
        result = run("-c", "import ckptfmt; print(*ckptfmt.registered_model_types())", env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    def declare(name: str, when: int) -> None:
        (dist / "entry_points.txt").write_text(f"[ckptfmt.models]\n{name} = handmade_arch:Net\n")
        os.utime(dist / "entry_points.txt", ns=(when, when))

    assert "handmade" not in listed()
    dist = site / "handmade-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: handmade\nVersion: 1.0\n")
    declare("handmade", 10**18)
    assert "handmade" in listed()
    declare("handmade2", 2 * 10**18)  # edited in place: the folder's own mtime may not change
    assert "handmade2" in listed() and "handmade" not in listed()
    shutil.rmtree(dist)
    assert "handmade2" not in listed()
    assert not (cache / "entry_points").exists()  # nothing is kept: the listing reads what is there


def test_the_cache_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    from ckptfmt.io.files import CACHE_ENV, cache_folder

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_folder() == tmp_path / "ckptfmt"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_folder() == tmp_path / "mine"


@pytest.fixture
def registry_copy(monkeypatch):
    """Registrations made by a test are forgotten after it."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))


def test_arguments_are_checked_against_the_signature_and_its_annotations(registry_copy):
    @register_model("annotated")
    class Annotated(torch.nn.Module):
        def __init__(self, width: int, scale: float = 1.0, mode: Literal["a", "b"] = "a",
                     sizes: tuple[int, ...] = (2, 3), options: dict | None = None, name: str | None = None,
                     flag: bool = False):
            super().__init__()
            self.fc = torch.nn.Linear(width, width)

    config = ModelConfig("annotated", width=4, scale=2)
    assert config.params == {"width": 4, "scale": 2.0, "mode": "a", "sizes": [2, 3], "options": None,
                             "name": None, "flag": False}
    assert config.get_model_params()["sizes"] == (2, 3)  # JSON has no tuples; the builder gets one
    cases = [
        ({"width": 4.0}, "width must be an int, not float 4.0"),
        ({"width": True}, "width must be an int, not bool True"),
        ({"width": 4, "scale": "2"}, "scale must be a number, not str '2'"),
        ({"width": 4, "mode": "c"}, "mode must be one of 'a', 'b', not str 'c'"),
        ({"width": 4, "sizes": [2, "x"]}, "sizes must be a list of ints, not list [2, 'x']"),
        ({"width": 4, "options": [1]}, "options must be a dict or None, not list [1]"),
        ({"width": 4, "flag": 1}, "flag must be a bool, not int 1"),
        ({}, "'annotated' (Annotated) needs the argument 'width', which the config does not give"),
        ({"width": 4, "widht": 4}, "'annotated' (Annotated) has no argument 'widht'; its arguments: width, "
                                   "scale, mode, sizes, options, name, flag"),
    ]
    for arguments, message in cases:
        with pytest.raises(ConfigError) as excinfo:
            ModelConfig("annotated", **arguments)
        assert str(excinfo.value) == message


def test_instances_of_a_registered_class_remember_their_arguments(registry_copy):
    from ckptfmt.config.capture import captured_arguments

    @register_model("remembering")
    class Remembering(torch.nn.Module):
        def __init__(self, width: int = 2, *, depth: int = 1, **extra):
            super().__init__()
            self.fc = torch.nn.Linear(width, width)

    class Unregistered(Remembering):
        pass

    assert captured_arguments(Remembering(3, depth=2, dropout=0.5)) == ("remembering", {"width": 3, "depth": 2, "dropout": 0.5})
    assert captured_arguments(torch.nn.DataParallel(Remembering(5))) == ("remembering", {"width": 5})
    assert captured_arguments(Unregistered(3)) is None
    with pytest.raises(ConfigError, match=r"^Unregistered is not a registered architecture, so nothing records how "
                                          r"to rebuild it\. Register it: put @ckptfmt\.register_model\('unregistered'\) "
                                          r"above `class Unregistered`"):
        ModelConfig.from_model(Unregistered(3))
    assert ModelConfig.from_model(Remembering(3), description="x").description == "x"


def test_a_registered_factory_records_the_arguments_on_what_it_returns(registry_copy):
    from ckptfmt.config.capture import captured_arguments

    def make_head(classes: int = 2):
        return torch.nn.Linear(4, classes)

    registered = register_model("head_factory")(make_head)
    assert captured_arguments(registered(classes=7)) == ("head_factory", {"classes": 7})
    assert ModelConfig.from_model(registered(classes=7)).params == {"classes": 7}


def test_an_argument_json_cannot_hold_is_refused_when_saving_naming_it(registry_copy, tmp_path):
    @register_model("normed")
    class Normed(torch.nn.Module):
        def __init__(self, width: int = 4, norm_layer=torch.nn.BatchNorm1d):
            super().__init__()
            self.norm = norm_layer(width)

    with pytest.raises(ConfigError) as excinfo:
        ckptfmt.save(Normed(4, norm_layer=torch.nn.LayerNorm), tmp_path / "n.safetensors")
    assert str(excinfo.value) == (
        f"{tmp_path / 'n.safetensors'}: cannot record how Normed was built: norm_layer is the class "
        "torch.nn.modules.normalization.LayerNorm, which cannot be written as JSON (numbers, strings, "
        "booleans, None, and lists and dicts of those)"
    )
    with pytest.raises(ConfigError, match=r"'normed' \(Normed\) takes 'norm_layer' with the default the class "
                                          r"torch\.nn\.modules\.batchnorm\.BatchNorm1d, which a config cannot hold"):
        ModelConfig("normed")
    assert list(tmp_path.iterdir()) == []


def test_a_parameter_named_like_a_config_field_is_refused_at_registration(registry_copy):
    class Described(torch.nn.Module):
        def __init__(self, description: str = ""):
            super().__init__()

    with pytest.raises(ValueError, match=r"Described cannot be registered as 'described': its parameter 'description' "
                                         r"has the name of a config field"):
        register_model("described")(Described)
