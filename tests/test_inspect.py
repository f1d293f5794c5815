"""`inspect`, `verify` and `diff`: what a checkpoint is, at once, and whether it is intact."""

from __future__ import annotations

import json

import pytest
import torch

import ckptfmt
from ckptfmt import ModelConfig, read_header
from ckptfmt.checkpoint import build_metadata
from ckptfmt.compare import diff
from ckptfmt.format.writer import weights_digest, write_safetensors
from ckptfmt.inspect import inspect_checkpoint
from ckptfmt.verifier import verify

from .helpers import copy_demo, flip_byte, run_cli, save_small, small_model


def test_inspect_shows_config_training_provenance_tensors_and_sidecar(tmp_path):
    model, config = small_model()
    path = ckptfmt.save_model_with_config(model, tmp_path / "m.safetensors", config, epoch=2, metrics={"dice": 0.5})
    result = run_cli("inspect", path)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"file        {path}"
    assert lines[2] == "format      ckptfmt 3"
    assert "config      embedded" in lines and "  base_filters      4" in lines and "  depth             2" in lines
    assert "training    epoch 2; dice=0.5" in lines
    assert any(line.startswith("provenance  created ") for line in lines)
    parameters = sum(t.numel() for t in model.state_dict().values())
    assert any(line.startswith(f"tensors     {len(model.state_dict())} tensors, {parameters:,} parameters; F32: ") for line in lines)
    assert lines[-1] == "sidecar     consistent"


def test_inspect_json_is_one_document(tmp_path):
    path, model, config = save_small(tmp_path)
    result = run_cli("inspect", path, "--json", "--tensors")
    document = json.loads(result.stdout)
    assert document["config"] == config.to_dict()
    assert document["weights_sha256"] == weights_digest(model.state_dict())
    assert {t["name"] for t in document["tensor_list"]} == set(model.state_dict())
    counters = [t for t in model.state_dict().values() if t.dtype == torch.int64]
    assert document["tensors"]["dtypes"]["I64"] == {"tensors": len(counters), "bytes": 8 * len(counters)}


@pytest.mark.subprocess  # Its own process: only a fresh one shows what the command imports.
def test_inspect_of_safetensors_leaves_torch_unimported(tmp_path):
    path, _, _ = save_small(tmp_path)
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckptfmt.cli import main\n"
        "result = CliRunner().invoke(main, ['inspect', sys.argv[1], '--tensors'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('torch' in sys.modules)\n"
    )
    from .helpers import run

    out = run("-c", code, str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_inspect_of_a_legacy_pth_marks_the_config_inferred(tmp_path):
    model, _ = small_model(base_filters=8)
    torch.save({"state_dict": model.state_dict(), "epoch": 4}, tmp_path / "old.pth")
    result = run_cli("inspect", tmp_path / "old.pth")
    assert result.returncode == 0
    assert "format      legacy pickle (torch zip), read with weights_only=True" in result.stdout
    assert "config      inferred from the weights (legacy)" in result.stdout
    assert "  base_filters      8" in result.stdout
    assert "training    epoch 4" in result.stdout


def test_inspect_of_a_folder_gives_a_line_per_checkpoint(tmp_path):
    demo = copy_demo(tmp_path)
    ckptfmt.convert(demo / "multitask_joint/best_model.pth")
    result = run_cli("inspect", demo)
    lines = result.stdout.splitlines()
    assert len(lines) == 6
    (converted,) = [line for line in lines if line.startswith(f"{demo}/multitask_joint/best_model.safetensors ")]
    assert converted.startswith(f"{demo}/multitask_joint/best_model.safetensors  ckptfmt  multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1)  30,901 params")
    assert converted.endswith("sidecar: consistent")
    assert f"{demo}/multitask_seg_warmup/best_model.pth  legacy  multitask(base_filters=4, cls_num_classes=2, depth=3, in_channels=1, seg_out_channels=1) (inferred)  30,901 params  150.7 KB  sidecar: missing" in lines


def test_inspect_answers_from_the_header_only(tmp_path, monkeypatch):
    """A 1 GB file costs what a 1 KB file costs: no tensor byte is read."""
    import os

    path, _, _ = save_small(tmp_path)
    header_size = read_header(path).data_offset
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append((n, offset)) or real_pread(fd, n, offset))
    inspect_checkpoint(path)
    assert reads and all(offset + n <= header_size for n, offset in reads)


def test_verify_passes_an_intact_file_and_reports_speed(tmp_path):
    path, _, _ = save_small(tmp_path)
    result = run_cli("verify", path)
    assert result.returncode == 0
    assert result.stdout.startswith(f"[OK]   {path}: header, config, shapes, sidecar, digest (digest read ")
    report = json.loads(run_cli("verify", path, "--json").stdout)[0]
    assert report["ok"] and report["bytes_hashed"] > 0


def test_verify_detects_a_flipped_byte(tmp_path):
    path, _, _ = save_small(tmp_path)
    flip_byte(path, 100)
    result = run_cli("verify", path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"[FAIL] {path}: weights digest mismatch: the tensor data was changed or corrupted")


def test_verify_detects_an_edited_sidecar(tmp_path):
    path, _, _ = save_small(tmp_path)
    sidecar = tmp_path / "model_config.json"
    document = json.loads(sidecar.read_text())
    document["base_filters"] = 8
    sidecar.write_text(json.dumps(document))
    result = run_cli("verify", path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"[FAIL] {path}: sidecar disagrees with the embedded config: base_filters: 4 != 8"


def test_verify_detects_a_config_that_does_not_match_its_tensors(tmp_path):
    model, _ = small_model(base_filters=4)
    wrong = ModelConfig(base_filters=8, depth=2)
    path = tmp_path / "wrong.safetensors"
    write_safetensors(path, model.state_dict(), build_metadata(wrong, training={}, provenance={}))
    result = run_cli("verify", path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(
        f"[FAIL] {path}: config does not match the tensors: base_filters=8 expects enc.0.0.weight [8, 1, 3, 3]; the file has [4, 1, 3, 3]"
    )


def test_verify_detects_a_crash_between_weights_and_sidecar(tmp_path):
    """New weights renamed into place, old sidecar still there: the binding tells."""
    path, _, config = save_small(tmp_path)
    old_sidecar = (tmp_path / "model_config.json").read_bytes()
    other, _ = small_model(seed=9)
    ckptfmt.save_model_with_config(other, path, config, overwrite=True)
    (tmp_path / "model_config.json").write_bytes(old_sidecar)
    report = verify(path)
    assert not report.ok
    assert report.failures[0].startswith(f"{path}: sidecar is bound to other weights")


def test_verify_of_several_files_lists_each_failure(tmp_path):
    good, _, _ = save_small(tmp_path / "a")
    bad, _, _ = save_small(tmp_path / "b")
    flip_byte(bad, 50)
    result = run_cli("verify", str(good), str(bad))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"[OK]   {good}")
    (failure,) = result.stderr.splitlines()
    assert failure.startswith(f"[FAIL] {bad}: weights digest mismatch: the tensor data was changed or corrupted")
    assert "Traceback" not in result.stderr


def test_diff_across_pth_and_safetensors(tmp_path):
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    converted = ckptfmt.convert(tmp_path / "m.pth").output
    same = run_cli("diff", tmp_path / "m.pth", converted)
    assert same.returncode == 0
    assert same.stdout.strip().endswith("common tensors identical; the checkpoints are identical")

    changed = {k: v.clone() for k, v in model.state_dict().items()}
    changed["cls_head.bias"] += 0.25
    del changed["seg_head.bias"]
    changed["extra.weight"] = torch.zeros(2)
    changed["cls_head.weight"] = changed["cls_head.weight"].double()
    torch.save(changed, tmp_path / "changed.pth")
    result = run_cli("diff", converted, tmp_path / "changed.pth", "--values")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "only in A   seg_head.bias" in lines
    assert "only in B   extra.weight" in lines
    assert "dtype       cls_head.weight: F32 -> F64 (max abs diff 0)" in lines
    assert "differs     cls_head.bias (max abs diff 0.25)" in lines
    assert lines[-1] == "65 of 67 common tensors identical; the checkpoints differ in: weights"


def test_diff_reports_config_differences(tmp_path):
    a, _, _ = save_small(tmp_path / "a")
    model, config = small_model()
    b = ckptfmt.save_model_with_config(model, tmp_path / "b/best_model.safetensors", config.replace(description="v2"))
    assert diff(a, b)["config"] == ["description: '' != 'v2'"]


def test_diff_compares_everything_not_only_the_weights(tmp_path):
    """Regression: diff best_model last_model said "identical" though their training records
    differed."""
    model, config = small_model()
    a = ckptfmt.save_model_with_config(model, tmp_path / "best_model.safetensors", config, epoch=3, metrics={"dice": 0.9})
    b = ckptfmt.save_model_with_config(model, tmp_path / "last_model.safetensors", config, epoch=5, metrics={"dice": 0.8})
    result = run_cli("diff", a, b)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[:2] == ["training    epoch: 3 != 5", "training    metrics.dice: 0.9 != 0.8"]
    assert lines[-1].endswith("common tensors identical; the checkpoints differ in: training record")


def test_diff_of_fp32_against_fp16_compares_the_common_tensors(tmp_path):
    """Regression: fp32 against fp16 gave "0 of 0 common tensors identical"."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    full = ckptfmt.convert(tmp_path / "m.pth", output=tmp_path / "full.safetensors").output
    half = ckptfmt.convert(tmp_path / "m.pth", output=tmp_path / "half/half.safetensors", dtype="fp16").output
    result = diff(full, half, values=True)
    floats = [t for t in result["tensors"] if "dtype" in t]
    assert floats and all(t["dtype"] == ["F32", "F16"] and t["max_abs_diff"] < 1e-3 for t in floats)
    assert len(result["tensors"]) == len(model.state_dict())
    assert result["differs_in"] == ["provenance", "weights"]
    assert "cast.to: (not set) != 'F16'" in result["provenance"]


@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "diff", "predict"])
def test_every_command_has_help_with_an_example(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "Example:" in result.stdout and f"ckptfmt {command} " in result.stdout


@pytest.mark.subprocess  # Its own process: only a fresh one shows what the command imports.
def test_help_does_not_import_torch():
    from .helpers import run

    code = "import sys\nfrom ckptfmt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = run("-c", code)
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "{tmp}/garbage.safetensors"], "Error: {tmp}/garbage.safetensors: declares a "),
        (["verify", "{tmp}/missing.safetensors"], "Error: Invalid value for 'PATHS...': Path '{tmp}/missing.safetensors' does not exist."),
        (["inspect", "{tmp}/garbage.pth"], "Error: {tmp}/garbage.pth: refused to unpickle"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04garbage")
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message.format(tmp=tmp_path))


def test_verify_reports_an_invalid_embedded_config_and_goes_on(tmp_path):
    """Regression: the sidecar check re-parsed the invalid config and raised out of verify."""
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata["ckptfmt.config"] = json.dumps({**config.to_dict(), "depth": 0})
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    ckptfmt.config.sidecar.write_sidecar(tmp_path, config, "m.safetensors", ckptfmt.read_header(path).weights_sha256)
    report = verify(path)
    assert [c["check"] for c in report.checks if not c["ok"]] == ["config"]
    assert report.failures == [f"{path}: invalid embedded config: depth must lie in 1..8, not 0"]


def test_verify_of_a_weights_only_file_says_so(tmp_path):
    torch.save({"fc.weight": torch.randn(3, 5)}, tmp_path / "w.pth")
    ckptfmt.convert(tmp_path / "w.pth")
    result = run_cli("verify", tmp_path / "w.safetensors")
    assert result.returncode == 0
    assert result.stdout.startswith(f"[OK]   {tmp_path / 'w.safetensors'}: weights only (no config); header, digest (digest read ")


def test_verify_of_a_folder_checks_every_file_with_a_summary(tmp_path):
    good, _, _ = save_small(tmp_path / "a")
    bad, _, _ = save_small(tmp_path / "b")
    flip_byte(bad, 50)
    result = run_cli("verify", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"[OK]   {good}: header, config, shapes, sidecar, digest (")
    assert lines[-1] == "1 verified, 1 failed"
    assert result.stderr.startswith(f"[FAIL] {bad}: weights digest mismatch")
    empty = run_cli("verify", str(tmp_path / "a" / ".."), "--json")
    assert len(json.loads(empty.stdout)) == 2


@pytest.mark.subprocess  # Its own process: how `ckptfmt` itself (cli.run) ends when the pipe it writes to closes.
def test_a_closed_stdout_ends_the_command_quietly(tmp_path):
    """Regression: `ckptfmt inspect X --tensors | head -1` printed `Error: Broken pipe`."""
    import subprocess
    import sys
    import threading

    path, _, _ = save_small(tmp_path, depth=4)
    for _ in range(5):
        process = subprocess.Popen([sys.executable, "-m", "ckptfmt", "inspect", str(path), "--tensors"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # readline() waits as long as the command does; read in a thread, the wait has an end.
            first: list[bytes] = []
            reader = threading.Thread(target=lambda: first.append(process.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout=60)
            assert first and first[0].startswith(b"file "), f"no first line within 60 s: {first}"
            process.stdout.close()
            assert process.wait(timeout=60) in (0, 1)
            assert process.stderr.read() == b""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.subprocess  # Its own processes: the cache shared between two of them, and what the second imports.
def test_a_second_verify_of_an_architecture_needs_no_torch(tmp_path, cache_folder):
    """What the architecture says of a config is remembered in the cache folder: the shape
    check of a later verify costs neither torch's import nor the architecture's."""
    from .helpers import run

    path, _, _ = save_small(tmp_path, base_filters=5, depth=3)  # a config no other test verifies
    code = (
        "import sys\n"
        "from ckptfmt.verifier import verify\n"
        "report = verify(sys.argv[1])\n"
        "print(report.ok, [c['check'] for c in report.checks], 'torch' in sys.modules)\n"
    )
    first = run("-c", code, str(path))
    assert first.stdout.split(" ", 1)[0] == "True" and first.stdout.strip().endswith("True"), first.stderr
    second = run("-c", code, str(path))
    assert second.stdout.strip() == "True ['header', 'config', 'shapes', 'sidecar', 'digest'] False", second.stderr
    assert list((cache_folder / "facts").glob("*.json"))
    # A file whose tensors do not fit is still caught, and blamed by the architecture itself.
    model, config = small_model(base_filters=8)
    wrong = tmp_path / "wrong" / "m.safetensors"
    write_safetensors(wrong, model.state_dict(), build_metadata(config.replace(base_filters=4), training={}, provenance={}))
    report = verify(wrong)
    assert report.failures[0].startswith(f"{wrong}: config does not match the tensors: base_filters=4 expects")


def test_an_unexpected_exception_is_one_line_too_and_its_traceback_is_there_on_request(demo_model, monkeypatch):
    """A bug (here, inspect raising what it never should) still ends the CLI in one line."""
    from ckptfmt import inspect as inspecting

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(inspecting, "inspect_checkpoint", broken)
    result = run_cli("inspect", demo_model)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: unexpected RuntimeError: boom (a bug: please report it, with the traceback that CKPTFMT_TRACEBACK=1 shows)"]
    monkeypatch.setenv("CKPTFMT_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        run_cli("inspect", demo_model)


def test_a_folder_inspected_again_is_answered_from_the_cache_and_stays_true(tmp_path, monkeypatch):
    """The second inspect of a folder reads no header; a file rewritten, a sidecar edited and a
    damaged cache are each seen; the rows are always those an uncached inspect gives."""
    from ckptfmt import inspect as inspecting

    monkeypatch.setenv("CKPTFMT_CACHE_DIR", str(tmp_path / "cache"))
    model, _ = small_model()
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        ckptfmt.save(model, runs / f"{name}/model.safetensors", description=f"run {name}")
    first = inspecting.inspect_folder(runs)

    def uncached() -> list:
        monkeypatch.setenv("CKPTFMT_CACHE_DIR", str(tmp_path / f"empty{len(list(tmp_path.iterdir()))}"))
        rows = inspecting.inspect_folder(runs)
        monkeypatch.setenv("CKPTFMT_CACHE_DIR", str(tmp_path / "cache"))
        return rows

    real_read_header = inspecting.read_header
    monkeypatch.setattr(inspecting, "read_header", lambda path: pytest.fail(f"read the header of {path}"))
    assert json.dumps(inspecting.inspect_folder(runs)) == json.dumps(first)
    monkeypatch.setattr(inspecting, "read_header", real_read_header)

    ckptfmt.save(model, runs / "a/model.safetensors", description="run a, again", overwrite=True)
    sidecar = runs / "b/model_config.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "weights": {}}))
    again = inspecting.inspect_folder(runs)
    assert [row["config"]["description"] for row in again] == ["run a, again", "run b"]
    assert [row["sidecar"]["status"] for row in again] == ["consistent", "unbound"]
    assert json.dumps(again) == json.dumps(uncached())
    for cache in (tmp_path / "cache/inspect").glob("*.json"):
        cache.write_text("{damaged")
    assert json.dumps(inspecting.inspect_folder(runs)) == json.dumps(again)


def test_verify_says_what_it_could_not_check_and_never_passes_on_nothing(tmp_path):
    """Regression: `verify DIR` of a folder with no checkpoint exited 0 ("0 verified"), so a typo
    passed CI; `verify README.md` called it a legacy pickle; a folder's summary line did not say
    that a file's shape check was skipped, and nothing could fail such a file."""
    (tmp_path / "empty").mkdir()
    nothing = run_cli("verify", tmp_path / "empty")
    assert (nothing.returncode, nothing.stderr.strip()) == (
        1, f"Error: {tmp_path / 'empty'}: no .safetensors files found; nothing was verified")
    (tmp_path / "notes.md").write_text("# notes\n")
    text = run_cli("verify", tmp_path / "notes.md")
    assert text.returncode == 1
    assert text.stderr.strip() == (f"[FAIL] {tmp_path / 'notes.md'}: is not a torch checkpoint: it starts with "
                                   "b'# no', neither a zip archive (torch >= 1.6) nor a pickle (older torch)")
    config = ModelConfig.from_dict({"model_type": "notinstalled", "width": 2})
    write_safetensors(tmp_path / "elsewhere.safetensors", {"w": torch.zeros(2)},
                      build_metadata(config, training={}, provenance={}))
    folder = run_cli("verify", tmp_path)
    assert folder.returncode == 0, folder.stderr
    assert folder.stdout.splitlines()[-1] == "1 verified, 0 failed; 1 without a shape check (architecture not installed here)"
    strict = run_cli("verify", tmp_path, "--strict")
    assert strict.returncode == 1
    assert f"[FAIL] {tmp_path / 'elsewhere.safetensors'}: its shape check was skipped (--strict)" in strict.stderr


def test_tensors_of_a_folder_is_refused_not_ignored(tmp_path):
    save_small(tmp_path)
    result = run_cli("inspect", tmp_path, "--tensors")
    assert result.returncode == 2
    assert "--tensors lists one checkpoint's tensors: give a checkpoint, not a folder" in result.stderr


def test_a_file_and_its_lossless_conversion_are_identical(tmp_path):
    """Regression: `diff x.pth x.safetensors` of x's own conversion always exited 1, because the
    training record gained the companion's binding; a conversion's own additions are shown for
    information, not as differences."""
    model, _ = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": 3},
               tmp_path / "x.pth")
    output = ckptfmt.convert(tmp_path / "x.pth").output
    result = run_cli("diff", tmp_path / "x.pth", output)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[0].startswith("provenance  one is the conversion of the other (x.pth, sha256 ")
    assert result.stdout.splitlines()[-1].endswith("common tensors identical; the checkpoints are identical")
    other = torch.optim.SGD(model.parameters(), lr=0.2)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": other.state_dict(), "epoch": 4},
               tmp_path / "y.pth")
    assert run_cli("diff", tmp_path / "y.pth", output).returncode == 1
