"""A folder holding checkpoints of several configs: each converts, saves, verifies and loads,
with a sidecar that agrees with it, and nothing done to one changes another's verdict."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import ckptfmt
from ckptfmt import ModelConfig

from .helpers import copy_demo, run_cli, small_model


def _mixed_folder(tmp_path: Path) -> Path:
    """small.pth (base_filters=4, depth=2) and big.pth (8, 3), bare state dicts."""
    folder = tmp_path / "runs"
    folder.mkdir()
    torch.save(small_model(base_filters=4, depth=2)[0].state_dict(), folder / "small.pth")
    torch.save(small_model(base_filters=8, depth=3)[0].state_dict(), folder / "big.pth")
    return folder


def _sidecars(folder: Path) -> dict[str, tuple[int, list[str]]]:
    """Each sidecar in the folder: its base_filters and the files it binds."""
    return {path.name: (json.loads(path.read_text())["base_filters"], sorted(json.loads(path.read_text())["weights"]))
            for path in sorted(folder.glob("*model_config.json"))}


def _verified(folder: Path) -> list[str]:
    result = run_cli("verify", folder)
    assert result.returncode == 0, result.stderr
    return [line.split(":")[0] for line in result.stdout.splitlines()]


def test_a_folder_of_two_configs_converts_and_verifies_each(tmp_path):
    """Regression: `ckptfmt convert .` failed the second file ("model_config.json ... is about to
    hold another config ... pass --force")."""
    folder = _mixed_folder(tmp_path)
    result = run_cli("convert", folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "2 converted, 0 skipped, 0 failed"
    assert _sidecars(folder) == {"model_config.json": (8, ["big.safetensors"]),
                                 "small.model_config.json": (4, ["small.safetensors"])}
    assert _verified(folder) == [f"[OK]   {folder}/big.safetensors", f"[OK]   {folder}/small.safetensors",
                                 "2 verified, 0 failed"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckptfmt.load_model(folder / "small.safetensors").depth == 2
        assert ckptfmt.load_model(folder / "big.safetensors").depth == 3
    shown = run_cli("inspect", folder / "small.safetensors").stdout.splitlines()
    assert "sidecar     consistent (small.model_config.json)" in shown
    assert "sidecar     consistent" in run_cli("inspect", folder / "big.safetensors").stdout.splitlines()
    again = run_cli("convert", folder)
    assert again.stdout.splitlines()[-1] == "0 converted, 2 skipped, 0 failed"


def test_force_on_one_checkpoint_never_changes_its_sibling_s_verdict(tmp_path):
    """Regression: the `--force` that the refusal suggested replaced the folder's sidecar, so the
    sibling failed verify ("sidecar disagrees")."""
    folder = _mixed_folder(tmp_path)
    assert run_cli("convert", folder / "big.pth").returncode == 0
    second = run_cli("convert", folder / "small.pth")
    assert second.returncode == 0, second.stderr
    before = (folder / "model_config.json").read_bytes()
    forced = run_cli("convert", folder / "small.pth", "--force", "--set", "description=small again")
    assert forced.returncode == 0, forced.stderr
    assert (folder / "model_config.json").read_bytes() == before
    assert ModelConfig.load(folder / "small.model_config.json").description == "small again"
    assert len(_verified(folder)) == 3
    forced = run_cli("convert", folder, "--force")
    assert forced.stdout.splitlines()[-1] == "2 converted, 0 skipped, 0 failed"
    assert forced.stdout.count("config: the sidecar") == 2
    assert len(_verified(folder)) == 3


def test_saving_another_config_over_one_of_the_seed_s_pair_leaves_the_other_alone(tmp_path):
    """Regression: `save(..., overwrite=True)` of another config started model_config.json
    afresh, so last_model failed verify and loaded without the promised warning."""
    folder = tmp_path / "joint"
    model, config = small_model(base_filters=4, depth=2)
    ckptfmt.save_model_with_config(model, folder / "best_model.safetensors", config)
    ckptfmt.save_model_with_config(model, folder / "last_model.safetensors", config)
    assert _sidecars(folder) == {"model_config.json": (4, ["best_model.safetensors", "last_model.safetensors"])}
    shared = json.loads((folder / "model_config.json").read_text())
    other, _ = small_model(base_filters=8, depth=3)
    with pytest.raises(ckptfmt.CkptfmtError, match="already exists"):
        ckptfmt.save(other, folder / "best_model.safetensors")
    ckptfmt.save(other, folder / "best_model.safetensors", overwrite=True)
    del shared["weights"]["best_model.safetensors"]  # moved to its own sidecar: no longer bound here
    assert json.loads((folder / "model_config.json").read_text()) == shared
    assert _sidecars(folder)["best_model.model_config.json"] == (8, ["best_model.safetensors"])
    assert len(_verified(folder)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckptfmt.load_model_with_config(folder / "last_model.safetensors")[1].base_filters == 4
        assert ckptfmt.load_model_with_config(folder / "best_model.safetensors")[1].base_filters == 8


def test_the_sidecar_that_describes_a_file_is_the_one_verify_and_load_hold_it_to(tmp_path):
    folder = _mixed_folder(tmp_path)
    run_cli("convert", folder)
    own = folder / "small.model_config.json"
    own.write_text(own.read_text().replace('"depth": 2', '"depth": 3'))
    result = run_cli("verify", folder)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"[FAIL] {folder}/small.safetensors: sidecar disagrees with the embedded config: "
                                     "depth: 2 != 3")
    assert result.stdout.startswith(f"[OK]   {folder}/big.safetensors: ")
    with pytest.warns(ckptfmt.CkptfmtWarning, match=rf"the sidecar {own} disagrees with the embedded config "
                                                    r"\(depth: 2 != 3\); using the embedded one"):
        assert ckptfmt.load_model(folder / "small.safetensors").depth == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckptfmt.load_model(folder / "big.safetensors")


def test_diff_of_a_file_and_its_conversion_reads_each_with_its_own_sidecar(tmp_path):
    folder = _mixed_folder(tmp_path)
    run_cli("convert", folder)
    same = run_cli("diff", folder / "small.pth", folder / "small.safetensors")
    assert same.returncode == 0, same.stderr
    assert same.stdout.strip().endswith("the checkpoints are identical")
    differ = run_cli("diff", folder / "small.safetensors", folder / "big.safetensors")
    assert differ.returncode == 1
    assert differ.stdout.splitlines()[:2] == ["config      base_filters: 4 != 8", "config      depth: 2 != 3"]


def test_the_seed_layout_keeps_one_model_config_json(tmp_path):
    """The original system's folder: one model_config.json (written by hand, schema 0) for
    best_model and last_model, which converting keeps as it is, binding both."""
    folder = copy_demo(tmp_path) / "multitask_joint"
    result = run_cli("convert", folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("config: the sidecar") == 2
    assert _sidecars(folder) == {"model_config.json": (4, ["best_model.safetensors", "last_model.safetensors"])}
    assert ModelConfig.load(folder / "model_config.json").description == "Multi-task model - Joint fine-tuning (demo)"


def test_a_hand_written_model_config_json_stays_the_config_of_the_files_it_fits(tmp_path):
    """A hand-written model_config.json beside .pth files is their config; a file it does not
    fit, forced, gets a sidecar of its own, and the others still convert with the folder's."""
    folder = _mixed_folder(tmp_path)
    torch.save(small_model(seed=1, base_filters=4, depth=2)[0].state_dict(), folder / "small_2.pth")
    ModelConfig(base_filters=4, depth=2, description="hand-written").save(folder / "model_config.json")
    refused = run_cli("convert", folder / "big.pth")
    assert refused.returncode == 1
    assert "its sidecar model_config.json does not fit the weights" in refused.stderr
    assert run_cli("convert", folder / "big.pth", "--force").returncode == 0
    result = run_cli("convert", folder)
    assert result.stdout.splitlines()[-1] == "2 converted, 1 skipped, 0 failed"
    assert _sidecars(folder) == {"big.model_config.json": (8, ["big.safetensors"]),
                                 "model_config.json": (4, ["small.safetensors", "small_2.safetensors"])}
    assert ModelConfig.from_checkpoint(folder / "small_2.safetensors").description == "hand-written"
    assert len(_verified(folder)) == 4
