"""Hostile inputs, round two: classes of weakness, each a promise kept at every place it applies.

Each test names the class (issue "Hostile inputs, round two") and the place it guards."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptfmt
from ckptfmt import HeaderError, IntegrityError, read_header
from ckptfmt.format.digest import WeightsHasher, digest_file
from ckptfmt.format.metadata import build_metadata
from ckptfmt.format.writer import tensor_bytes, write_safetensors

from ..helpers import run_cli, save_small, small_model


def _tied_file(path, *, aliases: int, version: str | None = None, megabytes: int = 4):
    """A file whose one stored tensor has `aliases` other names (ckptfmt.aliases)."""
    weight = torch.zeros(megabytes << 18)  # 4 bytes each
    tensors = {"w": weight}
    tensors.update({f"tie{i:06d}": weight for i in range(aliases)})
    metadata = {"format": "pt"}
    if version is not None:
        metadata["ckptfmt.format_version"] = version
    if version == "1":  # 0.1.0's digest counted an alias's bytes again
        hasher = WeightsHasher()
        for name in sorted(tensors):
            data = tensor_bytes(tensors[name])
            hasher.begin(name, "F32", tuple(tensors[name].shape), data.nbytes)
            hasher.update(data)
        metadata["ckptfmt.weights_sha256"] = hasher.hexdigest()
    write_safetensors(path, tensors, metadata)
    return path


def test_class_3_each_byte_is_hashed_once_whatever_the_aliases_say(tmp_path, monkeypatch):
    """verify of a header with 20,000 aliases of one 4 MB tensor reads 4 MB, not 80 GB."""
    path = _tied_file(tmp_path / "tied.safetensors", aliases=20_000)
    header = read_header(path)
    read = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: read.append(real_preadv(fd, buffers, offset)) or read[-1])
    assert ckptfmt.verify(path).ok
    assert sum(read) == header.data_bytes


def test_class_3_format_1_ties_that_would_multiply_the_reading_are_refused(tmp_path):
    legit = _tied_file(tmp_path / "legit.safetensors", aliases=1, version="1")
    assert digest_file(read_header(legit)) == read_header(legit).weights_sha256  # 0.1.0's tie still verifies
    crafted = _tied_file(tmp_path / "crafted.safetensors", aliases=3, version="1", megabytes=1)
    with pytest.raises(IntegrityError) as excinfo:
        digest_file(read_header(crafted))
    assert str(excinfo.value) == (
        f"{crafted}: ties 3 names to stored tensors, which would make its (format 1) digest read 3,145,728 "
        "bytes again, more than the file's 1,048,576; refused as crafted. Re-create it from its source"
    )


@pytest.mark.parametrize(
    "version, message",
    [
        ("999", "written by a newer ckptfmt (format 999); this one reads up to format 2. Upgrade ckptfmt "
                "(pip install -U ckptfmt)"),
        ("-1", "metadata 'ckptfmt.format_version' is '-1', not a format version number; the file is damaged "
               "or was not written by ckptfmt"),
        ("2.0", "metadata 'ckptfmt.format_version' is '2.0', not a format version number; the file is "
                "damaged or was not written by ckptfmt"),
    ],
)
def test_class_8_unknown_format_versions_are_refused(tmp_path, version, message):
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata["ckptfmt.format_version"] = version
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    for read in (read_header, ckptfmt.load_model, ckptfmt.ModelConfig.from_checkpoint):
        with pytest.raises(HeaderError) as excinfo:
            read(path)
        assert str(excinfo.value) == f"{path}: {message}"
    report = ckptfmt.verify(path)
    assert report.failures == [f"{path}: {message}"]
    for command in ("inspect", "verify"):
        result = run_cli(command, str(path))
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].endswith(message)


def test_class_2_a_fifo_named_like_a_checkpoint_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    for command in (["inspect", str(fifo)], ["verify", str(fifo)]):
        result = run_cli(*command)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith(
            f"{fifo}: is a FIFO (named pipe), not a regular file; refused (reading it could block or never end)"
        )
    path, _, _ = save_small(tmp_path / "m")
    os.unlink(path.parent / "model_config.json")
    os.mkfifo(path.parent / "model_config.json")
    result = run_cli("inspect", str(path))
    assert result.returncode == 0 and "sidecar     invalid: is a FIFO (named pipe)" in result.stdout
    json.loads(run_cli("inspect", str(path), "--json").stdout)


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({"": torch.zeros(1)}, {}, "tensor '': tensor names must be non-empty and free of NUL"),
        ({"a\x00b": torch.zeros(1)}, {}, "tensor 'a\\x00b': tensor names must be non-empty and free of NUL"),
        ({"__metadata__": torch.zeros(1)}, {}, "tensor '__metadata__': safetensors reserves that name for the metadata"),
        ({"a": torch.zeros(1)}, {"huge": "x" * (1 << 20)}, "metadata is 1048674 bytes, over the 1048576-byte limit"),
        ({"a\udc80": torch.zeros(1)}, {}, "tensor 'a\\udc80': tensor names must be valid Unicode, and this one holds a "
                                            "lone surrogate, which safetensors refuses to read"),
        ({"a": torch.zeros(1)}, {"note": "b\ud800"}, "metadata 'note': its value 'b\\ud800' is not valid Unicode (a lone "
                                                     "surrogate), which safetensors refuses to read"),
        ({"a": torch.zeros(1)}, {"n\udfff": "b"}, "metadata 'n\\udfff': its key is not valid Unicode (a lone surrogate), "
                                                  "which safetensors refuses to read"),
    ],
    ids=["empty name", "NUL in a name", "__metadata__", "metadata over 1 MiB", "lone surrogate in a name",
         "lone surrogate in a metadata value", "lone surrogate in a metadata key"],
)
def test_class_5_the_writer_refuses_what_the_reader_would(tmp_path, tensors, metadata, message):
    """The same rule, at one place, for both: nothing is written that verify would reject."""
    with pytest.raises(HeaderError) as excinfo:
        write_safetensors(tmp_path / "out.safetensors", tensors, {"format": "pt", **metadata})
    assert str(excinfo.value) == f"{tmp_path / 'out.safetensors'}: {message}"
    assert list(tmp_path.iterdir()) == []


def test_class_5_json_the_reader_refuses_is_not_written(tmp_path):
    from ckptfmt.io.jsondoc import dumps_strict, loads_strict

    deep: list = []
    for _ in range(40):
        deep = [deep]
    for value, message in [
        ({"a": deep}, "the training record['a'][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]"
                      "[0][0][0][0][0][0][0][0] nests deeper than 32 levels"),
        ({"n": 10**20}, "the training record['n'] is a 21-digit integer; at most 19 digits are allowed"),
        ({"x": float("nan")}, "the training record['x'] is nan, which JSON cannot hold"),
        ({1: "a"}, "the training record has the key 1 (int); JSON keys are strings"),
        ({"args": {"name": ["ok", "x\udc80"]}}, "the training record['args']['name'][1] is the string 'x\\udc80', which is "
                                                "not valid Unicode (a lone surrogate); JSON cannot hold it for "
                                                "safetensors and other strict readers"),
        ({"args": {"k\ud800\udc00": 1}}, "the training record['args'] has the key 'k\\ud800\\udc00', which is not valid "
                                          "Unicode (a lone surrogate); JSON cannot hold it for safetensors and other "
                                          "strict readers"),
    ]:
        with pytest.raises(ckptfmt.ConfigError) as excinfo:
            dumps_strict(value, what="the training record")
        assert str(excinfo.value) == message
    # json writes an emoji as a surrogate pair escape, which reads back as the one character
    ok = {"a": [[[1]]], "n": 10**18, "s": "é\x00\U0001f600"}
    assert "\\ud83d\\ude00" in dumps_strict(ok, what="x")
    assert loads_strict(dumps_strict(ok, what="x"), what="x") == ok


@pytest.mark.parametrize(
    "key, document, message",
    [
        ("ckptfmt.training", {"optimizer": "m.optimizer.safetensors"},
         "metadata 'ckptfmt.training': optimizer must be an object {\"file\": ..., \"sha256\": ...}, not "
         "'m.optimizer.safetensors'; the file is damaged or was not written by ckptfmt"),
        ("ckptfmt.training", {"optimizer": {"file": 7, "sha256": "0" * 64}},
         "metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's folder, not 7; "
         "the file is damaged or was crafted to read elsewhere"),
        ("ckptfmt.training", {"optimizer": {"file": "../elsewhere/x.optimizer.safetensors", "sha256": "0" * 64}},
         "metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's folder, not "
         "'../elsewhere/x.optimizer.safetensors'; the file is damaged or was crafted to read elsewhere"),
        ("ckptfmt.training", {"optimizer": {"file": "/etc/passwd", "sha256": "0" * 64}},
         "metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's folder, not "
         "'/etc/passwd'; the file is damaged or was crafted to read elsewhere"),
        ("ckptfmt.training", {"metrics": [0.5, 0.9]},
         "metadata 'ckptfmt.training': metrics must be an object of numbers by name, not [0.5, 0.9]; the file is "
         "damaged or was not written by ckptfmt"),
        ("ckptfmt.training", {"epoch": "3"},
         "metadata 'ckptfmt.training': epoch must be a non-negative int, not '3'; the file is damaged or was not "
         "written by ckptfmt"),
        ("ckptfmt.provenance", {"source": "best_model.pth"},
         "metadata 'ckptfmt.provenance': source must be an object, not 'best_model.pth'; the file is damaged or "
         "was not written by ckptfmt"),
        ("ckptfmt.provenance", {"cast": "F16"},
         "metadata 'ckptfmt.provenance': cast must be an object {\"to\": dtype, \"from\": {dtype: count}}, not "
         "'F16'; the file is damaged or was not written by ckptfmt"),
    ],
    ids=["binding a string", "binding file a number", "binding traversal", "binding absolute", "metrics a list",
         "epoch a string", "source a string", "cast a string"],
)
def test_class_6_and_1_documents_of_the_wrong_shape_are_our_error_everywhere(tmp_path, key, document, message):
    """Validated where read, one function per document: inspect, verify and load see the same."""
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata[key] = json.dumps(document)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    for use in (ckptfmt.inspect_checkpoint, ckptfmt.load_model_with_config):
        with pytest.raises(HeaderError) as excinfo:
            use(path)
        assert str(excinfo.value) == f"{path}: {message}"
    assert not ckptfmt.verify(path).ok
    result = run_cli("inspect", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"Error: {path}: {message}"


def test_class_1_folder_walks_do_not_follow_links_out_of_the_folder(tmp_path):
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


def test_class_2_nothing_is_written_through_a_fifo_at_the_output(tmp_path):
    model, config = small_model()
    os.mkfifo(tmp_path / "m.safetensors")
    for overwrite in (False, True):
        with pytest.raises(ckptfmt.WriteError, match="is not a regular file \\(a FIFO, a device or a socket\\); ckptfmt "
                                                     "writes only regular files and never through one of those"):
            ckptfmt.save_model_with_config(model, tmp_path / "m.safetensors", config, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_class_4_text_from_files_reaches_the_terminal_escaped(tmp_path):
    """A file name with a newline cannot forge an [OK] line; escape sequences in tensor names,
    metric names, class names and config strings are shown escaped, one line staying one line."""
    model, config = small_model()
    folder = tmp_path / "in"
    folder.mkdir()
    forged = folder / "x\n[OK]   evil.pth -> evil.safetensors  all good\nz.pth"
    torch.save({"w\x1b[31mred": torch.zeros(2)}, forged)
    result = run_cli("convert", str(folder))
    lines = (result.stdout + result.stderr).splitlines()
    assert not any(line.startswith("[OK]   evil.pth") for line in lines)
    assert any("x\\n[OK]   evil.pth" in line for line in lines)
    assert all("\x1b" not in line for line in lines)
    described = config.replace(description="run \x1b]0;pwned\x07 done", class_names=["a\x1b[2Jb", "c"])
    path = ckptfmt.save_model_with_config(model, tmp_path / "m.safetensors", described, metrics={"dice\x1b[1m": 0.5})
    for command in (["inspect", str(path), "--tensors"], ["inspect", str(tmp_path)], ["verify", str(path)],
                    ["diff", str(path), str(path)]):
        result = run_cli(*command)
        assert result.returncode == 0, result.stderr
        assert not any(c in result.stdout + result.stderr for c in "\x1b\x07"), command
    shown = run_cli("inspect", str(path)).stdout
    assert "dice\\e[1m=0.5" in shown and '"a\\u001b[2Jb"' in shown
    as_json = run_cli("inspect", str(path), "--json").stdout
    assert json.loads(as_json)["config"]["class_names"][0] == "a\x1b[2Jb" and "\x1b" not in as_json


def test_class_3_a_sidecar_that_is_a_device_or_huge_is_refused_before_it_is_read(tmp_path):
    path, _, _ = save_small(tmp_path)
    sidecar = tmp_path / "model_config.json"
    sidecar.unlink()
    sidecar.symlink_to("/dev/zero")
    shown = ckptfmt.inspect_checkpoint(path)["sidecar"]
    assert shown == {"status": "invalid", "path": str(sidecar),
                     "message": "is a device, not a regular file; refused (reading it could block or never end)"}
    sidecar.unlink()
    with open(sidecar, "wb") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB that cost no disk
    report = ckptfmt.verify(path)
    assert report.failures == [
        f"{path}: sidecar is invalid: is 17,825,792 bytes, over the 16,777,216-byte limit for a config JSON file"
    ]


def test_class_6_an_integer_tensor_where_the_architecture_has_a_float_is_caught_before_torch(tmp_path):
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


def test_class_5_a_lone_surrogate_is_refused_wherever_a_string_is_read(tmp_path):
    """Python's json reads "\\udc80" back, safetensors does not: the reader refuses it too, in a
    tensor name and in the JSON documents the metadata holds, as our error."""
    from ckptfmt.io.jsondoc import loads_strict

    from ..helpers import craft_safetensors

    crafted = craft_safetensors(
        tmp_path / "crafted.safetensors",
        '{"a\\udc80": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)
    message = ("header holds the string 'a\\udc80', which is not valid Unicode (a lone surrogate); safetensors and "
               "other strict JSON readers refuse it")
    with pytest.raises(HeaderError) as excinfo:
        read_header(crafted)
    assert str(excinfo.value) == f"{crafted}: {message}"
    assert ckptfmt.verify(crafted).failures == [f"{crafted}: {message}"]
    for command in ("inspect", "verify"):
        result = run_cli(command, str(crafted))
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].endswith(f"{crafted}: {message}")

    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata["ckptfmt.training"] = '{"extra": {"note": "x\\udc80"}}'  # ASCII text: safetensors itself reads this header
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    message = ("metadata 'ckptfmt.training' holds the string 'x\\udc80', which is not valid Unicode (a lone "
               "surrogate); safetensors and other strict JSON readers refuse it")
    with pytest.raises(HeaderError) as excinfo:
        read_header(path).training()
    assert str(excinfo.value) == f"{path}: {message}"
    assert f"{path}: {message}" in ckptfmt.verify(path).failures

    for text, read in [('"\\ud83d\\ude00"', "\U0001f600"), ('["\\\\ud800"]', ["\\ud800"]), ('{"\\u00e9": 1}', {"é": 1})]:
        assert loads_strict(text, what="x") == read  # a pair, an escaped backslash, a plain escape: all fine
    for text, bad in [('{"k\\uDC80": 1}', "k\\udc80"), ('["\\ud800\\\\udc00"]', "\\ud800\\\\udc00"),
                      ('["\\udc00\\ud800"]', "\\udc00\\ud800"), ('"\ud800"', "\\ud800")]:
        with pytest.raises(HeaderError) as excinfo:
            loads_strict(text, what="x")
        assert str(excinfo.value) == (f"x holds the string '{bad}', which is not valid Unicode (a lone surrogate); "
                                      "safetensors and other strict JSON readers refuse it")


def test_class_5_convert_refuses_a_lone_surrogate_and_writes_nothing_verify_rejects(tmp_path):
    """Regression: a tensor named "a\\udc80" converted [OK] and verified, then diff and
    safetensors refused the file."""
    from safetensors import safe_open

    source = tmp_path / "named.pth"
    torch.save({"w": torch.zeros(2), "a\udc80": torch.zeros(2)}, source)
    result = run_cli("convert", str(source))
    assert result.returncode == 1
    assert (
        f"[FAIL] {source}: {tmp_path / 'named.safetensors'}: tensor 'a\\udc80': tensor names must be valid Unicode, "
        "and this one holds a lone surrogate, which safetensors refuses to read"
    ) in (result.stdout + result.stderr).splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.pth"]

    # A value elsewhere in the file is left out, and said; what is written, every reader reads.
    source = tmp_path / "extra.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3, "note\udc80": "x", "tag": "y\udc80"}, source)
    converted = ckptfmt.convert(source)
    assert converted.status == "converted"
    assert converted.dropped == {
        "note\udc80": "neither JSON nor the companion can hold it: the training state['extra']['__items__'][0][0] is "
                      "the string 'note\\udc80', which is not valid Unicode (a lone surrogate); JSON cannot hold it "
                      "for safetensors and other strict readers",
        "tag": "neither JSON nor the companion can hold it: the training state['extra']['__items__'][0][1] is the "
               "string 'y\\udc80', which is not valid Unicode (a lone surrogate); JSON cannot hold it for "
               "safetensors and other strict readers",
    }
    assert ckptfmt.verify(converted.output).ok
    assert read_header(converted.output).training()["epoch"] == 3
    with safe_open(converted.output, "pt") as stored:
        assert list(stored.keys()) == ["w"]
    assert run_cli("diff", str(converted.output), str(converted.output)).returncode == 0


def _moved_out(link, target):
    """Move `link`'s file to `target` and leave at `link` a symlink to it, relative."""
    target.parent.mkdir(exist_ok=True)
    os.rename(link, target)
    link.symlink_to(os.path.relpath(target, link.parent))


def test_class_1_a_named_file_that_links_out_of_the_folder_is_not_followed(tmp_path):
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


def test_class_4_a_file_name_that_is_not_utf8_is_shown_escaped_and_recorded_escaped(tmp_path):
    """Python reads such a name with surrogateescape: the report shows the bad byte as \\x80,
    never raw; an output of such a name is refused (the sidecar binds weights by name, in
    JSON), and with -o the provenance records the source's name with the byte escaped."""
    model, _ = small_model()
    source = tmp_path / os.fsdecode(b"run\x80.pth")
    torch.save(model.state_dict(), source)
    refused = run_cli("convert", str(tmp_path))
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        f"[FAIL] {tmp_path}/run\\x80.pth: {tmp_path}/run\\x80.safetensors: the output's name is not valid UTF-8, "
        "and model_config.json binds weights by name in JSON; choose another output (-o)")
    result = run_cli("convert", str(source), "-o", str(tmp_path / "out/run.safetensors"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"[OK]   {tmp_path}/run\\x80.pth -> {tmp_path}/out/run.safetensors  ")
    output = tmp_path / "out/run.safetensors"
    assert ckptfmt.read_header(output).provenance()["source"]["file"] == "run\\x80.pth"
    assert ckptfmt.verify(output).ok
