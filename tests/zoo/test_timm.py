"""timm's models, as a user brings them: saved straight from `timm.create_model`, or as the bare
`state_dict()` of a training script, converted, identified, reloaded and run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import ckptfmt
from ckptfmt import AmbiguousArchitectureError, ConfigError, ModelConfig

from ..helpers import DEMO, run_cli
from .libraries import assert_rebuilt_identically, require, with_batch_statistics

pytestmark = pytest.mark.zoo
timm = require("timm")

# timm's own test models: a ViT (one input size, 160 x 160) and an EfficientNet, tiny and twinless.
MODELS = [("test_vit", {"num_classes": 4, "in_chans": 1}), ("test_efficientnet", {"num_classes": 3, "in_chans": 2})]


def trained(name: str, **arguments) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **arguments)
    size = model.pretrained_cfg["input_size"][1:]
    return with_batch_statistics(model, torch.randn(4, arguments.get("in_chans", 3), *size))


def probe_input(model: torch.nn.Module, in_chans: int) -> torch.Tensor:
    return torch.randn(2, in_chans, *model.pretrained_cfg["input_size"][1:], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, arguments", MODELS)
def test_saved_or_converted_from_a_bare_state_dict_a_timm_model_is_rebuilt_in_a_fresh_process(tmp_path, name, arguments):
    """Saved straight from timm, no config written by hand; or its bare state_dict() converted,
    the model and its num_classes and in_chans identified. Both give its outputs exactly."""
    model = trained(name, **arguments)
    saved = ckptfmt.save(model, tmp_path / "saved/model.safetensors",
                         class_names=[f"c{i}" for i in range(arguments["num_classes"])])
    config = ModelConfig.from_checkpoint(saved).checked()
    assert {k: config.params[k] for k in ("model_name", *arguments)} == {"model_name": name, **arguments}
    assert config.task == "classification"
    torch.save(model.state_dict(), tmp_path / "model.pth")
    converted = ckptfmt.convert(tmp_path / "model.pth")
    assert converted.config_source == "inferred"
    assert converted.config.params == {"model_name": name, **arguments}
    assert_rebuilt_identically(model, [saved, converted.output], probe_input(model, arguments["in_chans"]), tmp_path)


def test_inspect_of_a_bare_timm_pth_shows_the_identified_config_marked_inferred(tmp_path):
    torch.save(trained("test_efficientnet", num_classes=3).state_dict(), tmp_path / "model.pth")
    result = run_cli("inspect", "--json", str(tmp_path / "model.pth"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config_source"] == "inferred"
    assert {k: report["config"][k] for k in ("model_type", "model_name", "num_classes", "in_chans")} == {
        "model_type": "timm", "model_name": "test_efficientnet", "num_classes": 3, "in_chans": 3}


def test_twins_that_compute_different_functions_are_refused_with_every_candidate(tmp_path):
    """efficientnet_b0, efficientnet_blur_b0 and tf_efficientnet_b0 have the same tensors; the
    last pads like TensorFlow, so the same weights give other outputs: never guessed."""
    torch.save(trained("efficientnet_b0", num_classes=4).state_dict(), tmp_path / "model.pth")
    with pytest.raises(AmbiguousArchitectureError) as excinfo:
        ckptfmt.convert(tmp_path / "model.pth")
    first = 'timm(in_chans=3, model_name="efficientnet_b0", num_classes=4)'
    assert excinfo.value.message == (
        f'fits 3 architectures with the same tensor names and shapes ({first}; '
        'timm(in_chans=3, model_name="efficientnet_blur_b0", num_classes=4); '
        'timm(in_chans=3, model_name="tf_efficientnet_b0", num_classes=4)), and the probe gives different outputs '
        f'for {first} and timm(in_chans=3, model_name="efficientnet_blur_b0", num_classes=4); say which with '
        "model_type= and overrides=, e.g. `model_type='timm', overrides={'in_chans': 3, 'model_name': "
        "'efficientnet_b0', 'num_classes': 4}`"
    )
    assert not (tmp_path / "model.safetensors").exists()
    settled = run_cli("convert", str(tmp_path / "model.pth"), "--model-type", "timm", "--set", "model_name=tf_efficientnet_b0")
    assert settled.returncode == 0, settled.stderr
    assert ModelConfig.from_checkpoint(tmp_path / "model.safetensors").model_name == "tf_efficientnet_b0"


def test_twins_that_compute_the_same_function_are_converted_and_recorded(tmp_path):
    """vit_tiny_patch16_224 and deit_tiny_patch16_224 are one network under two names: the
    probe gives exactly equal outputs, so the first by name is chosen and the other recorded."""
    model = trained("vit_tiny_patch16_224", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    result = ckptfmt.convert(tmp_path / "model.pth")
    assert result.config.model_name == "deit_tiny_patch16_224"
    provenance = json.loads(ckptfmt.read_header(result.output).metadata["ckptfmt.provenance"])
    assert provenance["identified"] == {
        "chosen": 'timm(in_chans=3, model_name="deit_tiny_patch16_224", num_classes=3)',
        "twins": ['timm(in_chans=3, model_name="vit_tiny_patch16_224", num_classes=3)'],
        "probe": "the same weights gave exactly equal outputs in every candidate",
    }
    x = probe_input(model, 3)
    with torch.no_grad():
        assert torch.equal(ckptfmt.load_model(result.output)(x), model(x))


@pytest.mark.parametrize("name, why", [
    ("hf-hub:timm/resnet18.a1_in1k", "hub"), ("hf_hub:timm/resnet18.a1_in1k", "hub"),
    ("local-dir:/tmp/resnet18", "hub"), ("timm/resnet18", "hub"), ("resnet18.a1_in1k", "tag"),
    ("resnet_18", "unknown"),
])
def test_names_that_would_fetch_or_read_files_are_refused_before_timm_sees_them(tmp_path, name, why):
    expected = {
        "hub": (f"model_name {name!r} is not one of timm's own model names: names with ':' or '/' (hub ids, local "
                "folders, import paths) make the library fetch or read files, which ckptfmt never does; give the "
                "architecture's name ('resnet18' here), and the checkpoint holds the weights"),
        "tag": ("model_name 'resnet18.a1_in1k' names pretrained weights ('a1_in1k'), which ckptfmt never downloads; "
                "give the architecture, 'resnet18' (the checkpoint holds the weights)"),
        "unknown": f"model_name 'resnet_18' is not one of timm's {len(timm.list_models())} models; did you mean 'resnet18' or 'resnetv2_18' or 'resnet18d'?",
    }[why]
    with pytest.raises(ConfigError) as excinfo:
        ckptfmt.create_model("timm", name)
    assert excinfo.value.message == expected
    # The same name in a file's config: refused when the file is loaded, before anything is built.
    config = json.dumps({"model_type": "timm", "model_name": name, "num_classes": 2, "schema_version": 2})
    save_file({"w": torch.zeros(1)}, tmp_path / "hub.safetensors",
              metadata={"format": "pt", "ckptfmt.format_version": "2", "ckptfmt.config": config})
    with pytest.raises(ConfigError) as excinfo:
        ckptfmt.load_model(tmp_path / "hub.safetensors")
    assert excinfo.value.message == expected


def test_pretrained_weights_are_refused_by_name():
    with pytest.raises(ConfigError) as excinfo:
        ckptfmt.create_model("timm", "resnet18", pretrained=True)
    assert excinfo.value.message == (
        "pretrained=True would make timm fetch or read weights; ckptfmt builds the model without them (the "
        "checkpoint holds its weights): leave pretrained out"
    )


def test_predict_runs_a_timm_classifier_on_pngs_at_its_input_size(tmp_path):
    """test_vit takes 160 x 160 only: the 64 x 64 scans are resized to it; a classifier writes
    class probabilities and no masks."""
    model = trained("test_vit", num_classes=2, in_chans=1)
    path = ckptfmt.save(model, tmp_path / "vit.safetensors", class_names=["healthy", "tumour"],
                        normalization={"mode": "zscore"})
    scans = sorted((DEMO / "scans").glob("*.png"))
    result = run_cli("predict", str(path), *map(str, scans), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "out/predictions.json").read_text())
    assert table["class_names"] == ["healthy", "tumour"]
    assert [row["input"] for row in table["predictions"]] == list(map(str, scans))
    for row in table["predictions"]:
        assert row["class_name"] in ("healthy", "tumour") and len(row["class_probabilities"]) == 2
        assert row["outputs"] == [] and "mask_pixels" not in row
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.json"]
