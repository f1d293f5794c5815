"""MONAI's networks: built through `ckptfmt.create_model` (MONAI records nothing of how a network
was built), converted from bare state dicts, and run by the predictor in 2-D."""

from __future__ import annotations

import json

import pytest
import torch

import ckptfmt
from ckptfmt import ConfigError, ModelConfig

from ..helpers import DEMO, run_cli
from .libraries import assert_rebuilt_identically, require, with_batch_statistics

pytestmark = pytest.mark.zoo
nets = require("monai.networks.nets")

MODELS = [
    ("UNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [8, 16, 32], "strides": [2, 2],
              "num_res_units": 2}),
    ("BasicUNet", {"spatial_dims": 2, "in_channels": 2, "out_channels": 2, "features": [8, 8, 16, 16, 32, 8]}),
    ("SegResNet", {"spatial_dims": 3, "init_filters": 8, "in_channels": 1, "out_channels": 2,
                   "blocks_down": [1, 1, 2], "blocks_up": [1, 1]}),
]


def built(name: str, **arguments) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ckptfmt.create_model("monai", name, **arguments)
    return with_batch_statistics(model, x(arguments, seed=2))


def x(arguments: dict, *, seed: int = 1) -> torch.Tensor:
    # SwinUNETR halves its input five times, and instance norms want more than one pixel left.
    side = (64 if "feature_size" in arguments else 32,) * arguments["spatial_dims"]
    return torch.randn(2, arguments["in_channels"], *side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, arguments", MODELS)
def test_built_through_ckptfmt_or_converted_a_monai_network_is_rebuilt_in_a_fresh_process(tmp_path, name, arguments):
    """create_model records the arguments, so saving needs no config; a bare state_dict() is
    identified with its shape-changing arguments. Both give the network's outputs exactly."""
    model = built(name, **arguments)
    saved = ckptfmt.save(model, tmp_path / "saved/model.safetensors")
    config = ModelConfig.from_checkpoint(saved).checked()
    assert config.model_type == "monai" and config.model_name == name
    assert {k: config.params[k] for k in arguments} == arguments
    torch.save(model.state_dict(), tmp_path / "model.pth")
    converted = ckptfmt.convert(tmp_path / "model.pth")
    assert converted.config_source == "inferred"
    assert converted.config.model_name == name
    assert {k: converted.config.params[k] for k in arguments} == arguments
    assert_rebuilt_identically(model, [saved, converted.output], x(arguments), tmp_path)


def test_swin_unetr_cannot_be_built_on_meta_and_loads_all_the_same(tmp_path):
    """SwinUNETR computes on its tensors while it is built: its parameters go on the meta
    device, its buffers on the CPU."""
    arguments = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1],
                 "num_heads": [1, 1, 1, 1]}
    model = built("SwinUNETR", **arguments)
    path = ckptfmt.save(model, tmp_path / "swin.safetensors")
    assert_rebuilt_identically(model, [path], x(arguments), tmp_path)


@pytest.mark.parametrize("name", ["DenseNet121", "monai.networks.nets.UNet", "ConfigParser"])
def test_only_the_allow_list_is_built(name):
    with pytest.raises(ConfigError) as excinfo:
        ckptfmt.create_model("monai", name, spatial_dims=2, in_channels=1, out_channels=2)
    assert excinfo.value.message.startswith(f"model_name {name!r} is not ")


def test_predict_runs_a_2d_segresnet_on_pngs(tmp_path):
    arguments = {"spatial_dims": 2, "init_filters": 8, "in_channels": 1, "out_channels": 1}
    path = ckptfmt.save(built("SegResNet", **arguments), tmp_path / "segresnet.safetensors",
                        normalization={"mode": "minmax"})
    scans = sorted(map(str, (DEMO / "scans").glob("*.png")))
    result = run_cli("predict", str(path), *scans, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "out/predictions.json").read_text())["predictions"]
    assert [row["input"] for row in rows] == scans
    assert all("mask_pixels" in row and "class_probabilities" not in row for row in rows)
