"""What the CLI prints of a file's text: control characters, escape sequences and bytes that
are not UTF-8 are shown escaped, as ls and git show names, so that no file, tensor or metric
name can forge a report line or rewrite the terminal; --json stays pure JSON."""

from __future__ import annotations

import json
import os

import torch

import ckptfmt

from ..helpers import run_cli, small_model


def test_text_from_files_reaches_the_terminal_escaped(tmp_path):
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


def test_a_file_name_that_is_not_utf8_is_shown_escaped_and_recorded_escaped(tmp_path):
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
