"""The one resolution of a checkpoint: where its config comes from, in order, and what it does
when a source does not fit the weights."""

from __future__ import annotations

import json

import pytest
import torch

import ckptfmt
from ckptfmt.resolve import read_source, resolve

from .helpers import small_model


def _training_dict(tmp_path, *, hyper_parameters=None, sidecar=None, name="m.ckpt"):
    model, _ = small_model()
    document = {"state_dict": model.state_dict(), "epoch": 2}
    if hyper_parameters is not None:
        document["hyper_parameters"] = hyper_parameters
    torch.save(document, tmp_path / name)
    if sidecar is not None:
        (tmp_path / "model_config.json").write_text(json.dumps({"model_type": "multitask", **sidecar}))
    return tmp_path / name


def test_a_given_config_beats_the_sidecar_which_beats_the_file_s_hyper_parameters(tmp_path):
    unet = {"base_filters": 4, "depth": 2}
    path = _training_dict(tmp_path, hyper_parameters={**unet, "lr": 0.1}, sidecar={**unet, "description": "sidecar"})
    assert resolve(read_source(path)).origin == "sidecar"
    given = ckptfmt.ModelConfig(**unet, description="given")
    resolution = resolve(read_source(path), config=given)
    assert (resolution.origin, resolution.config.description) == ("--config", "given")
    (tmp_path / "model_config.json").unlink()
    assert resolve(read_source(path)).origin == "hyper_parameters"


def test_hyper_parameters_that_are_not_the_architecture_s_leave_it_to_identification(tmp_path):
    path = _training_dict(tmp_path, hyper_parameters={"base_filters": 8, "depth": 3, "lr": 0.1})
    resolution = resolve(read_source(path))
    assert resolution.origin == "inferred"
    assert (resolution.config.base_filters, resolution.config.depth) == (4, 2)


def test_a_sidecar_that_does_not_fit_is_refused_by_name_or_passed_over_when_it_may_be_replaced(tmp_path):
    path = _training_dict(tmp_path, sidecar={"base_filters": 8, "depth": 3})
    with pytest.raises(ckptfmt.ShapeMismatchError) as refused:
        resolve(read_source(path))
    assert str(refused.value).startswith(f"{path}: its sidecar model_config.json does not fit the weights: ")
    assert str(refused.value).endswith(". Fix or remove the sidecar")
    with pytest.raises(ckptfmt.ShapeMismatchError) as refused:
        resolve(read_source(path), replace_sidecar=False)
    assert refused.value.describe(cli=True).endswith(
        "Fix or remove the sidecar, pass --config, or pass --force to replace it with the config inferred from the "
        "weights")
    resolution = resolve(read_source(path), replace_sidecar=True)
    assert resolution.origin == "inferred"
    assert [str(w) for w in resolution.warnings][0].startswith("the sidecar did not fit the weights (")


def test_overrides_apply_on_top_of_whatever_wins_and_are_checked_against_the_weights(tmp_path):
    path = _training_dict(tmp_path)
    resolution = resolve(read_source(path), overrides={"description": "joint run"})
    assert (resolution.origin, resolution.overridden, resolution.config.description) == ("inferred", True, "joint run")
    with pytest.raises(ckptfmt.ShapeMismatchError, match="depth=3 expects .*; remove the override"):
        resolve(read_source(path), overrides={"depth": 3})


def test_weights_no_architecture_recognises_are_weights_only_and_say_why(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 3)}, tmp_path / "head.pth")
    resolution = resolve(read_source(tmp_path / "head.pth"))
    assert resolution.config is None and resolution.origin is None
    assert isinstance(resolution.unresolved, ckptfmt.ArchitectureNotRecognisedError)
    assert resolution.unresolved.message.startswith("no registered architecture recognises these weights (")


def test_reading_a_source_identifies_nothing(tmp_path):
    """Reading sorts a file's keys; which attribute holds the network is the resolution's choice,
    made once, after every config source has been asked."""
    model, _ = small_model()
    torch.save({"state_dict": {f"seg_model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "m.ckpt")
    source = read_source(tmp_path / "m.ckpt")
    assert all(name.startswith("seg_model.") for name in source.legacy.state_dict)
    resolution = resolve(source)
    assert resolution.identification.prefix == "seg_model."
    assert source.legacy.state_dict.keys() == model.state_dict().keys()
