"""torchvision's models: built through `ckptfmt.create_model` (torchvision records nothing of
how a model was built), converted from bare state dicts, and run by the predictor."""

from __future__ import annotations

import json

import pytest
import torch

import ckptfmt
from ckptfmt import AmbiguousArchitectureError, ConfigError, ModelConfig

from ..helpers import DEMO, run_cli
from .libraries import assert_rebuilt_identically, require, with_batch_statistics

pytestmark = pytest.mark.zoo
torchvision = require("torchvision")

# A classifier whose classifier is a convolution, one with a Linear head, a segmentation model,
# and MNASNet, whose loading code refuses a state dict without torch's version metadata.
MODELS = [("squeezenet1_1", {"num_classes": 3}), ("mobilenet_v3_small", {"num_classes": 5}),
          ("lraspp_mobilenet_v3_large", {"num_classes": 2}), ("mnasnet0_5", {"num_classes": 4})]


def built(name: str, **arguments) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ckptfmt.create_model("torchvision", name, **arguments)
    return with_batch_statistics(model, torch.randn(4, 3, 64, 64))


def x(side: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, arguments", MODELS)
def test_built_through_ckptfmt_or_converted_a_torchvision_model_is_rebuilt_in_a_fresh_process(tmp_path, name, arguments):
    """create_model records the arguments, so saving needs no config; a bare state_dict() is
    identified with its num_classes. Both give the model's outputs exactly."""
    model = built(name, **arguments)
    saved = ckptfmt.save(model, tmp_path / "saved/model.safetensors")
    config = ModelConfig.from_checkpoint(saved).checked()
    assert (config.model_type, config.model_name, config.num_classes) == ("torchvision", name, arguments["num_classes"])
    torch.save(model.state_dict(), tmp_path / "model.pth")
    converted = ckptfmt.convert(tmp_path / "model.pth")
    assert converted.config_source == "inferred"
    assert converted.config == config
    assert_rebuilt_identically(model, [saved, converted.output], x(), tmp_path)


def test_resnet18_is_a_twin_of_timms_and_the_model_type_settles_it(tmp_path):
    """torchvision's and timm's resnet18 have the same tensors and compute the same function, but
    timm's resnetblur18 has them too and computes another: the file cannot say which it is."""
    require("timm")
    torch.save(built("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(AmbiguousArchitectureError) as excinfo:
        ckptfmt.convert(tmp_path / "r18.pth")
    assert [c["model_type"] + ":" + c["model_name"] for c in excinfo.value.candidates] == [
        "torchvision:resnet18", "timm:resnet18", "timm:resnetblur18"]
    assert excinfo.value.message.endswith(
        "say which with model_type= and overrides=, e.g. `model_type='torchvision', overrides={'model_name': "
        "'resnet18', 'num_classes': 10}`")
    settled = run_cli("convert", str(tmp_path / "r18.pth"), "--model-type", "torchvision")
    assert settled.returncode == 0, settled.stderr
    assert ModelConfig.from_checkpoint(tmp_path / "r18.safetensors").summary() == (
        'torchvision(model_name="resnet18", num_classes=10)')


def test_weights_are_refused_by_name_and_a_backbone_is_never_downloaded():
    with pytest.raises(ConfigError) as excinfo:
        ckptfmt.create_model("torchvision", "resnet18", weights="DEFAULT")
    assert excinfo.value.message == (
        "weights='DEFAULT' would make torchvision fetch or read weights; ckptfmt builds the model without them "
        "(the checkpoint holds its weights): leave weights out"
    )
    # torchvision's segmentation builders download an ImageNet backbone unless told not to.
    assert ckptfmt.create_model("torchvision", "fcn_resnet50", num_classes=2) is not None


def test_predict_runs_a_classifier_and_a_segmentation_model_on_pngs(tmp_path):
    scans = sorted(map(str, (DEMO / "scans").glob("*.png")))
    classifier = ckptfmt.save(built("squeezenet1_1", num_classes=2), tmp_path / "cls/model.safetensors",
                              class_names=["healthy", "tumour"])
    result = run_cli("predict", str(classifier), *scans, "--out", str(tmp_path / "cls/out"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "cls/out/predictions.json").read_text())["predictions"]
    assert [len(row["class_probabilities"]) for row in rows] == [2] * len(scans)
    segmenter = ckptfmt.save(built("lraspp_mobilenet_v3_large", num_classes=1), tmp_path / "seg/model.safetensors",
                             normalization={"mode": "minmax"})
    result = run_cli("predict", str(segmenter), *scans, "--out", str(tmp_path / "seg/out"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "seg/out/predictions.json").read_text())["predictions"]
    assert all("mask_pixels" in row and "class_probabilities" not in row for row in rows)
    assert sorted(p.name for p in (tmp_path / "seg/out").glob("*_mask.png")) == [f"scan_{i}_mask.png" for i in range(len(scans))]
