"""Hostile inputs, round two, where they meet the legacy reader and the training state: paths
out of the folder, FIFOs, amplification pickles, malformed and edited companions, and ordinary
inputs that used to crash. Each test names its class (issue "Hostile inputs, round two")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import HeaderError, IntegrityError, LegacyCheckpointError, load_training_state, read_header
from ckptfmt.cli import main
from ckptfmt.compare import diff
from ckptfmt.format.companion import companion_digest
from ckptfmt.format.header import FORMAT_VERSION
from ckptfmt.format.writer import write_safetensors

from ..helpers import ROOT, small_model


def _python(code: str, *, cwd: Path, memory_bytes: int | None = None) -> subprocess.CompletedProcess:
    """A fresh process, with an address-space limit when given; never left to hang."""
    if memory_bytes is not None:
        code = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))\n{code}"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


CLI = "import sys\nfrom ckptfmt.cli import main\nmain(sys.argv[1:], prog_name='ckptfmt')\n"


# -- class 3: memory and time bounded by the input's real size --------------------------------

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
    code = textwrap.dedent(f"""
        import ckptfmt, sys
        from ckptfmt.compare import diff
        for use in (ckptfmt.convert, ckptfmt.inspect_checkpoint, lambda p: diff(p, p), ckptfmt.load_model):
            try:
                use({str(source)!r})
            except ckptfmt.LegacyCheckpointError as exc:
                print(exc)
            else:
                sys.exit("not refused")
    """)
    result = _python(code, cwd=source.parent, memory_bytes=2 << 30)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_class_3_a_billion_laughs_pickle_is_refused_in_bounded_memory_and_time(tmp_path, zip_format):
    """A 1.6 KB .pth whose memo makes 10^10 shared references: convert, inspect, diff and
    load_model each refuse it, under a 2 GB address-space limit (they used to run without end)."""
    source = _crafted_pth(tmp_path / "laughs.pth", _laughs(), zip_format=zip_format)
    assert source.stat().st_size < 2000
    message = (f"{source}: holds more than 1,000,000 objects, counting each shared reference where it is used: a "
               "pickle built to multiply references (a \"billion laughs\"), refused before it is walked")
    assert _refusals_under_2_gb(source) == [message] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["laughs.pth"]


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
def test_class_3_a_string_multiplied_by_references_is_refused_before_any_json(tmp_path, make_text, copies):
    """A 1.5 MB .pth holding one 1 MiB string 200,000 times passed the element bound, then
    convert built gigabytes of JSON (MemoryError from json.dumps); inspect and diff too. Each
    reference counts its string's bytes: refused, under a 2 GB address-space limit."""
    source = tmp_path / "strbomb.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "notes": [make_text()] * copies}, source)  # pickle memoizes it
    assert source.stat().st_size < 2 << 20
    message = (f"{source}: holds more than 64 MiB of strings and bytes, counting each shared reference where it is "
               "used: a pickle built to multiply a string, refused before it is turned into JSON")
    assert _refusals_under_2_gb(source) == [message] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strbomb.pth"]


def test_class_3_text_under_the_bound_still_converts(tmp_path):
    """The bound counts references, not distinct strings, and leaves real text alone: a
    run's notes shared a few times convert as before."""
    source = tmp_path / "notes.pth"
    note = "a line of a training log\n" * 1000
    torch.save({"state_dict": {"w": torch.zeros(2)}, "notes": [note] * 8}, source)
    result = ckptfmt.convert(source)
    assert result.status == "converted"
    assert read_header(result.output).training()["extra"]["notes"] == [note] * 8


def test_class_3_a_pickle_that_holds_itself_is_refused(tmp_path):
    source = _crafted_pth(tmp_path / "cycle.pth", _self_containing_list(), zip_format=True)
    with pytest.raises(LegacyCheckpointError) as excinfo:
        ckptfmt.convert(source)
    assert str(excinfo.value) == (f"{source}: nests containers deeper than 64 levels (or in a cycle); no checkpoint "
                                  "does: refused")


# -- the training-state companion -------------------------------------------------------------


def _trained_checkpoint(folder: Path, *, step: bool = True) -> tuple[Path, torch.nn.Module]:
    model, config = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if step:
        model.train()
        seg, cls = model(torch.randn(2, 1, 16, 16))
        (seg.mean() + cls.mean()).backward()
        optimizer.step()
    path = ckptfmt.save_model_with_config(model, folder / "m.safetensors", config, optimizer=optimizer, epoch=1)
    return path, model


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
    _rebind(checkpoint, {"file": companion.name, "sha256": companion_digest(text, digest)})
    return companion


def _rebind(checkpoint: Path, binding: dict) -> None:
    header = read_header(checkpoint)
    metadata = dict(header.metadata)
    metadata["ckptfmt.training"] = json.dumps({**header.training(), "optimizer": binding})
    write_safetensors(checkpoint, load_file(checkpoint), metadata, overwrite=True)


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
def test_class_6_a_malformed_companion_is_our_error_in_load_and_verify(tmp_path, edit, message):
    path, model = _trained_checkpoint(tmp_path)
    companion = _rewrite_companion(path, edit)
    with pytest.raises(HeaderError) as excinfo:
        load_training_state(path, torch.optim.AdamW(model.parameters()))
    assert str(excinfo.value) == f"{companion}: {message}"
    assert ckptfmt.verify(path).failures == [f"{path}: training state m.optimizer.safetensors: {message}"]


def test_class_6_a_companion_of_the_wrong_types_is_our_error(tmp_path):
    path, model = _trained_checkpoint(tmp_path)

    def groups_as_text(document):
        items = _optimizer_items(document)
        items[[k for k, _ in items].index("param_groups")][1] = "lr=10"
        return document

    _rewrite_companion(path, groups_as_text)
    with pytest.raises(ckptfmt.ConfigError, match=rf"^{path}: its saved optimizer state does not fit the AdamW given "):
        load_training_state(path, torch.optim.AdamW(model.parameters()))


def test_class_7_an_edit_to_the_companions_json_fails_verify_and_load(tmp_path):
    """Editing param_groups (lr to 10.0) passed verify, and loaded lr=10.0 silently."""
    path, model = _trained_checkpoint(tmp_path)
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


def test_class_7_an_optimizer_that_never_stepped_is_bound_to_its_json(tmp_path):
    path, _ = _trained_checkpoint(tmp_path, step=False)
    binding = read_header(path).training()["optimizer"]
    assert not read_header(path.with_name(binding["file"])).tensors
    assert binding["sha256"] != hashlib.sha256(b"").hexdigest()
    assert ckptfmt.verify(path).ok


def test_class_7_a_companion_written_by_0_1_0_still_loads_and_verify_says_what_it_covers():
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


def test_class_7_a_new_companion_is_not_accepted_under_an_old_binding(tmp_path):
    """The old rule holds only for 0.1.0's layout: a binding to the tensors alone does not let
    a new companion's JSON go unchecked."""
    path, model = _trained_checkpoint(tmp_path)
    companion = path.with_name("m.optimizer.safetensors")
    _rebind(path, {"file": companion.name, "sha256": read_header(companion).weights_sha256})
    with pytest.raises(IntegrityError, match="does not match the checkpoint's record of it"):
        load_training_state(path, torch.optim.AdamW(model.parameters()))


# -- class 1 and 2: the companion is a regular file in the checkpoint's folder ----------------


@pytest.mark.parametrize("name", ["../elsewhere/m.optimizer.safetensors", "/tmp/m.optimizer.safetensors"])
def test_class_1_a_binding_that_leaves_the_folder_is_refused_naming_the_key(tmp_path, name):
    outside, model = _trained_checkpoint(tmp_path / "elsewhere")
    path, _ = _trained_checkpoint(tmp_path / "run")
    binding = read_header(outside).training()["optimizer"]  # a valid companion, had the name been followed
    _rebind(path, {"file": name, "sha256": binding["sha256"]})
    message = (f"{path}: metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's "
               f"folder, not {name!r}; the file is damaged or was crafted to read elsewhere")
    with pytest.raises(HeaderError) as excinfo:
        load_training_state(path, torch.optim.AdamW(model.parameters()))
    assert str(excinfo.value) == message
    assert not ckptfmt.verify(path).ok


def test_class_2_a_fifo_as_the_companion_is_refused_not_waited_on(tmp_path):
    path, _ = _trained_checkpoint(tmp_path)
    companion = path.with_name("m.optimizer.safetensors")
    companion.unlink()
    os.mkfifo(companion)
    code = textwrap.dedent(f"""
        import ckptfmt, torch
        model = ckptfmt.load_model({str(path)!r})
        try:
            ckptfmt.load_training_state({str(path)!r}, torch.optim.AdamW(model.parameters()))
        except ckptfmt.HeaderError as exc:
            print(exc)
        print(ckptfmt.verify({str(path)!r}).failures[0])
    """)
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    refusal = "is a FIFO (named pipe), not a regular file; refused (reading it could block or never end)"
    assert result.stdout.splitlines() == [
        f"{companion}: {refusal}", f"{path}: training state m.optimizer.safetensors: {refusal}"]


def test_class_2_a_fifo_named_pth_or_ckpt_is_refused_and_skipped_in_folders(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "good.pth")
    for name in ("x.pth", "x.ckpt"):
        os.mkfifo(tmp_path / name)
    result = subprocess.run([sys.executable, "-c", CLI, "convert", "x.pth", "x.ckpt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-2:] == [
        f"[FAIL] {name}: is a FIFO (named pipe), not a regular file; refused (reading it could block or never end)"
        for name in ("x.pth", "x.ckpt")
    ]
    folder = subprocess.run([sys.executable, "-c", CLI, "convert", "."], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert folder.returncode == 0, folder.stderr
    assert folder.stdout.splitlines()[-1] == "1 converted, 0 skipped, 0 failed"


# -- class 9: ordinary inputs that crashed --------------------------------------------------


@pytest.mark.parametrize(
    "tensor, problem",
    [
        (torch.empty(3, 4, device="meta"), "on the meta device: it has a shape but no data (saved from a model that "
                                            "was never materialised); save the checkpoint from a model whose weights "
                                            "are loaded"),
        (torch.eye(3).to_sparse(), "a sparse tensor (torch.sparse_coo); safetensors stores dense tensors only. Where "
                                   "you trust the file, save tensor.to_dense() in its place"),
    ],
    ids=["meta", "sparse"],
)
def test_class_9_meta_and_sparse_tensors_are_our_error_in_convert_and_diff(tmp_path, tensor, problem):
    source = tmp_path / "odd.pth"
    torch.save({"fc.weight": tensor, "fc.bias": torch.zeros(3)}, source)
    message = f"{source}: tensor 'fc.weight' is {problem}"
    for use in (ckptfmt.convert, lambda p: diff(p, p), ckptfmt.inspect_checkpoint):
        with pytest.raises(LegacyCheckpointError) as excinfo:
            use(source)
        assert str(excinfo.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.pth"]


def test_class_9_a_tensor_named_metadata_is_our_error(tmp_path):
    """It gave an internal "fill_in placeholder" error; the companion written before the
    weights were refused is removed with them."""
    source = tmp_path / "named.pth"
    weights = {"__metadata__": torch.nn.Parameter(torch.zeros(2)), "w": torch.zeros(2)}
    optimizer = torch.optim.SGD([weights["__metadata__"]], lr=0.1, momentum=0.9)
    weights["__metadata__"].grad = torch.ones(2)
    optimizer.step()
    torch.save({"state_dict": {k: v.detach() for k, v in weights.items()}, "optimizer": optimizer.state_dict()}, source)
    result = CliRunner().invoke(main, ["convert", str(source)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"[FAIL] {source}: {tmp_path / 'named.safetensors'}: tensor '__metadata__': safetensors reserves that name for "
        "the metadata")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.pth"]


def test_class_9_an_unreadable_file_fails_alone_and_every_fail_line_names_its_file(tmp_path):
    """`convert DIR` stopped at `Error: b.pth: Permission denied`; now b.pth fails alone."""
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
