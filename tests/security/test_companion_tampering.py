"""The training-state companion (NAME.optimizer.safetensors), malformed or edited after it was
written: our error from load_training_state and verify, the optimizer left untouched. A binding
written by ckptfmt 0.1.0 is still honoured, and only for a companion in 0.1.0's layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import HeaderError, IntegrityError, load_training_state, read_header
from ckptfmt.format.companion import companion_digest
from ckptfmt.format.header import FORMAT_VERSION
from ckptfmt.format.writer import write_safetensors

from ..helpers import ROOT
from .crafted import rebind, trained_checkpoint


def _rewrite_companion(checkpoint: Path, edit) -> Path:
    """Write the companion again with its JSON changed by `edit(document)`, and bind the
    checkpoint to the result, digest and all: only the content is wrong."""
    companion = checkpoint.with_name("m.optimizer.safetensors")
    header = read_header(companion)
    document = json.loads(header.metadata["ckptfmt.optimizer"])
    text = json.dumps(edit(document))
    tensors = load_file(companion)
    digest = write_safetensors(companion, tensors, {"format": "pt", "ckptfmt.format_version": FORMAT_VERSION,
                                                    "ckptfmt.optimizer": text}, overwrite=True)
    rebind(checkpoint, {"file": companion.name, "sha256": companion_digest(text, digest)})
    return companion


def _optimizer_items(document: dict) -> list:
    return document["optimizer"]["__items__"]


def _first_tensor_reference(document: dict) -> dict:
    state = dict((k, v) for k, v in _optimizer_items(document))["state"]
    return state["__items__"][0][1]["__items__"][0][1]


def _missing_tensor(document):
    _first_tensor_reference(document)["__tensor__"] = "no.such.tensor"
    return document


def _dict_as_key(document):
    state = dict((k, v) for k, v in _optimizer_items(document))["state"]
    state["__items__"][0][0] = {"__items__": []}
    return document


def _pair_of_three(document):
    _optimizer_items(document)[0].append("third")
    return document


def _unknown_marker(document):
    _first_tensor_reference(document).clear()
    _first_tensor_reference(document)["__code__"] = "os.system"
    return document


@pytest.mark.parametrize(
    "edit, message",
    [
        (_missing_tensor, "metadata 'ckptfmt.optimizer': optimizer.state.0.step refers to the tensor "
                          "'no.such.tensor', which the file does not hold; it is damaged or was edited"),
        (_dict_as_key, "metadata 'ckptfmt.optimizer': optimizer.state holds a key that is a dict or a list "
                       "({'__items__': []}); the file is damaged or was not written by ckptfmt"),
        (_pair_of_three, "metadata 'ckptfmt.optimizer': optimizer holds an item that is not a [key, value] pair "
                         "(['state', {'__items__': [[0, {'__items__': [['step', {'__tensor__': 'optimize..."
                         "); the file is damaged or was not written by ckptfmt"),
        (_unknown_marker, "metadata 'ckptfmt.optimizer': optimizer.state.0.step holds an object that is not one "
                          "of its encodings ({'__code__': 'os.system'}); the file is damaged or was not written by "
                          "ckptfmt"),
    ],
    ids=["a tensor it does not hold", "a dict as a key", "an item of three", "an unknown marker"],
)
def test_a_malformed_companion_is_our_error_in_load_and_verify(tmp_path, edit, message):
    """A companion whose JSON was rewritten, digest and binding too, so that only its content is
    wrong: our HeaderError naming the place, from load_training_state and verify alike, never
    torch's or Python's exception."""
    path, model = trained_checkpoint(tmp_path)
    companion = _rewrite_companion(path, edit)
    with pytest.raises(HeaderError) as excinfo:
        load_training_state(path, torch.optim.AdamW(model.parameters()))
    assert str(excinfo.value) == f"{companion}: {message}"
    assert ckptfmt.verify(path).failures == [f"{path}: training state m.optimizer.safetensors: {message}"]


def test_a_companion_of_the_wrong_types_is_our_error(tmp_path):
    """param_groups held as text: a ConfigError naming the optimizer it does not fit, not an
    exception from inside torch."""
    path, model = trained_checkpoint(tmp_path)

    def groups_as_text(document):
        items = _optimizer_items(document)
        items[[k for k, _ in items].index("param_groups")][1] = "lr=10"
        return document

    _rewrite_companion(path, groups_as_text)
    with pytest.raises(ckptfmt.ConfigError, match=rf"^{path}: its saved optimizer state does not fit the AdamW given "):
        load_training_state(path, torch.optim.AdamW(model.parameters()))


def test_an_edit_to_the_companions_json_fails_verify_and_load(tmp_path):
    """Regression: editing param_groups (lr to 10.0) passed verify, and loaded lr=10.0 silently."""
    path, model = trained_checkpoint(tmp_path)
    companion = path.with_name("m.optimizer.safetensors")
    header = read_header(companion)
    text = header.metadata["ckptfmt.optimizer"]
    edited = text.replace('["lr", 0.001]', '["lr", 10.0]')
    assert edited != text
    metadata = {**header.metadata, "ckptfmt.optimizer": edited}
    write_safetensors(companion, load_file(companion), metadata, overwrite=True)
    message = ("does not match the checkpoint's record of it (sha256 "
               f"{read_header(path).training()['optimizer']['sha256'][:12]}...): its JSON or its tensors were changed, "
               "or it belongs to another checkpoint")
    assert ckptfmt.verify(path).failures == [f"{path}: training state m.optimizer.safetensors: {message}"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(IntegrityError) as excinfo:
        load_training_state(path, optimizer)
    assert str(excinfo.value) == f"{companion}: {message}"
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_an_optimizer_that_never_stepped_is_bound_to_its_json(tmp_path):
    """An optimizer that never stepped stores no tensor: its binding covers its JSON, so it is
    not the digest of nothing."""
    path, _ = trained_checkpoint(tmp_path, step=False)
    binding = read_header(path).training()["optimizer"]
    assert not read_header(path.with_name(binding["file"])).tensors
    assert binding["sha256"] != hashlib.sha256(b"").hexdigest()
    assert ckptfmt.verify(path).ok


def test_a_companion_written_by_0_1_0_still_loads_and_verify_says_what_it_covers():
    """Its binding is the digest of its tensors alone: recognised as exactly that, over a
    companion in 0.1.0's layout."""
    path = ROOT / "tests/fixtures/schema1/best_model.safetensors"
    report = ckptfmt.verify(path)
    assert report.ok
    assert report.checks[-1]["message"] == (
        "training state best_model.optimizer.safetensors matches; the digest covers its tensors only (a binding "
        "written by ckptfmt 0.1.0; re-save to cover its JSON too)")
    model = ckptfmt.load_model(path).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    assert load_training_state(path, optimizer)["epoch"] == 7
    assert optimizer.state_dict()["state"][0]["momentum_buffer"].shape == next(model.parameters()).shape


def test_a_new_companion_is_not_accepted_under_an_old_binding(tmp_path):
    """The old rule holds only for 0.1.0's layout: a binding to the tensors alone does not let
    a new companion's JSON go unchecked."""
    path, model = trained_checkpoint(tmp_path)
    companion = path.with_name("m.optimizer.safetensors")
    rebind(path, {"file": companion.name, "sha256": read_header(companion).weights_sha256})
    with pytest.raises(IntegrityError, match="does not match the checkpoint's record of it"):
        load_training_state(path, torch.optim.AdamW(model.parameters()))
