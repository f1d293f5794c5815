"""ModelConfig: the seed's fields and API, strict validation, schema migrations, the sidecar."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from ckptfmt.models.multitask_unet import create_multi_task_model

from ckptfmt import ConfigError, ModelConfig, UnknownModelTypeError
from ckptfmt.config.model_config import SCHEMA_VERSION
from ckptfmt.config.sidecar import read_sidecar, write_sidecar


def test_defaults_are_the_seeds():
    config = ModelConfig()
    assert config.get_model_params() == {
        "base_filters": 64, "depth": 4, "in_channels": 1, "seg_out_channels": 1, "cls_num_classes": 2,
    }
    assert (config.model_type, config.version) == ("multitask", "1.0")


def test_get_model_params_builds_the_model():
    config = ModelConfig(base_filters=8, depth=2, in_channels=3, seg_out_channels=2, cls_num_classes=5)
    model = create_multi_task_model(**config.get_model_params())
    assert model.cls_head.out_features == 5 and model.seg_head.out_channels == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("base_filters", 64.0, "base_filters must be an int, not float 64.0"),
        ("base_filters", True, "base_filters must be an int, not bool True"),
        ("depth", "4", "depth must be an int, not str '4'"),
        ("in_channels", -1, "in_channels must lie in 1..4096, not -1"),
        ("cls_num_classes", 0, "cls_num_classes must lie in 1..1000000, not 0"),
        ("depth", 9, "depth must lie in 1..8, not 9"),
        ("seg_threshold", 1.5, "seg_threshold must be a number between 0 and 1, not 1.5"),
        ("class_names", ["a"], "class_names has 1 names but the model has 2 classes"),
        ("normalization", {"mode": "fixed", "mean": [0.5], "std": [0]},
         "normalization std must be positive, not [0]"),
        ("normalization", {"mode": "zscore", "mean": 1}, "normalization mode 'zscore' takes exactly the keys mode, not mean, mode"),
    ],
)
def test_invalid_values_are_refused_with_the_field_named(field, value, message):
    with pytest.raises(ConfigError) as excinfo:
        ModelConfig(**{field: value})
    assert str(excinfo.value) == message


def test_unknown_model_type_lists_the_registered_ones_and_says_what_to_do():
    with pytest.raises(UnknownModelTypeError) as excinfo:
        ModelConfig(model_type="resnet")
    message = str(excinfo.value)
    assert message.startswith("model_type 'resnet' is not registered here (known: ")
    assert "multitask" in message.split("(known: ")[1].split(")")[0]
    assert message.endswith(
        "Import the module that registers it (its @register_model('resnet')), or install the package "
        "that provides it (entry-point group 'ckptfmt.models')"
    )


def test_import_path_model_type_is_refused_without_importing():
    with pytest.raises(ConfigError, match="import paths are never followed"):
        ModelConfig(model_type="os.system")


def test_unknown_arguments_are_refused_by_name_when_the_config_is_checked(tmp_path):
    """Reading a file does not need its architecture; using the config checks against it."""
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({"base_filters": 32, "dropout": 0.1, "schema_version": 1}))
    config = ModelConfig.load(path)
    assert config.params == {"base_filters": 32, "dropout": 0.1}
    with pytest.raises(ConfigError) as excinfo:
        config.checked()
    assert str(excinfo.value) == (
        f"{path}: 'multitask' (MultiTaskUNet) has no argument 'dropout'; its arguments: base_filters, "
        "depth, in_channels, seg_out_channels, cls_num_classes"
    )
    with pytest.raises(ConfigError, match="has no argument 'dropout'"):
        config.get_model_params()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({"base_filters": 32, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ConfigError, match=rf"written by a newer ckptfmt \(schema {SCHEMA_VERSION + 1}\)"):
        ModelConfig.load(path)


def test_seed_sidecar_without_schema_is_migrated(tmp_path):
    """The original system's model_config.json (schema 0) loads as is."""
    seed = {
        "base_filters": 64, "depth": 4, "in_channels": 1, "seg_out_channels": 1, "cls_num_classes": 2,
        "model_type": "multitask", "version": "1.0",
        "description": "Multi-task model - Joint fine-tuning (FINAL)",
        "trained_on": "BraTS 2020 + Kaggle Brain MRI (both tasks)",
        "training_config": "configs/multitask_joint_quick_test.yaml",
    }
    (tmp_path / "model_config.json").write_text(json.dumps(seed))
    config = ModelConfig.from_checkpoint_dir(tmp_path)
    assert config.checked().to_dict() == {**ModelConfig().to_dict(), **seed, "schema_version": SCHEMA_VERSION}
    assert config.get_model_params() == {key: seed[key] for key in ModelConfig().params}


def test_missing_sidecar_is_an_error_not_a_default(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_config.json here; run `ckptfmt convert"):
        ModelConfig.from_checkpoint_dir(tmp_path)


def test_save_load_round_trip_and_no_silent_overwrite(tmp_path):
    config = ModelConfig(base_filters=16, depth=3, class_names=["healthy", "tumour"],
                         normalization={"mode": "fixed", "mean": 0.2, "std": 0.5}, description="x")
    path = config.save(tmp_path / "model_config.json")
    assert ModelConfig.load(path) == config
    assert json.loads(path.read_text())["normalization"] == {"mode": "fixed", "mean": [0.2], "std": [0.5]}
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True to replace it"):
        config.save(path)
    config.replace(depth=2).save(path, overwrite=True)
    assert ModelConfig.load(path).depth == 2


def test_replace_validates_and_names_unknown_fields():
    assert ModelConfig().replace(depth=3).depth == 3
    with pytest.raises(ConfigError, match="has no argument 'detph'"):
        ModelConfig().replace(detph=3)


def test_sidecar_binds_several_files_of_one_config_and_gives_another_config_one_of_its_own(tmp_path):
    """Regression: writing another config for best_model started the folder's model_config.json
    afresh, so last_model, bound there before, lost its sidecar."""
    config = ModelConfig(base_filters=8)
    write_sidecar(tmp_path, config, "best_model.safetensors", "a" * 64)
    write_sidecar(tmp_path, config, "last_model.safetensors", "b" * 64)
    sidecar = read_sidecar(tmp_path)
    assert sidecar.weights == {"best_model.safetensors": "a" * 64, "last_model.safetensors": "b" * 64}
    own = write_sidecar(tmp_path, ModelConfig(base_filters=16), "best_model.safetensors", "c" * 64)
    assert own == tmp_path / "best_model.model_config.json"
    # best_model moved to its own sidecar: the folder's keeps its config and last_model alone.
    sidecar = dataclasses.replace(sidecar, weights={"last_model.safetensors": "b" * 64})
    assert read_sidecar(tmp_path) == sidecar
    assert read_sidecar(own).weights == {"best_model.safetensors": "c" * 64}
    with pytest.raises(ConfigError, match=r"holds another config \(base_filters: 16 != 32\); pass overwrite=True to replace it"):
        write_sidecar(tmp_path, ModelConfig(base_filters=32), "best_model.safetensors", "d" * 64)
    write_sidecar(tmp_path, ModelConfig(base_filters=32), "best_model.safetensors", "d" * 64, overwrite=True)
    assert read_sidecar(own).config.base_filters == 32
    assert read_sidecar(own).weights == {"best_model.safetensors": "d" * 64}
    assert read_sidecar(tmp_path) == sidecar


def test_a_folder_sidecar_bound_to_one_checkpoint_alone_is_replaced_only_when_asked(tmp_path):
    write_sidecar(tmp_path, ModelConfig(base_filters=8), "m.safetensors", "a" * 64)
    with pytest.raises(ConfigError, match=r"holds another config \(base_filters: 8 != 16\); pass overwrite=True to replace it"):
        write_sidecar(tmp_path, ModelConfig(base_filters=16), "m.safetensors", "c" * 64)
    assert write_sidecar(tmp_path, ModelConfig(base_filters=16), "m.safetensors", "c" * 64, overwrite=True) == \
        tmp_path / "model_config.json"
    assert read_sidecar(tmp_path).weights == {"m.safetensors": "c" * 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_config.json"]


@pytest.mark.subprocess  # Its own process: only a fresh one shows what reading imports.
def test_reading_a_config_does_not_import_torch(tmp_path):
    ModelConfig(depth=3).save(tmp_path / "model_config.json")
    code = (
        "import sys; from ckptfmt import ModelConfig\n"
        f"config = ModelConfig.load({str(tmp_path / 'model_config.json')!r})\n"
        "print(config.depth, config.model_type, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["3", "multitask", "False"]
