"""What the security tests of more than one threat share: checkpoints crafted for them, the
check that a file is refused with our error, and the fresh Python process some of them need."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import CkptfmtError, read_header
from ckptfmt.format.writer import write_safetensors
from ckptfmt.sources.legacy import read_legacy_checkpoint

from ..helpers import small_model


def edit_dcp_metadata(folder: Path, edit) -> None:
    """Rewrite a DCP folder's .metadata (trusted here: the test wrote it) after `edit`; objects
    that `edit` shares are pickled once and referenced after (the pickle's memo), as an attacker
    would write them."""
    import pickle

    metadata = pickle.loads((folder / ".metadata").read_bytes())
    edit(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def fresh_python(code: str, *, cwd: Path, memory_bytes: int | None = None) -> subprocess.CompletedProcess:
    """A fresh process, with an address-space limit when given; never left to hang."""
    if memory_bytes is not None:
        code = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))\n{code}"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def refusals_under_2_gb(path: Path, uses: str) -> list[str]:
    """What each of `uses` (a Python expression: a tuple of callables taking the path) says of
    `path`, in a fresh process under a 2 GB address-space limit; each must refuse it with our
    LegacyCheckpointError."""
    code = textwrap.dedent(f"""
        import ckptfmt, sys
        from ckptfmt.compare import diff
        for use in {uses}:
            try:
                use({str(path)!r})
            except ckptfmt.LegacyCheckpointError as exc:
                print(exc)
            else:
                sys.exit("not refused")
    """)
    result = fresh_python(code, cwd=path.parent, memory_bytes=2 << 30)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def assert_our_error(path: Path) -> CkptfmtError:
    with pytest.raises(CkptfmtError) as excinfo:
        read_legacy_checkpoint(path)
    assert str(excinfo.value).startswith(f"{path}: ")
    return excinfo.value


CLI = "import sys\nfrom ckptfmt.cli import main\nmain(sys.argv[1:], prog_name='ckptfmt')\n"


def trained_checkpoint(folder: Path, *, step: bool = True) -> tuple[Path, torch.nn.Module]:
    model, config = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if step:
        model.train()
        seg, cls = model(torch.randn(2, 1, 16, 16))
        (seg.mean() + cls.mean()).backward()
        optimizer.step()
    path = ckptfmt.save_model_with_config(model, folder / "m.safetensors", config, optimizer=optimizer, epoch=1)
    return path, model


def rebind(checkpoint: Path, binding: dict) -> None:
    header = read_header(checkpoint)
    metadata = dict(header.metadata)
    metadata["ckptfmt.training"] = json.dumps({**header.training(), "optimizer": binding})
    write_safetensors(checkpoint, load_file(checkpoint), metadata, overwrite=True)


NESTED = ("a nested tensor (torch.nested: parts of different shapes under one name); safetensors stores one dense "
          "array per name. Where you trust the file, save its parts (tensor.unbind()) under names of their own")


def nested_tensor(layout: torch.layout) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls its nested tensors a prototype
        return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)], layout=layout)
