"""A Hub-style folder, as timm's `push_to_hub` writes it (`config.json` beside
`model.safetensors`), converted with that config: the architecture and its arguments, the
normalisation and the class names, never a reading of the weights."""

from __future__ import annotations

import json

import pytest
import torch

import ckptfmt
from ckptfmt import ModelConfig

from ..helpers import run_cli
from .libraries import assert_rebuilt_identically, require, with_batch_statistics

pytestmark = pytest.mark.zoo
timm = require("timm")
save_for_hf = require("timm.models._hub").save_for_hf  # what push_to_hub writes, without the upload

LABELS = ["cat", "dog", "owl"]


def _model(name: str, **arguments) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **arguments)


def _hub_folder(tmp_path, model: torch.nn.Module):
    folder = tmp_path / "hub"
    save_for_hf(model, folder, model_config={"label_names": LABELS}, safe_serialization=True)
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]
    return folder


def test_a_timm_hub_folder_converts_with_its_config_json(tmp_path):
    model = with_batch_statistics(_model("test_efficientnet", num_classes=3, in_chans=2), torch.randn(4, 2, 160, 160))
    folder = _hub_folder(tmp_path, model)
    pretrained = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    result = run_cli("convert", folder, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        (f"[OK]   {folder}/model.safetensors -> {tmp_path}/out/model.safetensors  timm(global_pool=\"avg\", in_chans=2, "
         "model_name=\"test_efficientnet\", num_classes=3)"),
        "       weights: (the whole file: a bare state dict); config: config.json",
    ]
    config = ModelConfig.from_checkpoint(tmp_path / "out/model.safetensors")
    assert {k: config.params[k] for k in ("model_name", "num_classes", "in_chans")} == {
        "model_name": "test_efficientnet", "num_classes": 3, "in_chans": 2}
    assert config.class_names == tuple(LABELS)
    assert config.normalization == {"mode": "fixed", "mean": pretrained["mean"], "std": pretrained["std"]}
    assert ckptfmt.verify(tmp_path / "out/model.safetensors").ok

    refused = run_cli("convert", folder)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (f"[FAIL] {folder}/model.safetensors: is both the source and the output; "
                                               "pass --force to rewrite it in place, or choose another output (-o)")
    in_place = run_cli("convert", folder, "--force")
    assert in_place.returncode == 0, in_place.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors", "model_config.json"]
    assert ModelConfig.from_checkpoint(folder / "model.safetensors") == config
    assert run_cli("verify", folder).returncode == 0
    x = torch.randn(2, 2, 160, 160, generator=torch.Generator().manual_seed(1))
    assert_rebuilt_identically(model, [tmp_path / "out/model.safetensors", folder / "model.safetensors"], x, tmp_path)


def test_the_config_json_names_a_model_whose_twin_the_weights_cannot_tell(tmp_path):
    """resnet18 and resnetblur18 have the same tensors: identified from the weights they are
    refused as ambiguous; the folder's config.json says which."""
    folder = _hub_folder(tmp_path, _model("resnet18", num_classes=3, in_chans=1))
    result = ckptfmt.convert(folder, output=tmp_path / "resnet18.safetensors")
    assert (result.config_source, result.config.params["model_name"]) == ("config.json", "resnet18")
    assert result.config.normalization == {"mode": "fixed", "mean": [0.449], "std": [0.226]}


def test_an_older_timm_export_with_its_pretrained_config_at_the_top_level_converts_too(tmp_path):
    folder = _hub_folder(tmp_path, _model("test_vit", num_classes=3, in_chans=1))
    document = json.loads((folder / "config.json").read_text())
    flat = {"architecture": document["architecture"], "num_features": document["num_features"],
            **document["pretrained_cfg"], "labels": dict(enumerate(LABELS))}
    (folder / "config.json").write_text(json.dumps(flat))
    result = ckptfmt.convert(folder, output=tmp_path / "vit.safetensors")
    assert result.config_source == "config.json"
    assert {k: result.config.params[k] for k in ("model_name", "num_classes", "in_chans")} == {
        "model_name": "test_vit", "num_classes": 3, "in_chans": 1}
    assert result.config.class_names == tuple(LABELS)
