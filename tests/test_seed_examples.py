"""The original system's usage examples (seed/model_config_management.md), with our import paths."""

from __future__ import annotations

import logging

import pytest
import torch

import ckptfmt

from .helpers import ROOT, run


def test_training_then_inference_examples(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    # --- 2. During Training --------------------------------------------------------------
    from ckptfmt.models.multitask_unet import create_multi_task_model

    from ckptfmt import ModelConfig, save_model_with_config

    config = ModelConfig(
        base_filters=8,
        depth=3,
        in_channels=1,
        seg_out_channels=1,
        cls_num_classes=2,
        description="Multi-task model for brain tumor detection",
        trained_on="BraTS 2020 + Kaggle Brain MRI",
    )
    model = create_multi_task_model(**config.get_model_params())
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint_dir = tmp_path / "checkpoints" / "multitask_joint"
    epoch = 5
    # The seed names a .pth; it is written as .safetensors, with a warning naming it.
    with pytest.warns(ckptfmt.CkptfmtWarning, match="best_model.safetensors"):
        save_model_with_config(
            model=model,
            checkpoint_path=checkpoint_dir / "best_model.pth",
            config=config,
            optimizer=optimizer,
            epoch=epoch,
            metrics={"dice": 0.88, "accuracy": 0.90},
        )
    assert (checkpoint_dir / "model_config.json").exists()

    # --- 3. During Inference ----------------------------------------------------------------
    from ckptfmt import MultiTaskPredictor

    with caplog.at_level(logging.INFO, logger="ckptfmt"):
        predictor = MultiTaskPredictor(checkpoint_path="checkpoints/multitask_joint/best_model.pth")
    assert "Loaded model config from: checkpoints/multitask_joint/best_model.safetensors" in caplog.text
    assert "Using architecture: multitask(base_filters=8, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)" in caplog.text
    predictor = MultiTaskPredictor(
        checkpoint_path="checkpoints/multitask_joint/best_model.pth",
        base_filters=8,  # Override
        depth=3,  # Override
    )
    assert predictor.config.get_model_params() == config.get_model_params()
    from ckptfmt import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match=r"depth=4 expects"):
        MultiTaskPredictor(checkpoint_path="checkpoints/multitask_joint/best_model.pth", depth=4)

    # --- API Reference: ModelConfig -----------------------------------------------------------
    config = ModelConfig(base_filters=64, depth=4, in_channels=1, seg_out_channels=1, cls_num_classes=2)
    config.save("checkpoints/my_model/model_config.json")
    config = ModelConfig.load("checkpoints/my_model/model_config.json")
    config = ModelConfig.from_checkpoint_dir("checkpoints/my_model")
    params = config.get_model_params()
    assert params == {"base_filters": 64, "depth": 4, "in_channels": 1, "seg_out_channels": 1, "cls_num_classes": 2}

    # --- API Reference: helper functions ------------------------------------------------------
    from ckptfmt import load_model_with_config

    small = ModelConfig(base_filters=4, depth=2)
    model = create_multi_task_model(**small.get_model_params())
    with pytest.warns(ckptfmt.CkptfmtWarning, match="best.safetensors"):
        save_model_with_config(
            model=model,
            checkpoint_path="checkpoints/my_model/best.pth",
            config=small,
            optimizer=torch.optim.Adam(model.parameters()),
            epoch=10,
            metrics={"accuracy": 0.95},
            overwrite=True,  # the folder's sidecar above describes another architecture
        )
    model, config, checkpoint = load_model_with_config(
        checkpoint_path="checkpoints/my_model/best.pth",
        model_factory_fn=create_multi_task_model,
        device="cpu",
    )
    assert config == small and checkpoint["epoch"] == 10 and checkpoint["metrics"] == {"accuracy": 0.95}


@pytest.mark.subprocess  # Its own process: the tool is a script, run as the seed's users run it.
def test_generator_example_runs(tmp_path):
    """`python scripts/generate_model_configs.py` is now tools/generate_model_configs.py."""
    import shutil

    shutil.copytree(ROOT / "checkpoints", tmp_path / "checkpoints")
    result = run(str(ROOT / "tools/generate_model_configs.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "✅ Generated 3 configuration files" in result.stdout
