"""Strings that are not valid Unicode (a lone surrogate, which Python's json reads back and
safetensors refuses): refused by the reader wherever a string is read, in tensor names and in
the JSON documents of the metadata, and never written; convert fails that file, or leaves out
and reports that one value."""

from __future__ import annotations

import pytest
import torch

import ckptfmt
from ckptfmt import HeaderError, read_header
from ckptfmt.format.metadata import build_metadata
from ckptfmt.format.writer import write_safetensors

from ..helpers import run_cli, small_model


def test_a_lone_surrogate_is_refused_wherever_a_string_is_read(tmp_path):
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


def test_convert_refuses_a_lone_surrogate_and_writes_nothing_verify_rejects(tmp_path):
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
