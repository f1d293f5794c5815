"""Errors are data: each says its fix in Python's words where the library raised it, and in the
command line's options where the command line shows it, from the same error object."""

from __future__ import annotations

import collections
import importlib
import logging
import pickle
import pkgutil
import re

import pytest
import torch
from click.testing import CliRunner

import ckptfmt
from ckptfmt import cli
from ckptfmt.cli import main
from ckptfmt.errors import AmbiguousArchitectureError, CkptfmtWarning, OutputExistsError, UnsafePickleError, Words

from .helpers import small_model

REFUSED_DEQUE = ("refused to unpickle: it needs the global collections.deque, which the safe (weights-only) loader "
                 "does not allow because unpickling it can run code. If you trust this file, convert it with ")


def test_an_existing_output_says_overwrite_in_python_and_force_on_the_command_line(tmp_path):
    """One OutputExistsError: `overwrite=True` where the library raised it, `--force` in the [FAIL]
    line that convert prints for it."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    (tmp_path / "m.safetensors").write_bytes(b"not ours")
    with pytest.raises(OutputExistsError) as excinfo:
        ckptfmt.convert(tmp_path / "m.pth")
    assert str(excinfo.value) == f"{tmp_path / 'm.safetensors'}: already exists; pass overwrite=True to replace it"
    shown = CliRunner().invoke(main, ["convert", str(tmp_path / "m.pth")])
    assert shown.exit_code == 1
    assert shown.stderr.splitlines() == [
        f"[FAIL] {tmp_path / 'm.pth'}: {tmp_path / 'm.safetensors'}: already exists; pass --force to replace it"]


def test_a_refused_pickle_says_the_argument_in_python_and_the_option_on_the_command_line(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}, "queue": collections.deque([1])}, tmp_path / "m.pth")
    with pytest.raises(UnsafePickleError) as excinfo:
        ckptfmt.convert(tmp_path / "m.pth")
    assert str(excinfo.value) == f"{tmp_path / 'm.pth'}: {REFUSED_DEQUE}`convert(SOURCE, unsafe_pickle=True)`"
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.pth")])
    assert (shown.exit_code, shown.stderr) == (
        1, f"Error: {tmp_path / 'm.pth'}: {REFUSED_DEQUE}`ckptfmt convert SOURCE --unsafe-pickle`\n")


def test_the_unsafe_load_log_line_names_the_option_on_the_command_line(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    logger, records = logging.getLogger("ckptfmt"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        ckptfmt.convert(tmp_path / "m.pth", unsafe_pickle=True)
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == [
        f"{tmp_path / 'm.pth'}: unpickling with weights_only=False (unsafe_pickle=True): this can run code"]
    shown = CliRunner().invoke(main, ["convert", str(tmp_path / "m.pth"), "--unsafe-pickle",
                                      "-o", str(tmp_path / "cli.safetensors")])
    assert shown.exit_code == 0, shown.output
    assert shown.stderr.splitlines()[0] == (
        f"warning: {tmp_path / 'm.pth'}: unpickling with weights_only=False (--unsafe-pickle): this can run code")


def test_a_warning_carries_its_parts_in_both_spellings():
    warning = CkptfmtWarning(Words("sidecar ignored (config=)", "sidecar ignored (--config)"), path="m.pth",
                             fix=Words("pass overwrite=True", "pass --force"))
    assert str(warning) == "m.pth: sidecar ignored (config=); pass overwrite=True"
    assert warning.describe(cli=True) == "m.pth: sidecar ignored (--config); pass --force"
    words = warning.message_words
    assert (words.python, words.cli) == ("sidecar ignored (config=); pass overwrite=True",
                                         "sidecar ignored (--config); pass --force")


def _register_linear(registry, name: str, *, scale: float):
    """An architecture whose state dict is one `fc` layer: any two of these are twins."""

    def infer(shapes):
        if set(shapes) != {"fc.weight", "fc.bias"}:
            raise ckptfmt.ArchitectureNotRecognisedError("not one fc layer")
        return {"width": shapes["fc.weight"][1]}

    class Linear(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.fc = torch.nn.Linear(width, 2)

        def forward(self, x):
            return self.fc(x) * scale

    task = lambda params: ckptfmt.Task("classification", in_channels=1, classes=2, input_size=(1, params["width"]))  # noqa: E731
    registry.register_model(name, infer_config=infer, task=task)(Linear)


def test_a_re_raised_ambiguous_architecture_keeps_its_class_and_candidates(tmp_path, monkeypatch):
    """Re-raising with `type(exc)(message)` dropped `candidates`; `at` and the trip from rank 0 to
    the other ranks (a pickle) keep the class, the candidates and both spellings of the fix."""
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    _register_linear(registry, "plain", scale=1.0)
    _register_linear(registry, "doubled", scale=2.0)
    torch.save({f"fc.{k}": v for k, v in torch.nn.Linear(4, 2).state_dict().items()}, tmp_path / "fc.pth")
    with pytest.raises(AmbiguousArchitectureError) as excinfo:
        ckptfmt.convert(tmp_path / "fc.pth")
    error = excinfo.value
    assert [(c["model_type"], c["width"]) for c in error.candidates] == [("doubled", 4), ("plain", 4)]
    assert error.describe(cli=True).endswith("say which with --model-type and --set, e.g. `--model-type doubled --set width=4`")
    moved = error.at(tmp_path / "copy.pth", problem="fits twins")
    shared = pickle.loads(pickle.dumps(error))
    for again in (moved, shared):
        assert type(again) is AmbiguousArchitectureError and again.candidates == error.candidates
        assert (again.fix.python, again.fix.cli) == (error.fix.python, error.fix.cli)
    assert str(moved) == f"{tmp_path / 'copy.pth'}: fits twins; {error.fix.python}"
    assert shared.describe(cli=True) == error.describe(cli=True) and str(shared) == str(error)


def test_the_command_line_rewrites_no_message():
    """The command line used to turn the library's messages into its own words with regular
    expressions over their text; each error now says both, and the command line picks."""
    modules = [cli, *(importlib.import_module(f"ckptfmt.cli.{found.name}") for found in pkgutil.iter_modules(cli.__path__))]
    assert [name for module in modules for name, value in vars(module).items() if isinstance(value, re.Pattern)] == [
        "_CONTROL"]
    assert not any(hasattr(module, "in_cli_words") for module in modules)
