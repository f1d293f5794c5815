"""What holds for every library adapter: the libraries are imported only when a model of theirs
is built or identified, building touches neither the network nor the disk, a missing library
names the extra to install, and the signature index is built once and then read."""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap

import pytest
import torch
from ckptfmt.models import _signatures
from ckptfmt.models._signatures import keys_digest

import ckptfmt
from ckptfmt.io.files import CACHE_ENV

from ..helpers import DEMO, run, run_cli

pytestmark = pytest.mark.zoo

LIBRARIES = {"timm": "timm", "torchvision": "torchvision", "smp": "segmentation_models_pytorch", "monai": "monai"}


def installed(*modules: str) -> None:
    from .libraries import require

    for module in modules:
        require(module)


@pytest.mark.parametrize("model_type, name, extra", [("timm", "resnet18", "timm"), ("torchvision", "resnet18", "torchvision"),
                                                     ("smp", "unet", "smp"), ("monai", "UNet", "monai")])
def test_a_missing_library_is_named_with_the_extra_to_install(model_type, name, extra):
    """Runs in any environment: the library is hidden from a fresh process."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{LIBRARIES[model_type].split('.')[0]!r}] = None   # as if not installed
        import ckptfmt
        try:
            ckptfmt.create_model({model_type!r}, {name!r})
        except ckptfmt.MissingDependencyError as exc:
            print(exc)
    """)
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"model_type {model_type!r} needs {extra}, which is not installed here; pip install 'ckptfmt[{extra}]'"
    )


def test_a_checkpoint_whose_library_is_missing_names_the_file_and_the_extra_and_still_verifies(tmp_path):
    """Runs in any environment: timm is hidden from fresh processes. The file is a timm model's
    as ckptfmt writes it (its config in the header), though nothing here builds it."""
    from safetensors.torch import save_file

    config = json.dumps({"model_type": "timm", "model_name": "resnet18", "num_classes": 2, "in_chans": 3,
                         "schema_version": 2})
    path = tmp_path / "model.safetensors"
    save_file({"fc.weight": torch.zeros(2, 512)}, path,
              metadata={"format": "pt", "ckptfmt.format_version": "2", "ckptfmt.config": config})
    hide = "import sys; sys.modules['timm'] = None; from ckptfmt.cli import run; sys.argv[0] = 'ckptfmt'; run()"
    loaded = run("-c", hide, "predict", str(path), str(DEMO / "scans/scan_0.png"), "--out", str(tmp_path / "out"))
    assert loaded.returncode == 1
    assert loaded.stderr.strip() == (
        f"Error: {path}: model_type 'timm' needs timm, which is not installed here; pip install 'ckptfmt[timm]'")
    verified = run("-c", hide, "verify", "--json", str(path))
    shapes = next(c for c in json.loads(verified.stdout)[0]["checks"] if c["check"] == "shapes")
    assert shapes == {"check": "shapes", "ok": True, "skipped": True, "message": (
        "skipped: model_type 'timm' needs timm, which is not installed here; pip install 'ckptfmt[timm]'")}


def test_import_help_and_inspect_never_import_a_library(tmp_path):
    """Each library costs 2 to 3 s to import: `import ckptfmt`, `ckptfmt --help` and `ckptfmt
    inspect` of a library model's checkpoint never pay it."""
    installed("timm")
    import timm

    path = ckptfmt.save(timm.create_model("test_efficientnet", num_classes=2), tmp_path / "model.safetensors")
    commands = [("-c", "import ckptfmt; ckptfmt.ModelConfig.from_checkpoint(__import__('sys').argv[1])", str(path)),
                ("-m", "ckptfmt", "--help"), ("-m", "ckptfmt", "inspect", str(path)),
                ("-m", "ckptfmt", "inspect", "--json", str(path))]
    for command in commands:
        result = run("-X", "importtime", *command)
        assert result.returncode == 0, result.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
        assert imported & {"timm", "torchvision", "segmentation_models_pytorch", "monai", "torch"} == set(), command


AUDIT = textwrap.dedent("""
    import os, sys, sysconfig, json
    allowed = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sysconfig.get_paths().values())})
    allowed += (os.path.realpath(sys.argv[1]), "/proc/", "/sys/", "/dev/")
    seen = {"network": [], "files": []}
    active = False

    def hook(event, args):
        if not active:
            return
        if event.startswith(("socket.", "urllib.", "http.")):
            seen["network"].append(event)
            raise PermissionError(f"network blocked by the test: {event}")
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if not path.startswith(allowed):
                seen["files"].append(path)

    import torch, ckptfmt, ckptfmt.models, timm, torchvision, segmentation_models_pytorch, monai.networks.nets
    # Python code is read where it lies: ckptfmt's own modules are imported as they are needed.
    allowed += tuple(os.path.realpath(p) for p in (*ckptfmt.__path__, *ckptfmt.models.__path__))
    sys.addaudithook(hook)
    active = True
    models = [
        ("timm", ["test_vit"], {"num_classes": 2}), ("timm", ["resnet18"], {}),
        ("torchvision", ["resnet18"], {}), ("torchvision", ["fcn_resnet50"], {"num_classes": 2}),
        ("torchvision", ["fasterrcnn_mobilenet_v3_large_fpn"], {}),
        ("smp", ["unet"], {"encoder_name": "resnet34"}), ("smp", ["segformer"], {"encoder_name": "mit_b0"}),
        ("monai", ["UNet"], {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}),
        ("monai", ["SwinUNETR"], {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "feature_size": 12}),
    ]
    for model_type, args, kwargs in models:
        model = ckptfmt.create_model(model_type, *args, **kwargs)
        path = ckptfmt.save(model, os.path.join(sys.argv[1], f"{model_type}-{args[0]}", "model.safetensors"))
        ckptfmt.load_model(path)
    for name in ("hf-hub:timm/resnet18.a1_in1k", "local-dir:/etc"):
        try:
            ckptfmt.create_model("timm", name)
        except ckptfmt.ConfigError:
            pass
    active = False
    print(json.dumps(seen))
""")


def test_building_saving_and_loading_touch_neither_the_network_nor_the_disk(tmp_path):
    """An audit hook in a fresh process: every socket refused and recorded, every file opened
    outside Python's own folders and the checkpoints' folder recorded, while models of each
    library are built (torchvision's detection and segmentation builders, smp's Unet, download
    weights by default), saved and loaded, and hub names are refused."""
    installed(*LIBRARIES.values())
    # Run from the checkpoints' folder: Python's import system lists its working folder.
    result = run("-c", AUDIT, str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"network": [], "files": []}


def test_the_index_is_built_on_first_need_with_progress_then_read_from_the_cache(tmp_path, monkeypatch, capsys):
    installed("torchvision")
    from ckptfmt.models.torchvision import INDEX

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    index = dataclasses.replace(INDEX, names=lambda: ["resnet18", "squeezenet1_1"])
    assert index.path.parent == tmp_path / "cache" / "signatures"
    resnet = ckptfmt.create_model("torchvision", "resnet18", num_classes=4)
    digest = keys_digest(resnet.state_dict())
    assert [entry["name"] for entry in index.lookup(digest)] == ["resnet18"]
    progress = capsys.readouterr().err.splitlines()
    assert progress[0].startswith("ckptfmt: indexing the 2 torchvision models (torchvision ")
    assert progress[-1].startswith("ckptfmt: indexed 2 torchvision models in ")
    again = dataclasses.replace(INDEX, names=lambda: pytest.fail("rebuilt"))
    assert [entry["name"] for entry in again.lookup(digest)] == ["resnet18"]
    assert capsys.readouterr().err == ""
    index.path.write_text("{not json")
    damaged = dataclasses.replace(INDEX, names=lambda: ["squeezenet1_1"])
    assert damaged.lookup(digest) == []
    assert capsys.readouterr().err.startswith(f"ckptfmt: the torchvision index {index.path} is unreadable (")


def test_an_index_that_other_code_wrote_is_never_read(tmp_path, monkeypatch, capsys):
    """Regression: the index was cached per library and torch version only, so after ckptfmt's
    adapter code changed what an index holds, the old index still answered. Here the adapter's
    code is a copy, changed after the first index was written."""
    installed("torchvision")
    from ckptfmt.models.torchvision import INDEX

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    code = tmp_path / "models"
    shutil.copytree(_signatures._MODELS_FOLDER, code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_signatures, "_MODELS_FOLDER", code)
    digest = keys_digest(ckptfmt.create_model("torchvision", "resnet18").state_dict())
    first = dataclasses.replace(INDEX, names=lambda: ["resnet18"])
    assert [entry["name"] for entry in first.lookup(digest)] == ["resnet18"]
    (code / "torchvision.py").write_text((code / "torchvision.py").read_text() + "\n# what an index holds changed\n")
    changed = dataclasses.replace(INDEX, names=lambda: ["squeezenet1_1"])
    assert changed.path != first.path and first.path.exists()
    assert changed.lookup(digest) == []
    assert "ckptfmt: indexing the 1 torchvision models (torchvision " in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache/signatures").iterdir()) == sorted([first.path.name, changed.path.name])


def test_converting_a_unet_pth_never_asks_the_libraries(tmp_path):
    """The libraries are asked only when nothing more specific recognises the weights: the
    built-in U-Net's .pth never builds an index, nor imports a library."""
    installed("timm")
    env = {CACHE_ENV: str(tmp_path / "cache")}
    result = run("-X", "importtime", "-m", "ckptfmt", "convert", str(DEMO / "multitask_seg_warmup/best_model.pth"),
                 "-o", str(tmp_path / "unet.safetensors"), env=env)
    assert result.returncode == 0, result.stderr
    assert "indexing" not in result.stderr and not (tmp_path / "cache/signatures").exists()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert imported & {"timm", "torchvision", "segmentation_models_pytorch", "monai"} == set()


def test_a_second_timm_convert_answers_from_the_index(tmp_path):
    """The first identification of timm weights may build the index (minutes, once per timm
    version); the next reads it."""
    installed("timm")
    import timm

    for name in ("test_convnext", "test_resnet"):
        torch.save(timm.create_model(name, num_classes=3).state_dict(), tmp_path / f"{name}.pth")
        result = run_cli("convert", str(tmp_path / f"{name}.pth"), "-o", str(tmp_path / name / "model.safetensors"))
        assert result.returncode == 0, result.stderr
    assert "indexing" not in result.stderr
    assert 'timm(in_chans=3, model_name="test_resnet", num_classes=3)' in result.stdout
