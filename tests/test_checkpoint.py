"""Saving with the config and rebuilding from the file alone."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet, create_multi_task_model
from safetensors import safe_open
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import (
    ModelConfig,
    ShapeMismatchError,
    load_model,
    load_model_with_config,
    load_training_state,
    read_header,
    save_model_with_config,
)
from ckptfmt.format.writer import read_state_dict, weights_digest, write_safetensors

from .helpers import ROOT, run, run_cli, save_small, small_model, state_dicts_bit_identical

ARCHITECTURES = [
    {"base_filters": 24, "depth": 3, "in_channels": 4, "seg_out_channels": 3, "cls_num_classes": 4},
    {"base_filters": 4, "depth": 1, "in_channels": 1, "seg_out_channels": 1, "cls_num_classes": 2},
    {"base_filters": 6, "depth": 4, "in_channels": 2, "seg_out_channels": 2, "cls_num_classes": 7},
]


@pytest.mark.subprocess  # Its own process: nothing of the saved model is in memory there, only the file.
@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: "-".join(map(str, a.values())))
def test_load_model_in_a_fresh_process_gives_identical_outputs(tmp_path, architecture):
    path, model, config = save_small(tmp_path, **architecture)
    side = 2 ** architecture["depth"] * 2
    torch.manual_seed(1)
    x = torch.randn(2, architecture["in_channels"], side, side)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    code = (
        "import sys, torch, ckptfmt\n"
        "model = ckptfmt.load_model(sys.argv[1])\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad(): seg, cls = model(x)\n"
        "torch.save({'seg': seg, 'cls': cls}, sys.argv[3])\n"
    )
    result = run("-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"))
    assert result.returncode == 0, result.stderr
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(outputs["seg"], expected[0]) and torch.equal(outputs["cls"], expected[1])


@pytest.mark.subprocess  # Its own process: only a fresh one shows what reading imports.
def test_header_and_config_are_read_without_torch(tmp_path):
    path, _, config = save_small(tmp_path, base_filters=8, depth=3)
    code = (
        "import sys\n"
        "from ckptfmt import ModelConfig, read_header\n"
        "config = ModelConfig.from_checkpoint(sys.argv[1])\n"
        "header = read_header(sys.argv[1])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(config.base_filters, config.depth, len(header.tensors))\n"
    )
    result = run("-c", code, str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "3", str(len(MultiTaskUNet(8, 3).state_dict()))]


def test_file_metadata_follows_the_format(tmp_path):
    model, config = small_model()
    path = save_model_with_config(model, tmp_path / "m.safetensors", config, epoch=4, metrics={"dice": 0.75})
    metadata = read_header(path).metadata
    assert metadata["format"] == "pt"
    assert metadata["ckptfmt.format_version"] == "3"
    assert json.loads(metadata["ckptfmt.config"]) == config.to_dict()
    assert json.loads(metadata["ckptfmt.training"]) == {"epoch": 4, "metrics": {"dice": 0.75}}
    provenance = json.loads(metadata["ckptfmt.provenance"])
    assert provenance["ckptfmt"] == ckptfmt.__version__ and provenance["torch"] == torch.__version__
    assert provenance["created_at"].endswith("+00:00")
    assert metadata["ckptfmt.weights_sha256"] == weights_digest(model.state_dict())


def test_files_are_plain_safetensors(tmp_path):
    path, model, _ = save_small(tmp_path)
    assert state_dicts_bit_identical(load_file(path), model.state_dict())
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        assert set(f.keys()) == set(model.state_dict())


def test_sidecar_mirrors_the_config_and_binds_the_weights(tmp_path):
    path, model, config = save_small(tmp_path, base_filters=8)
    sidecar = json.loads((tmp_path / "model_config.json").read_text())
    assert sidecar == {
        **config.to_dict(),
        "weights": {"best_model.safetensors": weights_digest(model.state_dict())},
    }
    assert sidecar["base_filters"] == 8 and sidecar["model_type"] == "multitask"


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path, _, _ = save_small(tmp_path)
    finally:
        os.umask(old)
    for written in (path, tmp_path / "model_config.json"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o640


def test_pth_name_is_written_as_safetensors_with_a_warning(tmp_path):
    model, config = small_model()
    with pytest.warns(ckptfmt.CkptfmtWarning, match=f"writing {tmp_path / 'best_model.safetensors'}"):
        path = save_model_with_config(model, tmp_path / "best_model.pth", config)
    assert path == tmp_path / "best_model.safetensors"
    assert not (tmp_path / "best_model.pth").exists()
    # The seed's inference code passes the .pth name; it finds what was written.
    assert isinstance(load_model(tmp_path / "best_model.pth"), MultiTaskUNet)


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    path, _, config = save_small(tmp_path)
    before = path.read_bytes()
    other, _ = small_model(seed=5)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True to replace it"):
        save_model_with_config(other, path, config)
    assert path.read_bytes() == before
    save_model_with_config(other, path, config, overwrite=True)
    assert state_dicts_bit_identical(read_state_dict(path), other.state_dict())


def test_config_that_disagrees_with_how_the_model_was_built_is_refused_before_writing(tmp_path):
    model, _ = small_model(base_filters=4)
    with pytest.raises(ckptfmt.ConfigError) as excinfo:
        save_model_with_config(model, tmp_path / "m.safetensors", ModelConfig(base_filters=8, depth=2))
    assert str(excinfo.value) == (
        f"{tmp_path / 'm.safetensors'}: the config disagrees with the arguments the model was built with "
        "(base_filters: config 8, model 4); save without config= to record the model as built, or build "
        "the model from the config"
    )
    assert list(tmp_path.iterdir()) == []


def test_config_that_does_not_fit_the_model_is_refused_before_writing(tmp_path):
    """An unregistered subclass records no arguments: the shapes are what is checked."""

    class Subclass(MultiTaskUNet):
        pass

    model = Subclass(base_filters=4, depth=2)
    with pytest.raises(ShapeMismatchError, match=r"base_filters=8 expects enc\.0\.0\.weight \[8, 1, 3, 3\]; the file has \[4, 1, 3, 3\]"):
        save_model_with_config(model, tmp_path / "m.safetensors", ModelConfig(base_filters=8, depth=2))
    assert list(tmp_path.iterdir()) == []


def test_wrong_override_names_field_tensor_and_shapes_before_allocating(tmp_path, monkeypatch):
    path, _, _ = save_small(tmp_path, base_filters=4, depth=2)

    def no_loading(*args, **kwargs):
        raise AssertionError("tensors were loaded before the shape check")

    monkeypatch.setattr("ckptfmt.format.writer.load_tensors", no_loading)
    with pytest.raises(ShapeMismatchError) as excinfo:
        load_model(path, base_filters=32)
    assert str(excinfo.value) == (
        f"{path}: base_filters=32 expects enc.0.0.weight [32, 1, 3, 3]; the file has [4, 1, 3, 3], "
        "and 55 more mismatches (the weights say base_filters=4); remove the override"
    )
    with pytest.raises(ShapeMismatchError, match=r"depth=3 expects enc\.2\.0\.weight \[16, 8, 3, 3\]; the file has no such tensor.*\(the weights say depth=2\)"):
        load_model(path, depth=3)


def test_load_model_options(tmp_path):
    path, model, _ = save_small(tmp_path)
    loaded = load_model(path, dtype=torch.float64)
    assert not loaded.training
    assert loaded.enc[0][0].weight.dtype == torch.float64
    assert torch.equal(loaded.enc[0][0].weight, model.enc[0][0].weight.double())
    with pytest.raises(ckptfmt.DeviceError, match="invalid device 'gpu0'"):
        load_model(path, device="gpu0")


def test_load_model_with_config_returns_the_seeds_triple(tmp_path):
    model, config = small_model()
    path = save_model_with_config(model, tmp_path / "best.safetensors", config, epoch=10, metrics={"accuracy": 0.95})
    loaded, loaded_config, checkpoint = load_model_with_config(path, model_factory_fn=create_multi_task_model)
    assert loaded_config == config
    assert checkpoint["epoch"] == 10 and checkpoint["metrics"] == {"accuracy": 0.95}
    assert checkpoint["config_source"] == "embedded"
    assert not any(isinstance(v, torch.Tensor) for v in checkpoint.values())
    assert state_dicts_bit_identical(loaded.state_dict(), model.state_dict())


def test_legacy_pth_loads_with_an_inferred_config_and_a_warning(tmp_path):
    model, config = small_model(base_filters=8, depth=3)
    torch.save(model.state_dict(), tmp_path / "old.pth")
    with pytest.warns(ckptfmt.CkptfmtWarning) as warned:
        loaded, loaded_config, checkpoint = load_model_with_config(tmp_path / "old.pth")
    assert loaded_config.get_model_params() == config.get_model_params()
    assert checkpoint["config_source"] == "inferred"
    (warning,) = warned
    assert "architecture inferred from the weights: multitask(base_filters=8, cls_num_classes=2, depth=3, " in str(warning.message)
    assert "default configuration" not in str(warning.message)
    assert state_dicts_bit_identical(loaded.state_dict(), model.state_dict())


def test_resume_equals_never_stopping(tmp_path):
    """Save at step 3, resume in a new model and optimizer: steps 4-6 match bit for bit."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 1, 16, 16), torch.randint(0, 2, (4,))) for _ in range(6)]

    def step(model, optimizer, batch):
        x, y = batch
        seg, cls = model(x)
        loss = seg.square().mean() + torch.nn.functional.cross_entropy(cls, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model, config = small_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    for batch in batches[:3]:
        step(model, optimizer, batch)
    path = save_model_with_config(model, tmp_path / "ckpt.safetensors", config, optimizer=optimizer, epoch=3)
    for batch in batches[3:]:
        step(model, optimizer, batch)

    resumed = load_model(path).train()
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1.0)
    assert load_training_state(path, resumed_optimizer)["epoch"] == 3
    for batch in batches[3:]:
        step(resumed, resumed_optimizer, batch)
    assert state_dicts_bit_identical(resumed.state_dict(), model.state_dict())
    assert resumed_optimizer.param_groups[0]["betas"] == (0.8, 0.99)


def test_optimizer_state_is_pickle_free_and_bound_to_its_checkpoint(tmp_path):
    model, config = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8))[0].sum().backward()
    optimizer.step()
    path = save_model_with_config(model, tmp_path / "a.safetensors", config, optimizer=optimizer)
    companion = tmp_path / "a.optimizer.safetensors"
    assert read_header(companion).metadata["ckptfmt.optimizer"].startswith("{")
    save_model_with_config(model, tmp_path / "b.safetensors", config, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    (tmp_path / "b.optimizer.safetensors").replace(companion)
    with pytest.raises(ckptfmt.IntegrityError, match="does not match the checkpoint"):
        load_training_state(path, torch.optim.SGD(model.parameters(), lr=0.1))


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path):
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tensors = {"decoder.weight": shared, "encoder.weight": shared, "scale": torch.tensor(2.0), "empty": torch.zeros(0, 3)}
    path = tmp_path / "tied.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    header = read_header(path)
    assert sorted(header.tensors) == ["decoder.weight", "empty", "scale"]
    assert header.aliases == {"encoder.weight": "decoder.weight"}
    loaded = read_state_dict(path)
    assert loaded["encoder.weight"].data_ptr() == loaded["decoder.weight"].data_ptr()
    assert state_dicts_bit_identical(loaded, tensors)


def test_non_contiguous_tensors_are_written_in_logical_order(tmp_path):
    base = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    tensors = {"t": base.t(), "slice": base[:, 1::2]}
    path = tmp_path / "views.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    assert state_dicts_bit_identical(load_file(path), {k: v.contiguous() for k, v in tensors.items()})


FIXTURE = ROOT / "tests/fixtures/schema1"


def test_a_schema_1_file_written_by_0_1_0_loads_and_resumes():
    """Committed once, kept forever: a file of 0.1.0 (config schema 1) with its sidecar and
    optimizer companion."""
    path = FIXTURE / "best_model.safetensors"
    config = ModelConfig.from_checkpoint(path)
    assert json.loads(read_header(path).metadata["ckptfmt.config"])["schema_version"] == 1
    assert config.checked().to_dict() == {
        "model_type": "multitask", "base_filters": 2, "depth": 2, "in_channels": 1, "seg_out_channels": 1,
        "cls_num_classes": 3, "class_names": ["none", "low grade", "high grade"], "normalization": {"mode": "zscore"},
        "seg_threshold": 0.4, "task": "segmentation+classification", "version": "1.0",
        "description": "schema-1 fixture written by ckptfmt 0.1.0", "trained_on": "nothing (random weights)",
        "training_config": "", "schema_version": 2,
    }
    expected = load_file(FIXTURE / "expected_outputs.safetensors")
    # Bit for bit against the same weights in a U-Net built here: float kernels differ between
    # CPUs, so the outputs stored when the fixture was made hold to float32 rounding only.
    reference = MultiTaskUNet(**config.get_model_params())
    reference.load_state_dict(load_file(path))
    with torch.no_grad():
        seg, cls = load_model(path)(expected["x"])
        reference_seg, reference_cls = reference.eval()(expected["x"])
    assert torch.equal(seg, reference_seg) and torch.equal(cls, reference_cls)
    torch.testing.assert_close(seg, expected["seg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls, expected["cls"], rtol=1e-5, atol=1e-6)
    assert ckptfmt.verify(path).ok
    model = load_model(path).train()
    assert load_training_state(path, torch.optim.SGD(model.parameters(), lr=1.0))["epoch"] == 7


def test_weights_only_files_have_a_way_back(tmp_path):
    torch.manual_seed(0)
    tensors = {"fc.weight": torch.randn(3, 5), "fc.bias": torch.randn(3)}
    torch.save(tensors, tmp_path / "head.pth")
    path = ckptfmt.convert(tmp_path / "head.pth").output
    with pytest.raises(ckptfmt.ArchitectureNotRecognisedError) as excinfo:
        load_model(path)
    assert str(excinfo.value).startswith(f"{path}: has no config (weights only), and no registered architecture recognises these weights (")
    assert str(excinfo.value).endswith(
        "Rebuild it with load_model(path, builder=...) (a function that returns the model), or attach a config "
        "with `convert(SOURCE, model_type='NAME', overrides={'ARGUMENT': 'VALUE'})`"
    )
    shown = run_cli("predict", str(path), str(tmp_path), "--out", str(tmp_path / "out"))
    assert shown.stderr.strip().endswith(
        "or attach a config with `ckptfmt convert SOURCE --model-type NAME --set ARGUMENT=VALUE`")
    with pytest.raises(ckptfmt.ConfigError, match="has no embedded config \\(weights only\\); rebuild it with load_model"):
        ModelConfig.from_checkpoint(path)

    def head(width=5):
        return torch.nn.ModuleDict({"fc": torch.nn.Linear(width, 3)})

    model = load_model(path, builder=head)
    assert state_dicts_bit_identical(model.state_dict(), tensors)
    model, config, checkpoint = load_model_with_config(path, model_factory_fn=head)
    assert config is None and checkpoint["config_source"] is None
    with pytest.raises(ShapeMismatchError) as excinfo:
        load_model(path, builder=lambda: head(width=4))
    assert str(excinfo.value) == f"{path}: the builder's model does not fit the file: it expects fc.weight [3, 4]; the file has [3, 5]"
    report = ckptfmt.verify(path)
    assert report.ok and [c["check"] for c in report.checks] == ["header", "config", "digest"]
    assert report.checks[1]["message"] == "weights only (no config)"


def test_a_loaded_model_saved_again_keeps_what_its_file_said_of_it(tmp_path):
    """load_model, then save: the class names, normalization and description of the file stay,
    and the folder's sidecar agrees; a field given when saving wins."""
    model, _ = small_model()
    first = ckptfmt.save(model, tmp_path / "best.safetensors", class_names=["a", "b"], description="run 7",
                         normalization={"mode": "zscore"})
    again = ckptfmt.save(ckptfmt.load_model(first), tmp_path / "last.safetensors")
    config = ModelConfig.from_checkpoint(again)
    assert (config.class_names, config.description, config.normalization) == (("a", "b"), "run 7", {"mode": "zscore"})
    renamed = ckptfmt.save(ckptfmt.load_model(first), tmp_path / "other/last.safetensors", description="run 8")
    assert ModelConfig.from_checkpoint(renamed).description == "run 8"


class _Versioned(torch.nn.Module):
    """A module whose loading code needs the state dict's version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, not {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_modules_that_need_their_state_dict_version_load(tmp_path, monkeypatch):
    """safetensors keeps no `_metadata`; each module is told its own version, and what the
    architecture's loading code still refuses is our error, naming it."""
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    ckptfmt.register_model("versioned")(_Versioned)
    path = ckptfmt.save(_Versioned(), tmp_path / "v.safetensors")
    assert isinstance(load_model(path), _Versioned)
    monkeypatch.setattr(_Versioned, "_version", 3)
    with pytest.raises(ckptfmt.ConfigError) as excinfo:
        load_model(path)
    assert str(excinfo.value) == f"{path}: versioned did not take the file's weights (ValueError: version should be 2, not 3)"


def test_a_loaded_model_of_a_factory_saves_again(tmp_path, monkeypatch):
    """A factory's model records nothing of itself (as torchvision's and MONAI's): built by
    load_model, it is described by its file's config, so saving it again needs none."""
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    def head(width: int = 3, classes: int = 2) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(width, classes))

    ckptfmt.register_model("head")(head)
    first = ckptfmt.save(ckptfmt.create_model("head", width=5), tmp_path / "a/head.safetensors", description="probe")
    loaded = load_model(first)
    again = ckptfmt.save(loaded, tmp_path / "b/head.safetensors")
    assert ModelConfig.from_checkpoint(again).checked() == ModelConfig.from_checkpoint(first).checked()
    assert ModelConfig.from_checkpoint(again).description == "probe"
