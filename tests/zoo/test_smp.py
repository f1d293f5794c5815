"""segmentation_models_pytorch's models: saved straight from smp (which records its arguments),
converted from bare state dicts, and run by the predictor: a Unet with `aux_params` is exactly
the job, masks and class probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ckptfmt
from ckptfmt import ConfigError, ModelConfig

from ..helpers import DEMO, run_cli
from .libraries import assert_rebuilt_identically, require, with_batch_statistics

pytestmark = pytest.mark.zoo
smp = require("segmentation_models_pytorch")

MODELS = [
    ("Unet", {"encoder_name": "resnet18", "in_channels": 1, "classes": 2, "aux_params": {"classes": 3}}),
    ("FPN", {"encoder_name": "mobilenet_v2", "in_channels": 3, "classes": 4}),
]


def trained(arch: str, **arguments) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_weights=None, **arguments)
    return with_batch_statistics(model, torch.randn(4, arguments["in_channels"], 64, 64))


def x(in_channels: int) -> torch.Tensor:
    return torch.randn(2, in_channels, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch, arguments", MODELS)
def test_saved_or_converted_from_a_bare_state_dict_an_smp_model_is_rebuilt_in_a_fresh_process(tmp_path, arch, arguments):
    """Saved straight from smp (which records its arguments); or its bare state_dict()
    converted, the encoder, architecture and head sizes identified. Both give its outputs."""
    model = trained(arch, **arguments)
    saved = ckptfmt.save(model, tmp_path / "saved/model.safetensors")
    config = ModelConfig.from_checkpoint(saved).checked()
    assert config.model_type == "smp" and config.arch == arch.lower()
    assert {k: config.params[k] for k in arguments} == arguments
    assert "encoder_weights" not in config.params
    assert config.task == ("segmentation+classification" if "aux_params" in arguments else "segmentation")
    torch.save(model.state_dict(), tmp_path / "model.pth")
    converted = ckptfmt.convert(tmp_path / "model.pth")
    assert converted.config_source == "inferred"
    assert converted.config == config
    assert_rebuilt_identically(model, [saved, converted.output], x(arguments["in_channels"]), tmp_path)


def test_a_model_built_with_imagenet_encoder_weights_is_saved_without_them(tmp_path):
    """smp records encoder_weights='imagenet' (its default); the checkpoint holds the trained
    weights, so the config leaves it out, and a config that asks for it is refused."""
    model = trained("Unet", encoder_name="resnet18", in_channels=1, classes=1)
    model._hub_mixin_config["encoder_weights"] = "imagenet"  # as smp.Unet("resnet18") records it
    path = ckptfmt.save(model, tmp_path / "model.safetensors")
    assert "encoder_weights" not in ModelConfig.from_checkpoint(path).params
    with pytest.raises(ConfigError) as excinfo:
        ModelConfig("smp", arch="unet", encoder_name="resnet18", encoder_weights="imagenet")
    assert excinfo.value.message == (
        "encoder_weights='imagenet' would make smp fetch or read weights; ckptfmt builds the model without them "
        "(the checkpoint holds its weights): leave encoder_weights out"
    )


def test_predict_runs_an_smp_unet_with_aux_params_on_pngs(tmp_path):
    """The issue's done-when: masks and class probabilities from one smp Unet, on PNG files."""
    model = trained("Unet", encoder_name="resnet18", in_channels=1, classes=1, aux_params={"classes": 2})
    path = ckptfmt.save(model, tmp_path / "unet.safetensors", class_names=["healthy", "tumour"],
                        normalization={"mode": "zscore"})
    scans = sorted(map(str, (DEMO / "scans").glob("*.png")))
    result = run_cli("predict", str(path), *scans, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "out/predictions.json").read_text())
    assert table["class_names"] == ["healthy", "tumour"]
    for scan, row in zip(scans, table["predictions"]):
        assert row["input"] == scan and len(row["class_probabilities"]) == 2
        assert row["class_name"] in ("healthy", "tumour")
        mask = np.array(Image.open(row["outputs"][0]))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert int((mask == 255).sum()) == row["mask_pixels"]
