"""Each tensor's own digest in the header (format 3): diff from the headers alone, verify naming
the tensor that changed, a partial load checking what it loads; and files of formats 1 and 2,
which record none, verified, inspected, diffed and loaded as they are."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import HeaderError, IntegrityError, ModelConfig, read_header
from ckptfmt.format.companion import load_training_state
from ckptfmt.format.digest import digest_file
from ckptfmt.format.writer import write_safetensors

from .helpers import ROOT, flip_byte, run, run_cli, small_model, state_dicts_bit_identical

FIXTURES = ROOT / "tests/fixtures"


def last_tensor(path) -> str:
    """The tensor whose bytes end the file (where flip_byte flips)."""
    return max(read_header(path).tensors.values(), key=lambda info: info.end).name


def test_the_header_records_each_tensor_s_own_digest(tmp_path):
    """128 bits of SHA-256 over [dtype, shape], a newline and the bytes, in sorted name order;
    and the weights digest made of the whole of each: what anyone can recompute from the file
    with hashlib."""
    model, _ = small_model()
    state_dict = {**model.state_dict(), "tied.weight": model.state_dict()["cls_head.weight"]}
    path = tmp_path / "m.safetensors"
    write_safetensors(path, state_dict, {"format": "pt", "ckptfmt.format_version": "3"})
    header = read_header(path)
    assert header.format_version == "3" and header.aliases == {"tied.weight": "cls_head.weight"}
    raw = base64.b64decode(header.metadata["ckptfmt.tensor_digests"])
    data = path.read_bytes()[header.data_offset:]
    weights = hashlib.sha256()
    for name in sorted(state_dict):
        info = header.tensors[header.aliases.get(name, name)]
        record = [name, info.dtype, list(info.shape), info.nbytes]
        if name in header.aliases:
            weights.update(json.dumps([*record, info.name]).encode() + b"\n")
            continue
        own = hashlib.sha256(json.dumps([info.dtype, list(info.shape)]).encode() + b"\n" + data[info.start:info.end])
        number = sorted(header.tensors).index(name)
        assert raw[16 * number:16 * (number + 1)] == own.digest()[:16] and info.digest == own.hexdigest()[:32]
        weights.update(json.dumps(record).encode() + b"\n" + own.digest())
    assert len(raw) == 16 * len(header.tensors)
    assert header.weights_sha256 == weights.hexdigest() == ckptfmt.weights_digest(state_dict)


def test_a_sharded_checkpoint_records_the_digests_in_each_shard(tmp_path):
    model, _ = small_model(base_filters=8)
    index = ckptfmt.save(model, tmp_path / "m.safetensors", max_shard_size="20KB")
    shards = sorted(tmp_path.glob("m-*-of-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        header = read_header(shard)
        assert len(base64.b64decode(header.metadata["ckptfmt.tensor_digests"])) == 16 * len(header.tensors)
    assert "ckptfmt.tensor_digests" not in json.loads(index.read_text())["metadata"]
    whole = read_header(index)
    assert all(info.digest for info in whole.tensors.values())


def test_diff_names_the_changed_tensor_from_the_headers_alone(tmp_path):
    """Two files that record their tensors' digests are compared without reading tensor data
    or importing torch."""
    model, _ = small_model()
    a = ckptfmt.save(model, tmp_path / "a/best_model.safetensors")
    with torch.no_grad():
        model.cls_head.bias += 0.25
    b = ckptfmt.save(model, tmp_path / "b/best_model.safetensors")
    result = run_cli("diff", a, b)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-2:] == [
        "differs     cls_head.bias", "67 of 68 common tensors identical; the checkpoints differ in: weights"]
    with_values = run_cli("diff", a, b, "--values")
    assert "differs     cls_head.bias (max abs diff 0.25)" in with_values.stdout.splitlines()
    code = ("import sys\nfrom ckptfmt.compare import diff\n"
            f"print(diff({str(a)!r}, {str(b)!r})['differing'], 'torch' in sys.modules)")
    shown = run("-c", code)
    assert shown.stdout.strip() == "['cls_head.bias'] False", shown.stderr


def test_verify_names_the_tensor_a_flipped_byte_is_in(tmp_path):
    model, _ = small_model()
    path = ckptfmt.save(model, tmp_path / "best_model.safetensors")
    recorded = read_header(path).weights_sha256
    flip_byte(path, 3)
    actual = digest_file(read_header(path))
    result = run_cli("verify", path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"[FAIL] {path}: weights digest mismatch: the tensor data was changed or corrupted (recorded "
        f"{recorded[:12]}..., actual {actual[:12]}...) in tensor '{last_tensor(path)}'; restore the file from a "
        "good copy")


class Backbone(torch.nn.Module):
    """The encoder of a U-Net alone: a model that takes part of the U-Net's file."""

    def __init__(self, base_filters: int = 4, depth: int = 2, **architecture) -> None:
        super().__init__()
        self.enc = MultiTaskUNet(base_filters=base_filters, depth=depth, **architecture).enc


def test_a_partial_load_with_verify_checks_the_tensors_it_loads(tmp_path):
    model, _ = small_model()
    path = ckptfmt.save(model, tmp_path / "best_model.safetensors")
    damaged = last_tensor(path)
    assert not damaged.startswith("enc.")
    flip_byte(path, 3)
    backbone = ckptfmt.load_model(path, builder=Backbone, strict=False, verify=True)
    assert state_dicts_bit_identical(backbone.state_dict(),
                                     {k: v for k, v in model.state_dict().items() if k.startswith("enc.")})
    with pytest.raises(IntegrityError) as excinfo:
        ckptfmt.load_model(path, verify=True)
    assert f"in tensor '{damaged}'; restore the file from a good copy" in str(excinfo.value)

    loaded = read_header(path).tensors["enc.0.0.weight"]
    data = bytearray(path.read_bytes())
    data[loaded.base + loaded.start] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as excinfo:
        ckptfmt.load_model(path, builder=Backbone, strict=False, verify=True)
    assert str(excinfo.value) == (
        f"{path}: tensor 'enc.0.0.weight' was changed or corrupted: its bytes do not match its digest in the header; "
        "restore the file from a good copy")


def test_damaged_tensor_digests_are_refused_when_the_header_is_read(tmp_path):
    model, config = small_model()
    header = read_header(ckptfmt.save(model, tmp_path / "m.safetensors"))
    metadata = {**header.metadata, "ckptfmt.tensor_digests": header.metadata["ckptfmt.tensor_digests"][:-4]}
    path = tmp_path / "short.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    with pytest.raises(HeaderError) as excinfo:
        read_header(path)
    assert str(excinfo.value) == (
        f"{path}: metadata 'ckptfmt.tensor_digests' is not the 68 tensor digests this file's tensors need (1452 "
        "base64 characters, it has 1448); the file is damaged, re-create it from its source")


@pytest.mark.parametrize("folder, version", [("schema1", "1"), ("format2", "2")])
def test_files_of_earlier_formats_verify_inspect_diff_and_load(tmp_path, folder, version):
    """Committed once, kept forever: files of formats 1 and 2 record no tensor digests; they
    are checked by their weights digest, and diff reads their data."""
    source = FIXTURES / folder / "best_model.safetensors"
    header = read_header(source)
    assert header.format_version == version and "ckptfmt.tensor_digests" not in header.metadata
    assert ckptfmt.verify(source).ok
    assert run_cli("inspect", source).stdout.splitlines()[2] == f"format      ckptfmt {version}"
    model = ckptfmt.load_model(source, verify=True)
    assert state_dicts_bit_identical(model.state_dict(), load_file(source))
    resaved = ckptfmt.save(model, tmp_path / "resaved/best_model.safetensors")
    result = ckptfmt.diff(source, resaved)
    assert result["differing"] == [] and "weights" not in result["differs_in"]
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURES / folder, copy)
    flip_byte(copy / "best_model.safetensors", 3)
    changed = ckptfmt.diff(source, copy / "best_model.safetensors")
    assert changed["differing"] == [last_tensor(source)]
    message = ckptfmt.verify(copy / "best_model.safetensors").failures[0]
    assert message.startswith(f"{copy / 'best_model.safetensors'}: weights digest mismatch: the tensor data was "
                              "changed or corrupted (recorded ") and " in tensor" not in message
    with pytest.raises(IntegrityError):  # no digest of its own for the part loaded: the whole file's is checked
        ckptfmt.load_model(copy / "best_model.safetensors", builder=Backbone, strict=False, verify=True)
    trained = ckptfmt.load_model(source).train()
    assert load_training_state(source, torch.optim.SGD(trained.parameters(), lr=1.0))["epoch"] in (4, 7)


def test_a_sharded_checkpoint_of_format_2_verifies_and_loads():
    index = FIXTURES / "format2/sharded/best_model.safetensors.index.json"
    assert read_header(index).format_version == "2"
    assert ckptfmt.verify(index).ok
    assert state_dicts_bit_identical(ckptfmt.load_model(index, verify=True).state_dict(),
                                     ckptfmt.load_model(FIXTURES / "format2/best_model.safetensors").state_dict())
    assert ModelConfig.from_checkpoint(index).description == "format-2 fixture written by ckptfmt 0.2.0"
