"""Converting a large .pth in memory that does not grow with the file: its tensors are mapped,
checked against the zip records, copied from the file by offset and compared with it there."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import LegacyCheckpointError

from .helpers import state_dicts_bit_identical

MEASURE = """
import os, sys, json
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "rss": usage.ru_maxrss * 1024}))
"""


def peak_rss(*args: str) -> int:
    """Peak RSS of a fresh Python process running `args` (measured from a small launcher, so
    that the launcher's own memory plays no part)."""
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, result.stderr
    return report["rss"]


@pytest.mark.subprocess  # Its own process: its peak memory is the measure.
def test_memory_does_not_grow_with_the_file(tmp_path):
    """A 320 MB .pth converts in about what importing torch costs; reading it whole would add
    320 MB, and 0.1.0 added twice that."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {f"layer{i:02d}.weight": torch.randn(1 << 20, generator=generator) for i in range(80)}
    torch.save(state_dict, tmp_path / "big.pth")
    size = (tmp_path / "big.pth").stat().st_size
    baseline = peak_rss("-c", "import torch, ckptfmt.converter")
    converting = peak_rss("-m", "ckptfmt", "convert", str(tmp_path / "big.pth"))
    assert converting - baseline < size // 4, f"convert took {(converting - baseline) >> 20} MB over importing torch"
    assert state_dicts_bit_identical(load_file(tmp_path / "big.safetensors"), state_dict)
    assert ckptfmt.verify(tmp_path / "big.safetensors").ok


def test_views_ties_and_casts_still_convert_exactly(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"w": base, "tied": base, "t": base.t(), "row": base[1], "half": torch.ones(3, dtype=torch.float16)}
    torch.save(tensors, tmp_path / "views.pth")
    result = ckptfmt.convert(tmp_path / "views.pth")
    loaded = ckptfmt.read_state_dict(result.output)
    assert state_dicts_bit_identical(loaded, {k: v.contiguous() for k, v in tensors.items()})
    cast = ckptfmt.convert(tmp_path / "views.pth", output=tmp_path / "cast/views.safetensors", dtype="bf16")
    assert {t.dtype for t in ckptfmt.read_state_dict(cast.output).values()} == {torch.bfloat16}


def test_a_storage_larger_than_its_zip_record_is_refused_before_it_is_read(tmp_path):
    """mmap=True skips torch's own check that each storage fits its record: ours is made
    first, so a lying record is our error and nothing is written."""
    torch.save({"a": torch.zeros(1000), "b": torch.ones(1000)}, tmp_path / "ok.pth")
    source = zipfile.ZipFile(tmp_path / "ok.pth")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as short:
        for info in source.infolist():
            data = source.read(info)
            # The record of storage 0 holds half of what the pickle declares for it.
            short.writestr(info, data[: len(data) // 2] if info.filename.endswith("/data/0") else data)
    (tmp_path / "lying.pth").write_bytes(buffer.getvalue())
    with pytest.raises(LegacyCheckpointError) as excinfo:
        ckptfmt.convert(tmp_path / "lying.pth")
    assert str(excinfo.value) == (
        f"{tmp_path / 'lying.pth'}: has a storage that is not exactly one of its zip records (its declared size "
        "does not fit the data stored for it); it is damaged, truncated or not a checkpoint"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lying.pth", "ok.pth"]


def test_the_pre_1_6_format_is_read_as_before(tmp_path):
    tensors = {"w": torch.randn(5, 3)}
    torch.save(tensors, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    result = ckptfmt.convert(tmp_path / "old.pth")
    assert json.loads(ckptfmt.read_header(result.output).metadata["ckptfmt.provenance"])["source"]["serialization"] == "torch legacy (< 1.6)"
    assert state_dicts_bit_identical(load_file(result.output), tensors)
    assert os.path.getsize(result.output) > 0
