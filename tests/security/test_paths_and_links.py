"""A file that a checkpoint names (its optimizer companion, an index's shards) is a plain name in
the checkpoint's folder: a name that leaves the folder, or a link that leads out of it, is
refused naming the key, and nothing outside is read. Folder walks do not follow links out of
the folder they walk."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptfmt
from ckptfmt import HeaderError, load_training_state, read_header

from ..helpers import run_cli, save_small, small_model
from .crafted import rebind, trained_checkpoint


@pytest.mark.parametrize("name", ["../elsewhere/m.optimizer.safetensors", "/tmp/m.optimizer.safetensors"])
def test_a_binding_that_leaves_the_folder_is_refused_naming_the_key(tmp_path, name):
    """A training record whose companion `file` is ../elsewhere/... or absolute is refused
    naming the key, even where a valid companion lies at that path."""
    outside, model = trained_checkpoint(tmp_path / "elsewhere")
    path, _ = trained_checkpoint(tmp_path / "run")
    binding = read_header(outside).training()["optimizer"]  # a valid companion, had the name been followed
    rebind(path, {"file": name, "sha256": binding["sha256"]})
    message = (f"{path}: metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's "
               f"folder, not {name!r}; the file is damaged or was crafted to read elsewhere")
    with pytest.raises(HeaderError) as excinfo:
        load_training_state(path, torch.optim.AdamW(model.parameters()))
    assert str(excinfo.value) == message
    assert not ckptfmt.verify(path).ok


def _moved_out(link, target):
    """Move `link`'s file to `target` and leave at `link` a symlink to it, relative."""
    target.parent.mkdir(exist_ok=True)
    os.rename(link, target)
    link.symlink_to(os.path.relpath(target, link.parent))


def test_a_named_file_that_links_out_of_the_folder_is_not_followed(tmp_path):
    """A plain name can still be a link to ../elsewhere: the optimizer companion a training
    record binds, and the shards an index lists, are refused when they lead out of the folder."""
    model, config = small_model()
    path = ckptfmt.save_model_with_config(model, tmp_path / "run" / "best_model.safetensors", config,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), epoch=2)
    companion = path.parent / "best_model.optimizer.safetensors"
    _moved_out(companion, tmp_path / "elsewhere" / "x.optimizer.safetensors")
    message = ("metadata 'ckptfmt.training': optimizer.file names 'best_model.optimizer.safetensors', a link that "
               "leads outside the checkpoint's folder; refused: a file that a checkpoint names must lie in its folder")
    assert ckptfmt.verify(path).failures == [f"{path}: training state best_model.optimizer.safetensors: {message}"]
    with pytest.raises(HeaderError) as excinfo:
        ckptfmt.load_training_state(path, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert str(excinfo.value) == f"{path}: {message}"
    result = run_cli("verify", str(path))
    assert result.returncode == 1 and message in result.stdout + result.stderr

    (path.parent / "kept").mkdir()  # a link that stays in the folder is followed as ever
    os.rename(tmp_path / "elsewhere" / "x.optimizer.safetensors", path.parent / "kept" / "x.optimizer.safetensors")
    companion.unlink()
    companion.symlink_to("kept/x.optimizer.safetensors")
    assert ckptfmt.verify(path).ok
    assert ckptfmt.load_training_state(path, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))["epoch"] == 2

    model, config = small_model(base_filters=8, depth=3)
    index = ckptfmt.save_model_with_config(model, tmp_path / "sharded" / "model.safetensors", config,
                                           max_shard_size="60KB")
    tensor, shard = next(iter(json.loads(index.read_text())["weight_map"].items()))
    _moved_out(index.parent / shard, tmp_path / "elsewhere" / shard)
    message = (f"weight_map[{tensor!r}] names {shard!r}, a link that leads outside the checkpoint's folder; refused: a "
               "file that a checkpoint names must lie in its folder")
    for read in (read_header, ckptfmt.load_model):
        with pytest.raises(HeaderError) as excinfo:
            read(index)
        assert str(excinfo.value) == f"{index}: {message}"
    assert ckptfmt.verify(index).failures == [f"{index}: {message}"]


def test_folder_walks_do_not_follow_links_out_of_the_folder(tmp_path):
    """Links planted in a folder, to a checkpoint and to a folder outside it: the folder's walk
    lists only what lies inside (a link within the folder is followed)."""
    outside = tmp_path / "outside"
    path, _, _ = save_small(outside)
    folder = tmp_path / "downloads"
    inside, _, _ = save_small(folder / "run")
    (folder / "planted.safetensors").symlink_to(path)
    (folder / "planted_folder").symlink_to(outside, target_is_directory=True)
    (folder / "alias.safetensors").symlink_to(inside)  # inside the folder: followed
    from ckptfmt.inspect import inspect_folder

    rows = inspect_folder(folder)
    assert [row["file"] for row in rows] == [str(folder / "alias.safetensors"), str(inside)]
