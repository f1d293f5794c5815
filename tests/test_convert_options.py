"""`convert --dtype` keeps numbers what they were, and a rerun with other options is not taken
for a conversion already done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import convert, convert_options, read_header

from .helpers import run_cli, small_model


@pytest.fixture
def overflowing(tmp_path) -> Path:
    """A bare state dict whose `big.weight` holds 1e6, beyond fp16's 65504."""
    torch.save({"big.weight": torch.tensor([[1e6, -2.0], [3.0, 4.0]]), "small.weight": torch.ones(2, 2),
                "steps": torch.tensor(7)}, tmp_path / "m.pth")
    return tmp_path


def test_a_cast_to_fp16_that_would_write_inf_is_refused_naming_the_tensor(overflowing):
    """Regression: `convert --dtype fp16` of a weight of 1e6 wrote inf, exited 0 with no
    warning, and verify passed."""
    result = run_cli("convert", "m.pth", "--dtype", "fp16", cwd=overflowing)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "[FAIL] m.pth: --dtype fp16 would turn finite values of tensor 'big.weight' into inf (its largest magnitude "
        "is 1e+06; fp16 holds at most 65504), so nothing was written. Keep the source's dtype or choose one that "
        "holds these values, or pass --allow-overflow to cast them to inf knowingly"]
    assert sorted(p.name for p in overflowing.iterdir()) == ["m.pth"]
    with pytest.raises(ckptfmt.ConfigError, match=r"dtype='fp16' would turn .* pass allow_overflow=True to cast"):
        convert(overflowing / "m.pth", dtype="fp16")


def test_allow_overflow_casts_knowingly_and_the_cast_record_names_the_tensor(overflowing):
    result = run_cli("convert", "m.pth", "--dtype", "fp16", "--allow-overflow", cwd=overflowing)
    assert result.returncode == 0, result.stderr
    assert read_header(overflowing / "m.safetensors").provenance()["cast"] == {
        "to": "F16", "from": {"F32": 2}, "overflowed": {"big.weight": 1e6}}
    assert load_file(overflowing / "m.safetensors")["big.weight"][0, 0].item() == float("inf")


@pytest.mark.parametrize(("source", "dtype"), [
    (torch.tensor([1e300, 1.0], dtype=torch.float64), "fp32"),
    (torch.tensor([3.4e38, 1.0]), "bf16"),
], ids=["fp64 to fp32", "fp32 to bf16"])
def test_every_narrowing_cast_is_checked(tmp_path, source, dtype):
    torch.save({"w": source}, tmp_path / "m.pth")
    with pytest.raises(ckptfmt.ConfigError, match=rf"dtype='{dtype}' would turn finite values of tensor 'w' into inf"):
        convert(tmp_path / "m.pth", dtype=dtype)


def test_values_already_infinite_or_nan_are_cast_as_they_are(tmp_path):
    """Only finite values that a cast makes infinite are refused: inf and NaN stay themselves."""
    torch.save({"w": torch.tensor([float("inf"), float("nan"), 1.0])}, tmp_path / "m.pth")
    result = convert(tmp_path / "m.pth", dtype="fp16")
    assert "overflowed" not in read_header(result.output).provenance()["cast"]


def test_a_tensor_is_checked_a_chunk_at_a_time_and_its_largest_magnitude_found_across_chunks(monkeypatch):
    """The check holds one chunk (not a second copy of the tensor); what it finds does not
    depend on where the chunks fall."""
    monkeypatch.setattr(convert_options, "_CHUNK", 4)
    values = torch.zeros(11)
    # The largest in the second chunk; in the third, an overflow beside a NaN, which stays NaN.
    values[5], values[9], values[10] = -3e5, float("nan"), 7e4
    with pytest.raises(ckptfmt.ConfigError, match=r"its largest magnitude is 300000;"):
        convert_options.cast_state_dict({"w": values}, "fp16")
    _, record = convert_options.cast_state_dict({"w": values}, "fp16", allow_overflow=True)
    assert record["overflowed"] == {"w": 3e5}


def _converted_with(tmp_path: Path, *args: str) -> bytes:
    model, config = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    (tmp_path / "cfg.json").write_text(json.dumps(config.checked().to_dict()))
    first = run_cli("convert", "m.pth", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    return (tmp_path / "m.safetensors").read_bytes()


def test_a_rerun_at_another_dtype_is_not_already_converted(tmp_path):
    """Regression: after converting at fp32, a rerun with --dtype fp16 printed `[SKIP] already
    converted` and left the fp32 file."""
    before = _converted_with(tmp_path, "--dtype", "fp32")
    again = run_cli("convert", "m.pth", "--dtype", "fp16", cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        "[FAIL] m.pth: m.safetensors: already exists, converted from the same source with other options "
        "(--dtype: fp32 recorded, fp16 asked); pass --force to convert it again over it"]
    assert (tmp_path / "m.safetensors").read_bytes() == before
    forced = run_cli("convert", "m.pth", "--dtype", "fp16", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert read_header(tmp_path / "m.safetensors").provenance()["cast"]["to"] == "F16"
    same = run_cli("convert", "m.pth", "--dtype", "fp16", cwd=tmp_path)
    assert same.stdout.splitlines()[0] == (
        "[SKIP] m.pth: already converted to m.safetensors (same source sha256, same options)")


@pytest.mark.parametrize(("args", "difference"), [
    (["--set", "description=joint run"], "--set: none recorded, --set description='joint run' asked"),
    (["--max-shard-size", "1MB"], "--max-shard-size: none recorded, 1000000 asked"),
    (["--model-type", "multitask"], "--model-type: none recorded, multitask asked"),
    (["--config", "cfg.json"], "--config: none recorded, one asked"),
], ids=["overrides", "shard size", "model type", "config"])
def test_a_rerun_with_other_options_is_refused_naming_what_differs(tmp_path, args, difference):
    before = _converted_with(tmp_path)
    again = run_cli("convert", "m.pth", *args, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"[FAIL] m.pth: m.safetensors: already exists, converted from the same source with other options "
        f"({difference}); pass --force to convert it again over it"]
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert run_cli("convert", "m.pth", *args, "--force", cwd=tmp_path).returncode == 0
    assert run_cli("convert", "m.pth", *args, cwd=tmp_path).stdout.startswith("[SKIP] m.pth: already converted")
