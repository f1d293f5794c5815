"""`convert DIR` with a bad file among good ones: that file fails alone, with one `[FAIL]` line
that names it, and the others are converted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ..helpers import run_cli, small_model
from .crafted import CLI, NESTED, nested_tensor


def test_a_nested_tensor_fails_alone_in_a_folder(tmp_path):
    """`convert .` over three files, the middle one holding a nested tensor: it fails with one
    line naming it, the two others convert."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "a.pth")
    torch.save({"fc.weight": nested_tensor(torch.strided)}, tmp_path / "b.pth")
    torch.save(model.state_dict(), tmp_path / "c.pth")
    result = run_cli("convert", ".", cwd=tmp_path)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")] == [
        f"[FAIL] b.pth: tensor 'fc.weight' is {NESTED}"]
    assert result.stdout.splitlines()[-1] == "2 converted, 0 skipped, 1 failed"


def test_an_unexpected_exception_fails_its_file_alone(tmp_path, monkeypatch):
    """Regression: a bug met by one file (here torch's, as the nested tensor raised it) stopped
    the whole batch; now that file fails with one line naming it, and the rest are converted."""
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
    result = run_cli("convert", tmp_path)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")] == [
        f"[FAIL] {tmp_path / 'b.pth'}: unexpected RuntimeError: Internal error: NestedTensorImpl doesn't support "
        "sizes. Please file an issue."]
    assert result.stdout.splitlines()[-1] == "2 converted, 0 skipped, 1 failed"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["a.safetensors", "c.safetensors"]


@pytest.mark.subprocess  # Its own process: setpriv drops root's right to read any file for the process it starts.
def test_an_unreadable_file_fails_alone_and_every_fail_line_names_its_file(tmp_path):
    """Regression: `convert DIR` stopped at `Error: b.pth: Permission denied`; now b.pth fails
    alone."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv, which can drop root's right to read anything")
    # Root reads any file; without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH it is refused like anyone.
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
              "--inh-caps=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    model, _ = small_model()
    for name in ("a.pth", "b.pth", "c.pth"):
        torch.save(model.state_dict(), tmp_path / name)
    (tmp_path / "b.pth").chmod(0)
    (tmp_path / "c.safetensors").write_bytes(b"in the way")
    result = subprocess.run([*prefix, sys.executable, "-c", CLI, "convert", "."], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "1 converted, 0 skipped, 2 failed"
    failures = [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")]
    assert failures == [
        "[FAIL] b.pth: cannot be read: permission denied",
        "[FAIL] c.pth: c.safetensors: already exists; pass --force to replace it",
    ]
