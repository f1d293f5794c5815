"""Sharded checkpoints: written as Hugging Face lays them out, read by its tools and ours alike."""

from __future__ import annotations

import json

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from huggingface_hub import load_torch_model
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import HeaderError, read_header

from .helpers import flip_byte, run_cli, small_model, state_dicts_bit_identical


@pytest.fixture
def sharded(tmp_path):
    model, config = small_model(base_filters=8, depth=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = ckptfmt.save_model_with_config(model, tmp_path / "model.safetensors", config, optimizer=optimizer, epoch=4,
                                          max_shard_size="60KB")
    return path, model


def test_shards_and_index_are_named_and_laid_out_as_transformers_does(sharded, tmp_path):
    path, model = sharded
    assert path == tmp_path / "model.safetensors.index.json"
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) > 2
    index = json.loads(path.read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["ckptfmt.weights_sha256"] == ckptfmt.weights_digest(model.state_dict())
    assert json.loads(index["metadata"]["ckptfmt.training"])["epoch"] == 4
    for number, shard in enumerate(shards, start=1):
        metadata = read_header(tmp_path / shard).metadata
        assert metadata["format"] == "pt" and json.loads(metadata["ckptfmt.config"])["base_filters"] == 8
        assert json.loads(metadata["ckptfmt.shard"]) == {"index": path.name, "shard": number, "of": len(shards)}
        assert ckptfmt.verify(tmp_path / shard).ok  # its own digest
    assert json.loads((tmp_path / "model_config.json").read_text())["weights"] == {
        path.name: index["metadata"]["ckptfmt.weights_sha256"]
    }


def test_huggingface_hub_and_safetensors_read_what_we_write(sharded, tmp_path):
    path, model = sharded
    target = MultiTaskUNet(base_filters=8, depth=3)
    load_torch_model(target, tmp_path, strict=True)
    assert state_dicts_bit_identical(target.state_dict(), model.state_dict())
    loaded = {}
    for shard in tmp_path.glob("model-*.safetensors"):
        loaded.update(load_file(shard))
    assert state_dicts_bit_identical(loaded, model.state_dict())
    # Another NAME than `model`: huggingface_hub is told the pattern.
    other = ckptfmt.save(model, tmp_path / "unet/unet.safetensors", max_shard_size="60KB")
    assert other.name == "unet.safetensors.index.json"
    target = MultiTaskUNet(base_filters=8, depth=3)
    load_torch_model(target, tmp_path / "unet", strict=True, filename_pattern="unet{suffix}.safetensors")
    assert state_dicts_bit_identical(target.state_dict(), model.state_dict())


def test_load_inspect_verify_and_diff_take_the_index_or_its_folder(sharded, tmp_path):
    path, model = sharded
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for where in (path, tmp_path):
            assert all(torch.equal(a, b) for a, b in zip(ckptfmt.load_model(where)(x), expected))
    resumed = ckptfmt.load_model(path).train()
    assert ckptfmt.load_training_state(path, torch.optim.SGD(resumed.parameters(), lr=1.0))["epoch"] == 4
    shown = run_cli("inspect", str(path))
    assert shown.returncode == 0, shown.stderr
    assert any(line.startswith("shards      ") for line in shown.stdout.splitlines())
    folder = run_cli("inspect", str(tmp_path))
    assert [line.split("  ")[0] for line in folder.stdout.splitlines()] == [
        str(tmp_path / "model.optimizer.safetensors"), str(path),
    ]
    checked = run_cli("verify", str(tmp_path))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == "2 verified, 0 failed"
    single = ckptfmt.save(model, tmp_path / "single/model.safetensors", epoch=4)
    result = ckptfmt.diff(path, single)
    assert result["differs_in"] == ["training record"]  # the single file has no optimizer companion
    assert result["training"] == ["optimizer.file: 'model.optimizer.safetensors' != (not set)",
                                  f"optimizer.sha256: {json.loads(read_header(path).metadata['ckptfmt.training'])['optimizer']['sha256']!r} != (not set)"]
    assert ckptfmt.diff(tmp_path, single.parent)["differs_in"] == ["training record"]  # folders, as the files
    by_folder = run_cli("diff", str(tmp_path), str(single.parent))
    assert by_folder.returncode == 1 and "Error" not in by_folder.stderr


def test_everything_that_fits_in_one_shard_is_one_file(tmp_path):
    model, _ = small_model()
    assert ckptfmt.save(model, tmp_path / "m.safetensors", max_shard_size="2GB") == tmp_path / "m.safetensors"
    with pytest.raises(ckptfmt.ConfigError, match="max_shard_size must be a positive number of bytes or a size such as '2GB', not '2 parsecs'"):
        ckptfmt.save(model, tmp_path / "n.safetensors", max_shard_size="2 parsecs")


def test_saving_again_with_fewer_shards_leaves_none_of_the_old_ones(sharded, tmp_path):
    path, model = sharded
    ckptfmt.save(model, tmp_path / "model.safetensors", max_shard_size="200KB", overwrite=True)
    index = json.loads(path.read_text())
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == sorted(set(index["weight_map"].values()))
    assert ckptfmt.verify(path).ok


def test_ties_across_shards_are_stored_once_and_stay_tied(tmp_path):
    from ckptfmt.config import registry

    @registry.register_model("tied_lm_for_sharding")
    class TiedLM(torch.nn.Module):
        def __init__(self, vocab: int = 64, width: int = 32):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.middle = torch.nn.Linear(width, width)
            self.head = torch.nn.Linear(width, vocab, bias=False)
            self.head.weight = self.embed.weight

    try:
        model = TiedLM()
        path = ckptfmt.save(model, tmp_path / "lm.safetensors", max_shard_size=8192)
        header = read_header(path)
        assert header.aliases == {"head.weight": "embed.weight"}
        loaded = ckptfmt.load_model(path)
        assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()
        assert state_dicts_bit_identical(loaded.state_dict(), model.state_dict())
    finally:
        registry._registry.pop("tied_lm_for_sharding")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda index: index["weight_map"].update({"cls_head.bias": "../elsewhere.safetensors"}),
         "weight_map['cls_head.bias'] must be a plain file name in the checkpoint's folder, not '../elsewhere.safetensors'"),
        (lambda index: index["weight_map"].update({"cls_head.bias": "/etc/passwd"}),
         "weight_map['cls_head.bias'] must be a plain file name in the checkpoint's folder, not '/etc/passwd'"),
        (lambda index: index["weight_map"].pop("cls_head.bias"),
         "does not hold the tensors the weight_map gives it (e.g. cls_head.bias)"),
        (lambda index: index["metadata"].update({"total_size": "big"}), "metadata total_size must be a byte count, not 'big'"),
        (lambda index: index.pop("weight_map"), "is not a safetensors index: it has no \"weight_map\" object"),
    ],
    ids=["shard outside the folder", "absolute shard", "tensor missing from the map", "total_size a string", "no weight_map"],
)
def test_a_damaged_or_crafted_index_is_our_error(sharded, edit, message):
    path, _ = sharded
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    with pytest.raises(HeaderError) as excinfo:
        ckptfmt.load_model(path)
    assert message in str(excinfo.value) and str(excinfo.value).startswith(f"{path}: ")
    result = run_cli("inspect", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_a_corrupt_shard_fails_verify(sharded, tmp_path):
    path, _ = sharded
    flip_byte(tmp_path / "model-00002-of-" f"{len(list(tmp_path.glob('model-*.safetensors'))):05d}.safetensors", 10)
    report = ckptfmt.verify(path)
    assert not report.ok and "weights digest mismatch" in report.failures[0]


def test_convert_writes_shards_from_a_mapped_pth(tmp_path):
    model, _ = small_model(base_filters=8, depth=3)
    torch.save({"model_state_dict": model.state_dict(), "epoch": 2}, tmp_path / "big.pth")
    result = run_cli("convert", str(tmp_path / "big.pth"), "--max-shard-size", "60KB")
    assert result.returncode == 0, result.stderr
    index = tmp_path / "big.safetensors.index.json"
    assert result.stdout.splitlines()[0].startswith(f"[OK]   {tmp_path / 'big.pth'} -> {index}  multitask(")
    assert not (tmp_path / "big.safetensors").exists() and len(list(tmp_path.glob("big-*-of-*.safetensors"))) > 2
    assert state_dicts_bit_identical(ckptfmt.load_model(index).state_dict(), model.state_dict())
    assert ckptfmt.verify(index).ok
    source = ckptfmt.read_header(index).provenance()["source"]
    from ckptfmt.io.files import sha256_file

    assert source["sha256"] == sha256_file(tmp_path / "big.pth")
    again = run_cli("convert", str(tmp_path / "big.pth"), "--max-shard-size", "60KB")
    assert again.stdout.startswith(f"[SKIP] {tmp_path / 'big.pth'}: already converted")


def test_shards_written_by_someone_else_convert_as_a_pth_does(tmp_path):
    """A folder of huggingface_hub's shards, no ckptfmt metadata: `convert FOLDER` identifies the
    architecture, writes one self-describing file beside the shards, and skips on a rerun; the
    shards' names are never written over."""
    from huggingface_hub import save_torch_model

    model, config = small_model(base_filters=8, depth=3)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_torch_model(model, folder, max_shard_size="60KB")
    shards = sorted(p.name for p in folder.iterdir())
    assert len(shards) > 3
    result = run_cli("convert", str(tmp_path))
    assert result.returncode == 0, result.stderr
    index = folder / "model.safetensors.index.json"
    assert result.stdout.splitlines()[:2] == [
        f"[OK]   {index} -> {folder / 'model.safetensors'}  {config.checked().summary()}",
        f"       weights: {len(shards) - 1} shards; config: inferred from the weights",
    ]
    converted = folder / "model.safetensors"
    assert state_dicts_bit_identical(ckptfmt.load_model(converted).state_dict(), model.state_dict())
    assert ckptfmt.verify(converted).ok
    assert run_cli("convert", str(folder)).stdout.startswith(f"[SKIP] {index}: already converted")
    refused = run_cli("convert", str(index), "--max-shard-size", "60KB", "--force")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        f"[FAIL] {index}: would be written over the shards it is converted from; choose another output (-o)")
    elsewhere = run_cli("convert", str(index), "-o", str(tmp_path / "out/model.safetensors"), "--max-shard-size", "60KB")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert ckptfmt.verify(tmp_path / "out/model.safetensors.index.json").ok
    assert sorted(p.name for p in folder.iterdir()) == sorted([*shards, "model.safetensors", "model_config.json"])
