"""`ckptfmt convert`: legacy .pth -> self-describing .safetensors, per layout and per refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import ModelConfig, convert, load_model, read_header
from ckptfmt.sources.legacy import read_legacy_checkpoint

from .helpers import DEMO_ARCHITECTURE, copy_demo, run_cli, small_model, state_dicts_bit_identical

# The shipped demo checkpoints: one per legacy layout.
LAYOUTS = {
    "bare state_dict": "multitask_seg_warmup/best_model.pth",
    "DataParallel module. prefix": "multitask_cls_head/best_model.pth",
    "model_state_dict + optimizer + epoch + metrics": "multitask_joint/best_model.pth",
    "pre-1.6 serialization": "multitask_joint/last_model.pth",
}


def source_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """What the source holds, unwrapped by hand, independently of ckptfmt's reader."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "state_dict"):
        if key in obj:
            obj = obj[key]
    return {k.removeprefix("module."): v for k, v in obj.items()}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_each_layout_converts_losslessly(tmp_path, layout):
    demo = copy_demo(tmp_path)
    source = demo / LAYOUTS[layout]
    before = source.read_bytes()
    result = convert(source)
    assert result.status == "converted" and result.output == source.with_suffix(".safetensors")
    expected = source_state_dict(source)
    assert state_dicts_bit_identical(load_file(result.output), expected)
    assert result.config.get_model_params() == DEMO_ARCHITECTURE
    original = MultiTaskUNet(**DEMO_ARCHITECTURE)
    original.load_state_dict(expected)
    original.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(load_model(result.output)(x), original(x)))
    assert source.read_bytes() == before


def test_training_record_and_optimizer_are_carried_over(tmp_path):
    demo = copy_demo(tmp_path)
    result = convert(demo / "multitask_joint/best_model.pth")
    header = read_header(result.output)
    legacy = torch.load(demo / "multitask_joint/best_model.pth", weights_only=True)
    assert header.training()["epoch"] == legacy["epoch"]
    assert header.training()["metrics"] == legacy["metrics"]
    provenance = header.provenance()
    assert provenance["source"]["file"] == "best_model.pth"
    assert provenance["source"]["serialization"] == "torch zip"
    assert provenance["source"]["state_dict_key"] == "model_state_dict"
    model = load_model(result.output).train()
    optimizer = torch.optim.Adam(model.parameters())
    ckptfmt.load_training_state(result.output, optimizer)
    restored = optimizer.state_dict()
    for index, state in legacy["optimizer_state_dict"]["state"].items():
        assert all(torch.equal(state[k], restored["state"][index][k]) for k in state)


def test_the_seed_sidecar_supplies_description_and_is_rewritten_with_bindings(tmp_path):
    demo = copy_demo(tmp_path)
    first = convert(demo / "multitask_joint/best_model.pth")
    second = convert(demo / "multitask_joint/last_model.pth")
    assert first.config_source == second.config_source == "sidecar"
    sidecar = json.loads((demo / "multitask_joint/model_config.json").read_text())
    assert sidecar["description"] == "Multi-task model - Joint fine-tuning (demo)"
    assert sidecar["weights"] == {
        "best_model.safetensors": first.weights_sha256, "last_model.safetensors": second.weights_sha256,
    }


def test_prefixes_of_compile_and_ddp_are_stripped(tmp_path):
    model, config = small_model()
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "c.pth")
    result = convert(tmp_path / "c.pth")
    assert state_dicts_bit_identical(load_file(result.output), model.state_dict())
    assert read_header(result.output).provenance()["source"]["stripped_prefixes"] == ["module.", "_orig_mod."]


def test_dtype_cast_is_recorded(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    result = convert(tmp_path / "m.pth", dtype="fp16")
    header = read_header(result.output)
    assert {info.dtype for info in header.tensors.values()} == {"F16", "I64"}
    floats = sum(v.is_floating_point() for v in model.state_dict().values())
    assert header.provenance()["cast"] == {"to": "F16", "from": {"F32": floats}}
    expected = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert state_dicts_bit_identical(load_file(result.output), expected)


def test_set_overrides_are_checked_against_the_weights(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    with pytest.raises(ckptfmt.ShapeMismatchError, match=r"depth=3 expects .*\(the weights say depth=2\)"):
        convert(tmp_path / "m.pth", overrides={"depth": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]
    result = convert(tmp_path / "m.pth", overrides={"class_names": ["healthy", "tumour"]})
    assert ModelConfig.from_checkpoint(result.output).class_names == ("healthy", "tumour")


def test_a_sidecar_that_does_not_fit_is_an_error_unless_forced(tmp_path):
    """Forced, the file gets a sidecar of its own: a hand-written model_config.json may be the
    config of the folder's other .pth files, and stays theirs."""
    model, _ = small_model(base_filters=4)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    ModelConfig(base_filters=8, depth=2).save(tmp_path / "model_config.json")
    with pytest.raises(ckptfmt.ShapeMismatchError, match="its sidecar model_config.json does not fit the weights: base_filters=8 expects"):
        convert(tmp_path / "m.pth")
    result = convert(tmp_path / "m.pth", force=True)
    assert result.config.base_filters == 4
    assert result.sidecar == tmp_path / "m.model_config.json"
    assert ModelConfig.load(tmp_path / "m.model_config.json").base_filters == 4
    assert ModelConfig.load(tmp_path / "model_config.json").base_filters == 8
    assert ckptfmt.verify(result.output).ok and convert(tmp_path / "m.pth").status == "skipped"


def test_unrecognised_weights_convert_as_weights_only(tmp_path):
    tensors = {"fc.weight": torch.randn(3, 5), "fc.bias": torch.randn(3)}
    torch.save(tensors, tmp_path / "mlp.pth")
    result = run_cli("convert", tmp_path / "mlp.pth")
    assert result.returncode == 0
    assert "weights only, no config" in result.stdout
    assert "warning: " in result.stderr and "converted as weights only" in result.stderr
    output = tmp_path / "mlp.safetensors"
    assert state_dicts_bit_identical(load_file(output), tensors)
    assert not (tmp_path / "model_config.json").exists()
    shown = run_cli("inspect", output)
    assert "config      none: weights only" in shown.stdout


def test_model_type_with_config_attaches_a_config(tmp_path, monkeypatch):
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    @registry.register_model("linearhead")
    class LinearHead(torch.nn.Module):
        def __init__(self, in_channels=1, cls_num_classes=2, **architecture):
            super().__init__()
            self.fc = torch.nn.Linear(in_channels, cls_num_classes)

    tensors = {"fc.weight": torch.randn(3, 5), "fc.bias": torch.randn(3)}
    torch.save(tensors, tmp_path / "head.pth")
    (tmp_path / "cfg").mkdir()
    ModelConfig(model_type="linearhead", in_channels=5, cls_num_classes=3).save(tmp_path / "cfg/head.json")
    result = run_cli("convert", tmp_path / "head.pth", "--model-type", "linearhead",
                     "--config", tmp_path / "cfg/head.json")
    assert result.returncode == 0, result.stderr
    assert ModelConfig.from_checkpoint(tmp_path / "head.safetensors").model_type == "linearhead"


def test_cli_converts_a_folder_with_a_report(tmp_path):
    copy_demo(tmp_path)
    result = run_cli("convert", "checkpoints", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "[OK]   checkpoints/multitask_cls_head/best_model.pth -> checkpoints/multitask_cls_head/best_model.safetensors  multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)",
        "       weights: state_dict; config: inferred from the weights; training record: epoch",
        "[OK]   checkpoints/multitask_joint/best_model.pth -> checkpoints/multitask_joint/best_model.safetensors  multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)",
        "       weights: model_state_dict; config: the sidecar; training record: epoch, metrics; companion best_model.optimizer.safetensors: optimizer_state_dict",
        "[OK]   checkpoints/multitask_joint/last_model.pth -> checkpoints/multitask_joint/last_model.safetensors  multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)",
        "       weights: model_state_dict; config: the sidecar; training record: epoch",
        "[OK]   checkpoints/multitask_seg_warmup/best_model.pth -> checkpoints/multitask_seg_warmup/best_model.safetensors  multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)",
        "       weights: (the whole file: a bare state dict); config: inferred from the weights",
        "4 converted, 0 skipped, 0 failed",
    ]
    assert "[1/4] checkpoints/multitask_cls_head/best_model.pth" in result.stderr
    again = run_cli("convert", "checkpoints", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "0 converted, 4 skipped, 0 failed"
    assert again.stdout.startswith("[SKIP] checkpoints/multitask_cls_head/best_model.pth: already converted")


def test_changed_source_is_not_skipped_and_not_overwritten_without_force(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    convert(tmp_path / "m.pth")
    torch.save(small_model(seed=3)[0].state_dict(), tmp_path / "m.pth")
    with pytest.raises(FileExistsError, match="m.safetensors: already exists; pass overwrite=True to replace it"):
        convert(tmp_path / "m.pth")
    assert convert(tmp_path / "m.pth", force=True).status == "converted"


def test_output_folder_mirrors_the_layout_and_json_is_pure(tmp_path):
    copy_demo(tmp_path)
    result = run_cli("convert", "checkpoints", "-o", "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["converted"], document["failed"]) == (4, 0)
    assert (tmp_path / "out/multitask_joint/best_model.safetensors").exists()
    assert (tmp_path / "out/multitask_joint/model_config.json").exists()
    assert not (tmp_path / "checkpoints/multitask_joint/best_model.safetensors").exists()


def test_a_failed_file_does_not_stop_the_others(tmp_path):
    copy_demo(tmp_path)
    (tmp_path / "checkpoints/broken.pth").write_bytes(b"\x80\x02not a checkpoint")
    result = run_cli("convert", "checkpoints", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "4 converted, 0 skipped, 1 failed"
    assert result.stderr.splitlines()[-1].startswith("[FAIL] checkpoints/broken.pth: ")
    assert "Traceback" not in result.stderr


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_os_system_payload_is_refused_nothing_run_nothing_written(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "x": _Payload(marker)}, tmp_path / "evil.pth")
    result = run_cli("convert", "evil.pth", cwd=tmp_path)
    assert result.returncode == 1
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines() == ["0 converted, 0 skipped, 1 failed"]
    assert result.stderr.splitlines() == [
        "[FAIL] evil.pth: refused to unpickle: it needs the global posix.system, which the safe "
        "(weights-only) loader does not allow because unpickling it can run code. If you trust "
        "this file, convert it with `ckptfmt convert SOURCE --unsafe-pickle`"
    ]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_archive_is_refused_saying_what_it_is(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(ckptfmt.LegacyCheckpointError, match=r"is a TorchScript archive \(torch.jit.save\)"):
        convert(tmp_path / "scripted.pt")


def test_unsafe_pickle_is_explicit(tmp_path):
    import datetime

    model, _ = small_model()
    torch.save({"state_dict": model.state_dict(), "started": datetime.date(2024, 5, 1)}, tmp_path / "m.pth")
    with pytest.raises(ckptfmt.UnsafePickleError, match="needs the global datetime.date"):
        convert(tmp_path / "m.pth")
    result = convert(tmp_path / "m.pth", unsafe_pickle=True)
    assert state_dicts_bit_identical(load_file(result.output), model.state_dict())
    assert result.dropped["started"].startswith("neither JSON nor the companion can hold it: ")


def test_reader_unwraps_extra_training_data(tmp_path):
    model, _ = small_model()
    torch.save({"net": model.state_dict(), "epoch": 7, "best_dice": torch.tensor(0.5), "scheduler": {"last_epoch": 7}}, tmp_path / "m.pth")
    legacy = read_legacy_checkpoint(tmp_path / "m.pth")
    assert legacy.wrapper_key == "net"
    assert legacy.training == {"epoch": 7, "extra": {"best_dice": 0.5}}
    assert legacy.companion == {"scheduler": {"last_epoch": 7}}


@pytest.mark.subprocess  # Its own process: the tool is a script, run as the seed's users run it.
def test_generate_model_configs_prints_the_seed_report(tmp_path):
    demo = copy_demo(tmp_path)
    (demo / "multitask_joint/model_config.json").unlink()
    from .helpers import ROOT, run

    result = run(str(ROOT / "tools/generate_model_configs.py"), str(demo))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "=" * 80,
        "Generating Model Configuration Files",
        "=" * 80,
        "",
        "[OK] Generated config for: multitask_cls_head",
        f"  Location: {demo}/multitask_cls_head/model_config.json",
        "  Architecture: multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)",
        "",
        "[OK] Generated config for: multitask_joint",
        f"  Location: {demo}/multitask_joint/model_config.json",
        "  Architecture: multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)",
        "",
        "[OK] Generated config for: multitask_seg_warmup",
        f"  Location: {demo}/multitask_seg_warmup/model_config.json",
        "  Architecture: multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)",
        "",
        "=" * 80,
        "✅ Generated 3 configuration files",
        "=" * 80,
    ]
    assert ModelConfig.from_checkpoint_dir(demo / "multitask_joint").get_model_params() == DEMO_ARCHITECTURE


def test_ties_views_scalars_and_empty_tensors_survive_conversion(tmp_path):
    """torch.save keeps shared storages; the converted file keeps ties and every value."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "embed.weight": base,
        "head.weight": base,  # tied, as in a language model's embedding and output layer
        "transposed": base.t(),  # a non-contiguous view of the same storage
        "row": base[1],  # a view at an offset
        "scale": torch.tensor(3.5, dtype=torch.float64),
        "steps": torch.tensor(7),
        "empty": torch.zeros(0, 5, dtype=torch.bfloat16),
    }
    torch.save(tensors, tmp_path / "odd.pth")
    result = convert(tmp_path / "odd.pth")
    assert result.config is None  # no registered architecture: weights only
    header = read_header(result.output)
    assert header.aliases == {"head.weight": "embed.weight"}
    loaded = ckptfmt.read_state_dict(result.output)
    assert state_dicts_bit_identical(loaded, {k: v.contiguous() for k, v in tensors.items()})
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


def test_model_type_and_set_attach_a_config_to_weights_no_architecture_recognises(tmp_path, monkeypatch):
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    @registry.register_model("linear_head")
    class LinearHead(torch.nn.Module):
        def __init__(self, in_features: int = 1, classes: int = 2):
            super().__init__()
            self.fc = torch.nn.Linear(in_features, classes)

    torch.save({"fc.weight": torch.randn(3, 5), "fc.bias": torch.randn(3)}, tmp_path / "head.pth")
    wrong = run_cli("convert", tmp_path / "head.pth", "--model-type", "linear_head",
                    "--set", "in_features=5", "--set", "classes=4")
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines()[-1] == (
        f"[FAIL] {tmp_path / 'head.pth'}: the config expects fc.weight [4, 5]; the file has [3, 5], and 1 more "
        "mismatch; fix the config"
    )
    result = run_cli("convert", tmp_path / "head.pth", "--model-type", "linear_head",
                     "--set", "in_features=5", "--set", "classes=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith("linear_head(classes=3, in_features=5)")
    assert ModelConfig.from_checkpoint(tmp_path / "head.safetensors").params == {"in_features": 5, "classes": 3}
    assert isinstance(load_model(tmp_path / "head.safetensors"), LinearHead)


def _register_linear(registry, name: str, *, scale: float = 1.0, preference: int = 0):
    """An architecture whose state dict is one `fc` layer: any two of these are twins."""
    from ckptfmt import ArchitectureNotRecognisedError, Task

    def infer(shapes):
        if set(shapes) != {"fc.weight", "fc.bias"}:
            raise ArchitectureNotRecognisedError("not one fc layer")
        return {"width": shapes["fc.weight"][1]}

    class Linear(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.fc = torch.nn.Linear(width, 2)

        def forward(self, x):
            return self.fc(x) * scale

    task = lambda params: Task("classification", in_channels=1, classes=2, input_size=(1, params["width"]))  # noqa: E731
    registry.register_model(name, infer_config=infer, task=task, preference=preference)(Linear)


def test_twins_that_compute_the_same_function_are_recorded_and_the_preferred_one_chosen(tmp_path, monkeypatch):
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    _register_linear(registry, "twin_b", preference=1)
    _register_linear(registry, "twin_a", preference=2)
    torch.save({f"fc.{k}": v for k, v in torch.nn.Linear(4, 2).state_dict().items()}, tmp_path / "fc.pth")
    result = convert(tmp_path / "fc.pth")
    assert result.config.model_type == "twin_b"
    assert read_header(result.output).provenance()["identified"] == {
        "chosen": "twin_b(width=4)", "twins": ["twin_a(width=4)"],
        "probe": "the same weights gave exactly equal outputs in every candidate",
    }


def test_twins_that_compute_different_functions_are_refused_with_the_candidates(tmp_path, monkeypatch):
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    _register_linear(registry, "plain")
    _register_linear(registry, "doubled", scale=2.0)
    torch.save({f"fc.{k}": v for k, v in torch.nn.Linear(4, 2).state_dict().items()}, tmp_path / "fc.pth")
    with pytest.raises(ckptfmt.AmbiguousArchitectureError) as excinfo:
        convert(tmp_path / "fc.pth")
    assert str(excinfo.value) == (
        f"{tmp_path / 'fc.pth'}: fits 2 architectures with the same tensor names and shapes (doubled(width=4); "
        "plain(width=4)), and the probe gives different outputs for doubled(width=4) and plain(width=4); say "
        "which with model_type= and overrides=, e.g. `model_type='doubled', overrides={'width': 4}`"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fc.pth"]
    shown = run_cli("convert", tmp_path / "fc.pth")
    assert shown.stderr.splitlines()[-1].endswith(
        "say which with --model-type and --set, e.g. `--model-type doubled --set width=4`")
    settled = convert(tmp_path / "fc.pth", model_type="plain", overrides={"width": 4})
    assert settled.config.model_type == "plain"


def test_each_failure_is_said_in_the_words_of_where_it_was_made(tmp_path):
    """The library's messages name its arguments; the command line's, the options that set them."""
    source = tmp_path / "joint/best_model.pth"
    source.parent.mkdir()
    model, _ = small_model()
    torch.save(model.state_dict(), source)
    (source.parent / "model_config.json").write_text(json.dumps({"model_type": "multitask", "base_filters": 8}))
    cases = [
        ({"overrides": {"depth": 9}}, ["--set", "depth=9"],
         "overrides={'depth': 9} rejected: depth must lie in 1..8, not 9", "--set depth=9 rejected: depth must lie in 1..8, not 9"),
        ({"model_type": "resnet18"}, ["--model-type", "resnet18"], "model_type 'resnet18' is not registered here",
         "model_type 'resnet18' is not registered here"),
        ({}, [], "Fix or remove the sidecar, pass config=, or pass force=True to replace it",
         "Fix or remove the sidecar, pass --config, or pass --force to replace it"),
    ]
    for arguments, options, in_python, on_the_command_line in cases:
        with pytest.raises(ckptfmt.CkptfmtError) as excinfo:
            convert(source, **arguments)
        assert in_python in str(excinfo.value)
        result = run_cli("convert", str(source), *options)
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1].startswith(f"[FAIL] {source}: ")
        assert on_the_command_line in result.stderr.splitlines()[-1]
    with pytest.raises(ckptfmt.ConfigError, match=r"dtype='f16' is not one of fp16, bf16, fp32"):
        convert(source, dtype="f16")


def test_a_plain_safetensors_converts_as_a_state_dict_does(tmp_path):
    """A `save_file` of a state dict (the Hub's, timm's, a training script's) is identified and
    written self-describing: to -o, or in place when asked; a rerun says it is ckptfmt's now."""
    from safetensors.torch import save_file

    model, config = small_model()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    refused = run_cli("convert", str(tmp_path / "model.safetensors"))
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(
        "model.safetensors: is both the source and the output; pass --force to rewrite it in place, or choose "
        "another output (-o)")
    result = ckptfmt.convert(tmp_path / "model.safetensors", output=tmp_path / "out/model.safetensors")
    assert (result.config_source, result.config.params) == ("inferred", config.params)
    in_place = run_cli("convert", str(tmp_path / "model.safetensors"), "--force")
    assert in_place.returncode == 0, in_place.stderr
    assert ckptfmt.verify(tmp_path / "model.safetensors").ok
    assert read_header(tmp_path / "model.safetensors").provenance()["source"]["sha256"] == result.source_sha256
    again = run_cli("convert", str(tmp_path / "model.safetensors"))
    assert again.returncode == 0
    assert again.stdout.splitlines()[0] == (
        f"[SKIP] {tmp_path / 'model.safetensors'}: already a ckptfmt checkpoint; nothing to convert (check it "
        "with verify)")


def test_resuming_with_a_state_the_source_did_not_hold_says_so_in_terms_of_the_source(tmp_path):
    """Regression: a converted file without a scheduler advised passing scheduler= to
    save_model_with_config, which a conversion never called."""
    model, _ = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "run.pth")
    output = convert(tmp_path / "run.pth").output
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(ckptfmt.CheckpointNotFoundError) as excinfo:
        ckptfmt.load_training_state(output, optimizer, scheduler=scheduler)
    assert str(excinfo.value) == (f"{output}: was saved without scheduler state; its source 'run.pth' held none to "
                                  "carry over; resume without scheduler= (a fresh scheduler)")


def test_a_pth_whose_zip_entries_are_deflated_converts_inspects_and_diffs(tmp_path):
    """Regression: a .pth re-compressed with deflate (torch reads it) was read by inspect and
    diff, but convert, which maps stored entries from the file, called it "damaged, truncated or
    not a checkpoint". Its compressed tensors are read instead of mapped, through the same reader."""
    import zipfile

    model, _ = small_model()
    stored = tmp_path / "stored.pth"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 2}, stored)
    source = tmp_path / "deflated.pth"
    with zipfile.ZipFile(stored) as original, zipfile.ZipFile(source, "w", compression=zipfile.ZIP_DEFLATED) as packed:
        for member in original.infolist():
            packed.writestr(member.filename, original.read(member))
    assert torch.load(source, map_location="cpu", weights_only=True)["epoch"] == 2
    converted = run_cli("convert", source)
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout.startswith(f"[OK]   {source} -> {tmp_path / 'deflated.safetensors'}  multitask(")
    assert state_dicts_bit_identical(load_file(tmp_path / "deflated.safetensors"), model.state_dict())
    assert run_cli("verify", tmp_path / "deflated.safetensors").returncode == 0
    inspected = run_cli("inspect", source)
    assert inspected.returncode == 0 and "legacy pickle (torch zip)" in inspected.stdout
    for other in (stored, tmp_path / "deflated.safetensors"):
        compared = run_cli("diff", source, other)
        assert compared.returncode == 0, compared.stdout
        assert compared.stdout.splitlines()[-1].endswith("the checkpoints are identical")
    refused = run_cli("verify", source)
    assert refused.stderr == (f"[FAIL] {source}: is a legacy pickle checkpoint, which records nothing to verify "
                              "against; convert it with `ckptfmt convert`\n")
