"""Tensors of a kind or dtype that safetensors or the architecture cannot take (nested, jagged,
meta, sparse; a tensor named __metadata__; one float of another dtype; an integer where the
architecture has a float): our error naming the tensor, before torch's own, and nothing
written. Whole-file casts, and `convert --dtype` of a mixed file, still work."""

from __future__ import annotations

import pytest
import torch

import ckptfmt
from ckptfmt import LegacyCheckpointError, ShapeMismatchError
from ckptfmt.compare import diff
from ckptfmt.format.metadata import build_metadata
from ckptfmt.format.writer import write_safetensors

from ..helpers import run_cli, small_model
from .crafted import NESTED, nested_tensor


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["nested", "jagged"])
def test_a_nested_tensor_is_our_error_in_convert_inspect_and_diff(tmp_path, layout):
    """Regression: it raised torch's `RuntimeError: Internal error: NestedTensorImpl doesn't
    support sizes` (the jagged kind was called a sparse tensor)."""
    source = tmp_path / "odd.pth"
    torch.save({"fc.weight": nested_tensor(layout), "fc.bias": torch.zeros(3)}, source)
    message = f"{source}: tensor 'fc.weight' is {NESTED}"
    for use in (ckptfmt.convert, lambda p: diff(p, p), ckptfmt.inspect_checkpoint):
        with pytest.raises(LegacyCheckpointError) as excinfo:
            use(source)
        assert str(excinfo.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.pth"]


@pytest.mark.parametrize(
    "tensor, problem",
    [
        (torch.empty(3, 4, device="meta"), "on the meta device: it has a shape but no data (saved from a model that "
                                            "was never materialised); save the checkpoint from a model whose weights "
                                            "are loaded"),
        (torch.eye(3).to_sparse(), "a sparse tensor (torch.sparse_coo); safetensors stores dense tensors only. Where "
                                   "you trust the file, save tensor.to_dense() in its place"),
    ],
    ids=["meta", "sparse"],
)
def test_meta_and_sparse_tensors_are_our_error_in_convert_and_diff(tmp_path, tensor, problem):
    """A meta or a sparse tensor in a .pth: our error naming the tensor from convert, diff and
    inspect, and nothing written."""
    source = tmp_path / "odd.pth"
    torch.save({"fc.weight": tensor, "fc.bias": torch.zeros(3)}, source)
    message = f"{source}: tensor 'fc.weight' is {problem}"
    for use in (ckptfmt.convert, lambda p: diff(p, p), ckptfmt.inspect_checkpoint):
        with pytest.raises(LegacyCheckpointError) as excinfo:
            use(source)
        assert str(excinfo.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.pth"]


def test_a_tensor_named_metadata_is_our_error(tmp_path):
    """Regression: it gave an internal "fill_in placeholder" error; the companion written before the
    weights were refused is removed with them."""
    source = tmp_path / "named.pth"
    weights = {"__metadata__": torch.nn.Parameter(torch.zeros(2)), "w": torch.zeros(2)}
    optimizer = torch.optim.SGD([weights["__metadata__"]], lr=0.1, momentum=0.9)
    weights["__metadata__"].grad = torch.ones(2)
    optimizer.step()
    torch.save({"state_dict": {k: v.detach() for k, v in weights.items()}, "optimizer": optimizer.state_dict()}, source)
    result = run_cli("convert", source)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"[FAIL] {source}: {tmp_path / 'named.safetensors'}: tensor '__metadata__': safetensors reserves that name for "
        "the metadata")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.pth"]


def test_an_integer_tensor_where_the_architecture_has_a_float_is_caught_before_torch(tmp_path):
    """Regression: verify passed an I64 weight, then load_model raised torch's RuntimeError."""
    model, config = small_model()
    state_dict = dict(model.state_dict())
    state_dict["cls_head.weight"] = state_dict["cls_head.weight"].to(torch.int64)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, state_dict, build_metadata(config, training={}, provenance={}))
    message = ("config does not match the tensors: the config expects cls_head.weight as F32; the file has it as I64; "
               "fix the config")
    assert ckptfmt.verify(path).failures == [f"{path}: {message}"]
    with pytest.raises(ckptfmt.ShapeMismatchError) as excinfo:
        ckptfmt.load_model(path)
    assert str(excinfo.value) == f"{path}: {message.split(': ', 1)[1]}"


MIXED = ("tensor cls_head.weight is F64 where the file's other floating-point tensors are F32; multitask holds its "
         "floating-point tensors in one dtype and cannot run them mixed. Save the weights with all of them in one "
         "dtype")


def test_one_float_of_another_dtype_is_caught_before_torch(tmp_path):
    """Regression: one F64 tensor in an F32 file passed verify; load_model loaded it, and the
    model's forward raised `expected scalar type Float but found Double`."""
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


def test_one_float_of_another_dtype_is_not_converted(tmp_path):
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
def test_a_whole_file_cast_still_verifies_loads_and_runs(tmp_path, dtype):
    """A file cast as a whole (F16, BF16, F64) is not a mixed one: it verifies, loads and, in
    F64 on the CPU, runs."""
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


def test_a_mixed_file_cast_as_a_whole_converts(tmp_path):
    """--dtype casts every floating-point tensor, so what is checked is what will be written."""
    model, _ = small_model()
    state_dict = dict(model.state_dict())
    state_dict["cls_head.weight"] = state_dict["cls_head.weight"].double()
    torch.save(state_dict, tmp_path / "m.pth")
    result = ckptfmt.convert(tmp_path / "m.pth", model_type="multitask", dtype="fp32")
    assert ckptfmt.verify(result.output).ok
    assert ckptfmt.read_header(result.output).provenance()["cast"] == {"to": "F32", "from": {"F64": 1}}
