"""Malicious .pth files: refused, nothing executed, nothing written, the global named."""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptfmt
from ckptfmt import LegacyCheckpointError, UnsafePickleError, convert

from ..helpers import run_cli


class _Call:
    """Pickles as a call of `function(*args)`: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def _touch(marker: Path) -> list[str]:
    return ["touch", str(marker)]


# name -> (payload builder, the global the message must name)
PAYLOADS = {
    "os.system": (lambda m: _Call(os.system, f"touch {m}"), "posix.system"),
    "subprocess.call": (lambda m: _Call(subprocess.call, _touch(m)), "subprocess.call"),
    "subprocess.Popen": (lambda m: _Call(subprocess.Popen, _touch(m)), "subprocess.Popen"),
    "multiprocessing spawnv_passfds": (
        lambda m: _Call(__import__("multiprocessing.util").util.spawnv_passfds, "/usr/bin/touch", ["touch", str(m)], ()),
        "multiprocessing.util.spawnv_passfds",
    ),
    "builtins.exec": (lambda m: _Call(exec, f"open({str(m)!r}, 'w').close()"), "builtins.exec"),
}


def _folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(params=[False, True], ids=["default-env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def force_env(request, monkeypatch):
    """torch.load honours this variable only when weights_only is not passed: we always pass it."""
    if request.param:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return request.param


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=list(PAYLOADS))
def test_code_running_payloads_are_refused(tmp_path, payload, zip_format, force_env):
    build, global_name = PAYLOADS[payload]
    marker = tmp_path / "marker"
    source = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(3), "hook": build(marker)}, source, _use_new_zipfile_serialization=zip_format)
    before = _folder_listing(tmp_path)
    with pytest.raises(UnsafePickleError) as excinfo:
        convert(source)
    message = str(excinfo.value)
    assert message.startswith(f"{source}: refused to unpickle: it needs the global {global_name},")
    assert message.endswith("If you trust this file, convert it with `convert(SOURCE, unsafe_pickle=True)`")
    assert not marker.exists()
    assert _folder_listing(tmp_path) == before


@pytest.mark.parametrize(
    "obj, global_name",
    [
        (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
        ({"state_dict": {"w": torch.zeros(2)}, "started": datetime.date(2024, 5, 1)}, "datetime.date"),
        ({"state_dict": {"w": torch.zeros(2)}, "best": np.float64(0.9)}, "numpy"),
    ],
    ids=["whole nn.Module", "datetime.date", "numpy scalar"],
)
def test_objects_beyond_tensors_are_refused_naming_the_global(tmp_path, obj, global_name, force_env):
    torch.save(obj, tmp_path / "m.pth")
    with pytest.raises(UnsafePickleError, match=rf"needs the global {global_name}"):
        convert(tmp_path / "m.pth")
    assert _folder_listing(tmp_path) == ["m.pth"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path, force_env):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(LegacyCheckpointError, match=r"is a TorchScript archive \(torch\.jit\.save\), which holds code"):
        convert(tmp_path / "scripted.pt")
    assert _folder_listing(tmp_path) == ["scripted.pt"]


@pytest.mark.parametrize("protocol", [2, 4])
def test_raw_pickle_not_written_by_torch_save_is_refused(tmp_path, protocol, force_env):
    marker = tmp_path / "marker"
    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"w": _Call(os.system, f"touch {marker}")}, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"convert\(SOURCE, unsafe_pickle=True\)"):
        convert(tmp_path / "raw.pth")
    assert not marker.exists()
    assert _folder_listing(tmp_path) == ["raw.pth"]


def test_cli_refusal_is_one_line_and_exit_1_even_with_the_env_override(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "x": _Call(os.system, f"touch {marker}")}, tmp_path / "evil.pth")
    result = run_cli("convert", "evil.pth", cwd=tmp_path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert result.returncode == 1
    assert not marker.exists()
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "[FAIL] evil.pth: refused to unpickle: it needs the global posix.system, which the safe "
        "(weights-only) loader does not allow because unpickling it can run code. If you trust "
        "this file, convert it with `ckptfmt convert SOURCE --unsafe-pickle`"
    ]
    for command in (["inspect", "evil.pth"], ["diff", "evil.pth", "evil.pth"]):
        result = run_cli(*command, cwd=tmp_path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
        assert result.returncode == 1 and not marker.exists()
        assert result.stderr.strip().splitlines() == [
            "Error: evil.pth: refused to unpickle: it needs the global posix.system, which the safe "
            "(weights-only) loader does not allow because unpickling it can run code. If you trust "
            "this file, convert it with `ckptfmt convert SOURCE --unsafe-pickle`"
        ]


def test_loaders_refuse_too(tmp_path, force_env):
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "x": _Call(os.system, f"touch {marker}")}, tmp_path / "evil.pth")
    for load in (ckptfmt.load_model, ckptfmt.load_model_with_config, ckptfmt.MultiTaskPredictor,
                 ckptfmt.inspect_checkpoint):
        with pytest.raises(UnsafePickleError):
            load(tmp_path / "evil.pth")
    assert not marker.exists()
