"""`ckptfmt diff SOURCE CONVERTED` of every source `convert` takes and its own lossless
conversion: what the conversion itself adds (its provenance, the companion's binding) is no
difference of the checkpoint, so the exit is 0 and the provenance is shown for information."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from .helpers import run_cli, small_model, write_dcp_folder
from .test_foreign_configs import DOCUMENT, _hub_folder, registered  # noqa: F401 (a fixture)


def _diffs_as_identical(source: Path, converted: Path, shown_name: str, tensors: int) -> None:
    for a, b in ((source, converted), (converted, source)):
        result = run_cli("diff", a, b)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"provenance  one is the conversion of the other ({shown_name}, sha256 ")
        assert lines[0].endswith("...), shown for information")
        assert lines[-1] == f"{tensors} of {tensors} common tensors identical; the checkpoints are identical"


def test_a_plain_safetensors_and_its_conversion_are_identical(tmp_path):
    """Regression: `diff model.safetensors converted.safetensors` of a plain `save_file` and its
    conversion exited 1 with "differ in: provenance"."""
    model, _ = small_model()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    converted = tmp_path / "converted.safetensors"
    assert run_cli("convert", tmp_path / "model.safetensors", "-o", converted, "--model-type", "multitask").returncode == 0
    _diffs_as_identical(tmp_path / "model.safetensors", converted, "model.safetensors", len(model.state_dict()))
    other, _ = small_model(seed=1)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    differs = run_cli("diff", tmp_path / "other.safetensors", converted)
    assert differs.returncode == 1
    assert differs.stdout.splitlines()[-1].endswith("the checkpoints differ in: weights")


def test_a_hub_folder_and_its_conversion_are_identical(tmp_path, registered):  # noqa: F811
    folder, tensors = _hub_folder(tmp_path, DOCUMENT)
    assert run_cli("convert", folder, "-o", tmp_path / "out").returncode == 0
    _diffs_as_identical(folder / "model.safetensors", tmp_path / "out/model.safetensors", "model.safetensors",
                        len(tensors))


def test_shards_of_someone_else_and_their_conversion_are_identical(tmp_path):
    from huggingface_hub import save_torch_model

    model, _ = small_model(base_filters=8, depth=3)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_torch_model(model, folder, max_shard_size="60KB")
    index = folder / "model.safetensors.index.json"
    assert run_cli("convert", index, "-o", tmp_path / "out/model.safetensors").returncode == 0
    _diffs_as_identical(index, tmp_path / "out/model.safetensors", index.name, len(model.state_dict()))


def test_a_dcp_folder_and_its_conversion_are_identical(tmp_path):
    model, _ = small_model()
    write_dcp_folder(tmp_path / "dcp", {"model": model.state_dict()})
    assert run_cli("convert", tmp_path / "dcp", "-o", tmp_path / "dcp.safetensors").returncode == 0
    _diffs_as_identical(tmp_path / "dcp", tmp_path / "dcp.safetensors", "dcp", len(model.state_dict()))
