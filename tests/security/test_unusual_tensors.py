"""Hostile inputs, round three: what an audit of the round-two fixes still found, each test
named by its class (issue "Hostile inputs, round two"). The string bomb of class 3 is with the
other amplification pickles, in test_legacy_bounds."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

import ckptfmt
from ckptfmt import HeaderError, LegacyCheckpointError, ShapeMismatchError
from ckptfmt.cli import main
from ckptfmt.compare import diff
from ckptfmt.format.metadata import build_metadata
from ckptfmt.format.writer import write_safetensors

from ..helpers import run_cli, small_model

# -- class 9: ordinary inputs that crashed ----------------------------------------------------

NESTED = ("a nested tensor (torch.nested: parts of different shapes under one name); safetensors stores one dense "
          "array per name. Where you trust the file, save its parts (tensor.unbind()) under names of their own")


def _nested(layout: torch.layout) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls its nested tensors a prototype
        return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)], layout=layout)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["nested", "jagged"])
def test_class_9_a_nested_tensor_is_our_error_in_convert_inspect_and_diff(tmp_path, layout):
    """It raised torch's `RuntimeError: Internal error: NestedTensorImpl doesn't support sizes`
    (the jagged kind was called a sparse tensor)."""
    source = tmp_path / "odd.pth"
    torch.save({"fc.weight": _nested(layout), "fc.bias": torch.zeros(3)}, source)
    message = f"{source}: tensor 'fc.weight' is {NESTED}"
    for use in (ckptfmt.convert, lambda p: diff(p, p), ckptfmt.inspect_checkpoint):
        with pytest.raises(LegacyCheckpointError) as excinfo:
            use(source)
        assert str(excinfo.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.pth"]


def test_class_9_a_nested_tensor_fails_alone_in_a_folder(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "a.pth")
    torch.save({"fc.weight": _nested(torch.strided)}, tmp_path / "b.pth")
    torch.save(model.state_dict(), tmp_path / "c.pth")
    result = run_cli("convert", ".", cwd=tmp_path)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")] == [
        f"[FAIL] b.pth: tensor 'fc.weight' is {NESTED}"]
    assert result.stdout.splitlines()[-1] == "2 converted, 0 skipped, 1 failed"


def test_class_9_an_unexpected_exception_fails_its_file_alone(tmp_path, monkeypatch):
    """A bug met by one file (here torch's, as the nested tensor raised it) stopped the whole
    batch; now that file fails with one line naming it, and the rest are converted."""
    import ckptfmt.sources.legacy

    model, _ = small_model()
    for name in ("a.pth", "b.pth", "c.pth"):
        torch.save(model.state_dict(), tmp_path / name)
    unwrap = ckptfmt.sources.legacy.unwrap

    def failing_on_b(obj, path, **kwargs):
        if path.name == "b.pth":
            raise RuntimeError("Internal error: NestedTensorImpl doesn't support sizes. Please file an issue.\n"
                               "Exception raised from sizes_custom at NestedTensorImpl.cpp:1")
        return unwrap(obj, path, **kwargs)

    monkeypatch.setattr(ckptfmt.sources.legacy, "unwrap", failing_on_b)
    monkeypatch.delenv("CKPTFMT_TRACEBACK", raising=False)
    result = CliRunner().invoke(main, ["convert", str(tmp_path)])
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")] == [
        f"[FAIL] {tmp_path / 'b.pth'}: unexpected RuntimeError: Internal error: NestedTensorImpl doesn't support "
        "sizes. Please file an issue."]
    assert result.stdout.splitlines()[-1] == "2 converted, 0 skipped, 1 failed"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["a.safetensors", "c.safetensors"]


# -- class 6: documents of the right syntax and the wrong shape ------------------------------


def _checkpoint_with(tmp_path, key: str, document) -> object:
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata[key] = json.dumps(document)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    return path


@pytest.mark.parametrize(
    "document, message",
    [
        ({"identified": "multitask(depth=2)"},
         "identified must be an object {\"chosen\": ..., \"twins\": [...], \"probe\": ...}, not 'multitask(depth=2)'"),
        ({"identified": {"chosen": "multitask(depth=2)", "twins": "multitask(depth=3)", "probe": "equal"}},
         "identified.twins must be a list of strings, not 'multitask(depth=3)'"),
        ({"identified": {"chosen": ["multitask(depth=2)"], "twins": [], "probe": "equal"}},
         "identified.chosen must be a string, not ['multitask(depth=2)']"),
        ({"source": {"file": "m.pth", "read_as_plain": "args: argparse.Namespace"}},
         "source.read_as_plain must be a list of strings, not 'args: argparse.Namespace'"),
        ({"source": {"file": "m.pth", "read_as_plain": [3]}},
         "source.read_as_plain must be a list of strings, not [3]"),
        ({"source": {"file": "m.pth", "pickled_model": 3}},
         "source.pickled_model must be a string, not 3"),
    ],
    ids=["identified a string", "twins a string", "chosen a list", "read_as_plain a string",
         "read_as_plain of numbers", "pickled_model a number"],
)
def test_class_6_provenance_of_the_wrong_shape_is_our_error_everywhere(tmp_path, document, message):
    """A plain string where ckptfmt writes an object or a list of strings passed inspect and
    verify."""
    path = _checkpoint_with(tmp_path, "ckptfmt.provenance", document)
    message = (f"metadata 'ckptfmt.provenance': {message}; the file is damaged or was not written by ckptfmt")
    for use in (ckptfmt.inspect_checkpoint, ckptfmt.load_model_with_config, ckptfmt.load_model):
        with pytest.raises(HeaderError) as excinfo:
            use(path)
        assert str(excinfo.value) == f"{path}: {message}"
    assert ckptfmt.verify(path).failures == [f"{path}: {message}"]
    result = run_cli("inspect", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {path}: {message}"


def test_class_6_provenance_as_ckptfmt_writes_it_still_passes(tmp_path):
    document = {"identified": {"chosen": "a", "twins": ["b"], "probe": "equal"},
                "source": {"file": "m.pth", "read_as_plain": ["args: argparse.Namespace"], "pickled_model": "Net"}}
    path = _checkpoint_with(tmp_path, "ckptfmt.provenance", document)
    assert ckptfmt.verify(path).ok
    assert ckptfmt.inspect_checkpoint(path)["provenance"] == document


MIXED = ("tensor cls_head.weight is F64 where the file's other floating-point tensors are F32; multitask holds its "
         "floating-point tensors in one dtype and cannot run them mixed. Save the weights with all of them in one "
         "dtype")


def test_class_6_one_float_of_another_dtype_is_caught_before_torch(tmp_path):
    """One F64 tensor in an F32 file passed verify; load_model loaded it, and the model's
    forward raised `expected scalar type Float but found Double`."""
    model, config = small_model()
    state_dict = dict(model.state_dict())
    state_dict["cls_head.weight"] = state_dict["cls_head.weight"].double()
    path = tmp_path / "m.safetensors"
    write_safetensors(path, state_dict, build_metadata(config, training={}, provenance={}))
    assert ckptfmt.verify(path).failures == [f"{path}: config does not match the tensors: {MIXED}"]
    with pytest.raises(ShapeMismatchError) as excinfo:
        ckptfmt.load_model(path)
    assert str(excinfo.value) == f"{path}: {MIXED}"
    with pytest.raises(ShapeMismatchError) as excinfo:
        ckptfmt.load_model(path, builder=lambda **arguments: small_model()[0])
    assert str(excinfo.value) == (f"{path}: the builder's model does not fit the file: it expects cls_head.weight as "
                                  "F32, like the file's other floating-point tensors; the file has it as F64")


def test_class_6_one_float_of_another_dtype_is_not_converted(tmp_path):
    """convert writes nothing that verify refuses."""
    model, _ = small_model()
    state_dict = dict(model.state_dict())
    state_dict["cls_head.weight"] = state_dict["cls_head.weight"].double()
    source = tmp_path / "m.pth"
    torch.save(state_dict, source)
    with pytest.raises(ShapeMismatchError) as excinfo:
        ckptfmt.convert(source, model_type="multitask")
    assert str(excinfo.value) == f"{source}: {MIXED}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_class_6_a_whole_file_cast_still_verifies_loads_and_runs(tmp_path, dtype):
    model, config = small_model()
    state_dict = {n: t.to(dtype) if t.is_floating_point() else t for n, t in model.state_dict().items()}
    path = tmp_path / "m.safetensors"
    write_safetensors(path, state_dict, build_metadata(config, training={}, provenance={}))
    assert ckptfmt.verify(path).ok
    loaded = ckptfmt.load_model(path)
    assert loaded.cls_head.weight.dtype == dtype
    if dtype == torch.float64:  # the CPU runs every op of this model in F64; F16 and BF16 are the predictor's
        seg, cls = loaded(torch.zeros(1, 1, 16, 16, dtype=dtype))
        assert cls.dtype == dtype


def test_class_6_a_mixed_file_cast_as_a_whole_converts(tmp_path):
    """--dtype casts every floating-point tensor, so what is checked is what will be written."""
    model, _ = small_model()
    state_dict = dict(model.state_dict())
    state_dict["cls_head.weight"] = state_dict["cls_head.weight"].double()
    torch.save(state_dict, tmp_path / "m.pth")
    result = ckptfmt.convert(tmp_path / "m.pth", model_type="multitask", dtype="fp32")
    assert ckptfmt.verify(result.output).ok
    assert ckptfmt.read_header(result.output).provenance()["cast"] == {"to": "F32", "from": {"F64": 1}}
