"""A Hub-style folder (`config.json` beside `model.safetensors`) converts with the config that a
registered architecture reads from its `config.json` (`read_foreign_config`), its inference
fields included; a document no architecture reads is left alone, and one that does not fit the
weights, or breaks the JSON rules, is refused naming it. timm's own reading is tested with timm,
in tests/zoo/test_hub_folders.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ckptfmt
from ckptfmt import ModelConfig, Task

from .helpers import run_cli


class _Classifier(torch.nn.Module):
    def __init__(self, width: int = 4, num_classes: int = 2):
        super().__init__()
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _read(document: dict[str, Any]) -> dict[str, Any] | None:
    """A document of this library's own shape: `{"architecture": "classifier", "args": {...},
    "labels": [...], "mean": ..., "std": ...}`."""
    if document.get("architecture") != "classifier":
        return None
    return {**document["args"], "class_names": document["labels"],
            "normalization": {"mode": "fixed", "mean": document["mean"], "std": document["std"]}}


@pytest.fixture
def registered(monkeypatch):
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    def task(params):
        return Task("classification", in_channels=1, classes=params["num_classes"], input_size=(1, params["width"]))

    registry.register_model("classifier", task=task, read_foreign_config=_read)(_Classifier)


def _hub_folder(tmp_path: Path, document: dict[str, Any], width: int = 4) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "hub"
    folder.mkdir()
    tensors = _Classifier(width=width, num_classes=3).state_dict()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(document))
    return folder, tensors


DOCUMENT = {"architecture": "classifier", "args": {"width": 4, "num_classes": 3}, "labels": ["a", "b", "c"],
            "mean": 0.5, "std": 0.25}


def test_a_hub_folder_converts_with_the_config_its_config_json_gives(tmp_path, registered):
    folder, tensors = _hub_folder(tmp_path, DOCUMENT)
    result = run_cli("convert", folder, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        f"[OK]   {folder}/model.safetensors -> {tmp_path}/out/model.safetensors  classifier(num_classes=3, width=4)",
        "       weights: (the whole file: a bare state dict); config: config.json"]
    config = ModelConfig.from_checkpoint(tmp_path / "out/model.safetensors")
    assert config.class_names == ("a", "b", "c")
    assert config.normalization == {"mode": "fixed", "mean": [0.5], "std": [0.25]}
    assert run_cli("verify", tmp_path / "out").returncode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, loaded, _ = ckptfmt.load_model_with_config(folder / "model.safetensors")
    assert loaded == config and torch.equal(model.fc.weight, tensors["fc.weight"])


def test_a_config_json_that_does_not_fit_the_weights_is_refused_naming_it(tmp_path, registered):
    folder, _ = _hub_folder(tmp_path, {**DOCUMENT, "args": {"width": 5, "num_classes": 3}})
    result = run_cli("convert", folder, "-o", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"[FAIL] {folder}/model.safetensors: its config.json does not fit the weights: the config expects fc.weight "
        "[3, 5]; the file has [3, 4]; fix the config. Pass --config to say what it is")
    assert not (tmp_path / "out").exists()


def test_a_config_json_that_no_architecture_reads_is_left_alone(tmp_path, registered):
    """transformers' config.json, say: the weights convert as any plain safetensors does."""
    folder, _ = _hub_folder(tmp_path, {"architectures": ["BertModel"], "model_type": "bert"})
    result = run_cli("convert", folder, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "config: none (weights only)" in result.stdout


def test_a_config_json_that_breaks_the_json_rules_is_refused(tmp_path, registered):
    folder, _ = _hub_folder(tmp_path, DOCUMENT)
    (folder / "config.json").write_text('{"architecture": "classifier", "mean": NaN}')
    with pytest.raises(ckptfmt.ConfigError) as refused:
        ckptfmt.convert(folder, output=tmp_path / "out.safetensors")
    assert str(refused.value).startswith(f"{folder}/config.json: ")
    assert "NaN" in str(refused.value)
