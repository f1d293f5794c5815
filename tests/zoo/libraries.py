"""What the library tests share: the library or a skip saying why, and a model's outputs
compared with those of its checkpoint loaded in a fresh process."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ..helpers import run
from ..test_architectures import outputs

README_SECTION = "see the README's section \"The field's libraries\" for their environment"


def require(module: str) -> Any:
    """The library, imported; else the test module is skipped, saying why (not installed, or
    installed but not importable beside this torch, as PyPI's torchvision beside a CPU torch)."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:120]
        pytest.skip(f"{module} is not usable here ({type(exc).__name__}: {first_line}); {README_SECTION}",
                    allow_module_level=True)


def outputs_in_fresh_process(paths: list[Path], x: torch.Tensor, tmp_path: Path) -> list[list[torch.Tensor]]:
    """The outputs on `x` of the models that `ckptfmt.load_model` rebuilds from each of `paths`,
    in one new Python process, which has imported nothing of them before."""
    save_file({"x": x.contiguous()}, tmp_path / "x.safetensors")
    code = (
        "import sys, ckptfmt\n"
        "from safetensors.torch import load_file, save_file\n"
        "from tests.test_architectures import outputs\n"
        "x = load_file(sys.argv[1])['x']\n"
        "for n, path in enumerate(sys.argv[2:]):\n"
        "    got = outputs(ckptfmt.load_model(path), x)\n"
        "    save_file({str(i): t.contiguous() for i, t in enumerate(got)}, f'{sys.argv[1]}.{n}')\n"
    )
    result = run("-c", code, str(tmp_path / "x.safetensors"), *map(str, paths))
    assert result.returncode == 0, result.stderr
    answers = [load_file(f"{tmp_path / 'x.safetensors'}.{n}") for n in range(len(paths))]
    return [[got[str(i)] for i in range(len(got))] for got in answers]


def assert_rebuilt_identically(model: torch.nn.Module, paths: list[Path], x: torch.Tensor, tmp_path: Path) -> None:
    """Each file, loaded in a fresh process, gives exactly the model's outputs."""
    expected = outputs(model.eval(), x)
    for got in outputs_in_fresh_process(paths, x, tmp_path):
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def with_batch_statistics(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """The model after one training-mode pass, so that its BatchNorm buffers are not their
    defaults; in eval mode."""
    with torch.no_grad():
        model.train()(x)
    return model.eval()
