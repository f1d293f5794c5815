"""Memory and time bounded by the input's real size, not by what it declares: pickles built to
multiply references or strings, or that hold themselves; zip members that would inflate; a
header whose aliases would multiply the reading; a sidecar that is a device or too large."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import ckptfmt
from ckptfmt import IntegrityError, LegacyCheckpointError, read_header
from ckptfmt.format.digest import WeightsHasher, digest_file
from ckptfmt.format.writer import tensor_bytes, write_safetensors

from ..helpers import save_small
from .crafted import assert_our_error, refusals_under_2_gb

_PLACEHOLDER = "PLACEHOLDER-FOR-THE-LAUGHS"


def _laughs(levels: int = 10, width: int = 10, memo: int = 1000) -> bytes:
    """Pickle ops that push one list of `levels` nested lists, each holding `width` references
    to the one below: width ** levels leaves from a few hundred bytes."""
    ops = b"](" + b"K\x01" * width + b"er" + struct.pack("<I", memo)
    for level in range(1, levels):
        reference = b"j" + struct.pack("<I", memo + level - 1)
        ops = b"](" + ops + reference * (width - 1) + b"er" + struct.pack("<I", memo + level)
    return ops


def _self_containing_list(memo: int = 1000) -> bytes:
    """A list that holds itself: a cycle, endless to walk."""
    return b"]r" + struct.pack("<I", memo) + b"(j" + struct.pack("<I", memo) + b"e"


def _crafted_pth(path: Path, ops: bytes, *, zip_format: bool) -> Path:
    """A real torch.save file whose one string value is replaced by raw pickle ops."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "history": _PLACEHOLDER}, path,
               _use_new_zipfile_serialization=zip_format)
    text = _PLACEHOLDER.encode()
    placeholder = b"X" + struct.pack("<I", len(text)) + text
    if not zip_format:
        raw = path.read_bytes()
        assert raw.count(placeholder) == 1
        path.write_bytes(raw.replace(placeholder, ops))
        return path
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                assert data.count(placeholder) == 1
                data = data.replace(placeholder, ops)
            archive.writestr(info, data)
    return path


def _refusals_under_2_gb(source) -> list[str]:
    """What convert, inspect, diff and load_model each say of `source`, in a fresh process under
    a 2 GB address-space limit; each must refuse it with our LegacyCheckpointError."""
    return refusals_under_2_gb(source, "(ckptfmt.convert, ckptfmt.inspect_checkpoint, lambda p: diff(p, p), "
                                       "ckptfmt.load_model)")


@pytest.mark.subprocess  # Its own process: the address-space limit (2 GB) is set for the whole process.
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_a_billion_laughs_pickle_is_refused_in_bounded_memory_and_time(tmp_path, zip_format):
    """A 1.6 KB .pth whose memo makes 10^10 shared references: convert, inspect, diff and
    load_model each refuse it, under a 2 GB address-space limit (they used to run without end)."""
    source = _crafted_pth(tmp_path / "laughs.pth", _laughs(), zip_format=zip_format)
    assert source.stat().st_size < 2000
    message = (f"{source}: holds more than 1,000,000 objects, counting each shared reference where it is used: a "
               "pickle built to multiply references (a \"billion laughs\"), refused before it is walked")
    assert _refusals_under_2_gb(source) == [message] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["laughs.pth"]


@pytest.mark.subprocess  # Its own process: the address-space limit (2 GB) is set for the whole process.
@pytest.mark.parametrize(
    "make_text, copies",
    [
        (lambda: "x" * (1 << 20), 200_000),
        # 512 Ki characters but 1 MiB of UTF-8: counted by its bytes, not its length
        (lambda: "\u00e9" * (1 << 19), 200_000),
        (lambda: b"x" * (1 << 20), 200_000),
    ],
    ids=["str", "non-ascii str", "bytes"],
)
def test_a_string_multiplied_by_references_is_refused_before_any_json(tmp_path, make_text, copies):
    """Regression: a 1.5 MB .pth holding one 1 MiB string 200,000 times passed the element
    bound, then convert built gigabytes of JSON (MemoryError from json.dumps); inspect and diff
    too. Each reference counts its string's bytes: refused, under a 2 GB address-space limit."""
    source = tmp_path / "strbomb.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "notes": [make_text()] * copies}, source)  # pickle memoizes it
    assert source.stat().st_size < 2 << 20
    message = (f"{source}: holds more than 64 MiB of strings and bytes, counting each shared reference where it is "
               "used: a pickle built to multiply a string, refused before it is turned into JSON")
    assert _refusals_under_2_gb(source) == [message] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strbomb.pth"]


def test_text_under_the_bound_still_converts(tmp_path):
    """The bound counts references, not distinct strings, and leaves real text alone: a
    run's notes shared a few times convert as before."""
    source = tmp_path / "notes.pth"
    note = "a line of a training log\n" * 1000
    torch.save({"state_dict": {"w": torch.zeros(2)}, "notes": [note] * 8}, source)
    result = ckptfmt.convert(source)
    assert result.status == "converted"
    assert read_header(result.output).training()["extra"]["notes"] == [note] * 8


def test_a_pickle_that_holds_itself_is_refused(tmp_path):
    """A list that holds itself, endless to walk: refused by the nesting bound before anything
    walks it."""
    source = _crafted_pth(tmp_path / "cycle.pth", _self_containing_list(), zip_format=True)
    with pytest.raises(LegacyCheckpointError) as excinfo:
        ckptfmt.convert(source)
    assert str(excinfo.value) == (f"{source}: nests containers deeper than 64 levels (or in a cycle); no checkpoint "
                                  "does: refused")


def test_zip_bomb_is_refused_before_inflating(tmp_path, valid_files, monkeypatch):
    """A zip member of 200 MB deflated into a file under 1 MB: refused from its zip record,
    before it is inflated and before torch.load is reached."""
    source = zipfile.ZipFile(io.BytesIO(valid_files["zip"]))
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w") as bomb:
        for info in source.infolist():
            bomb.writestr(info, source.read(info))
        bomb.writestr("zip/data/99", b"\0" * (200 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.pth").stat().st_size < 1 << 20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))
    error = assert_our_error(tmp_path / "bomb.pth")
    assert "zip member 'zip/data/99' would inflate from" in error.message
    assert error.message.endswith("refused as a zip bomb")


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


def test_each_byte_is_hashed_once_whatever_the_aliases_say(tmp_path, monkeypatch):
    """verify of a header with 20,000 aliases of one 4 MB tensor reads 4 MB, not 80 GB."""
    path = _tied_file(tmp_path / "tied.safetensors", aliases=20_000)
    header = read_header(path)
    read = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: read.append(real_preadv(fd, buffers, offset)) or read[-1])
    assert ckptfmt.verify(path).ok
    assert sum(read) == header.data_bytes


def test_format_1_ties_that_would_multiply_the_reading_are_refused(tmp_path):
    """0.1.0's digest (format 1) read a tied tensor's bytes once per name: a crafted file whose
    ties would make it read more than the file holds is refused, while 0.1.0's own ties still
    verify."""
    legit = _tied_file(tmp_path / "legit.safetensors", aliases=1, version="1")
    assert digest_file(read_header(legit)) == read_header(legit).weights_sha256  # 0.1.0's tie still verifies
    crafted = _tied_file(tmp_path / "crafted.safetensors", aliases=3, version="1", megabytes=1)
    with pytest.raises(IntegrityError) as excinfo:
        digest_file(read_header(crafted))
    assert str(excinfo.value) == (
        f"{crafted}: ties 3 names to stored tensors, which would make its (format 1) digest read 3,145,728 "
        "bytes again, more than the file's 1,048,576; refused as crafted. Re-create it from its source"
    )


def test_a_sidecar_that_is_a_device_or_huge_is_refused_before_it_is_read(tmp_path):
    """A model_config.json linked to /dev/zero, or a sparse one of 17 MiB: refused before a byte
    of it is read (regular files only, 16 MiB at most)."""
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
