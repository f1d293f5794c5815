"""Distributed models: FSDP2 on two ranks (CPU, gloo), each a fresh process, saving to one
self-describing checkpoint, loading back in slices, resuming; and DCP folders converted safely.

The two ranks run once for the module (tests/distributed_ranks.py, with a timeout); the tests
check what they wrote.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import LegacyCheckpointError, ModelConfig, UnsafePickleError, read_header
from ckptfmt.format.companion import read_training_state
from ckptfmt.format.digest import digest_file
from ckptfmt.format.writer import weights_digest
from ckptfmt.sources.dcp import read_dcp_metadata, read_dcp_state_dict

from .helpers import ROOT, flip_byte, run_cli, state_dicts_bit_identical, write_dcp_folder
from .security.crafted import edit_dcp_metadata

WORLD = 2
TIMEOUT_S = 300


def start_ranks(work: Path, *arguments: str) -> list[subprocess.Popen]:
    """Start one process per rank of tests/distributed_ranks.py with the environment torchrun gives
    them, each logging to WORK/rank{N}.log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = []
    for rank in range(WORLD):
        log = open(work / f"rank{rank}.log", "w")
        ranks.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests/distributed_ranks.py"), str(work), *arguments], stdout=log,
            stderr=subprocess.STDOUT, env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=ROOT,
        ))
        log.close()
    return ranks


def run_ranks(work: Path, *arguments: str) -> None:
    """Run the ranks and wait for all, stopping the others as soon as one fails."""
    ranks = start_ranks(work, *arguments)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(process.poll() is None for process in ranks):
            failed = [process for process in ranks if process.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    if any(process.returncode != 0 for process in ranks):
        logs = "\n".join(f"--- rank {rank} (exit {process.returncode}):\n"
                         f"{(work / f'rank{rank}.log').read_text()[-4000:]}" for rank, process in enumerate(ranks))
        pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s or failed:\n{logs}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """What two ranks did: trained, saved (one file, shards, a DCP folder), resumed, loaded a
    31 MB U-Net in slices; and what each rank reported."""
    work = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(1)
    big = MultiTaskUNet(base_filters=64, depth=3)
    ckptfmt.save(big, work / "big/model.safetensors")
    ckptfmt.save(big, work / "big_sharded/model.safetensors", max_shard_size="8MB")
    small = MultiTaskUNet(base_filters=4, depth=2)
    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-2, weight_decay=0.1)
    small(torch.randn(2, 1, 16, 16))[1].sum().backward()
    optimizer.step()
    ckptfmt.save(small, work / "single/model.safetensors", optimizer=optimizer)
    torch.save(small.state_dict(), work / "single/model.pth")
    damaged = ckptfmt.save(small, work / "damaged/model.safetensors")
    flip_byte(damaged, 3)
    run_ranks(work)
    return work, [json.loads((work / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_a_two_rank_model_saves_to_one_self_describing_checkpoint(ranks):
    work, reports = ranks
    path = work / "first/model.safetensors.index.json"
    assert [report["saved"] for report in reports] == [str(path)] * WORLD
    assert ckptfmt.verify(path).ok  # digest, config against shapes, sidecar, optimizer companion
    header = read_header(path)
    assert ModelConfig.from_dict(header.config_dict()) == ModelConfig(
        "multitask", base_filters=4, depth=2, description="two ranks")
    assert header.training()["epoch"] == 3
    assert header.training()["optimizer"]["file"] == "model.optimizer.safetensors.index.json"
    assert sorted(p.name for p in (work / "first").iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",  # one by each rank
        "model.optimizer-00001-of-00002.safetensors", "model.optimizer-00002-of-00002.safetensors",
        "model.optimizer.safetensors.index.json", "model.safetensors.index.json", "model_config.json",
    ]
    assert json.loads((work / "first/model_config.json").read_text())["weights"] == {path.name: header.weights_sha256}
    index = work / "first_sharded/model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    assert ckptfmt.verify(index).ok
    assert read_header(index).weights_sha256 == header.weights_sha256


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_the_digest_of_a_distributed_save_is_that_of_the_state_in_memory(ranks):
    """Put together on rank 0 from the digests each rank's writer computed: the same value as
    the state dict's digest in memory (first_full, gathered when saved) and as verify's pass."""
    work, _ = ranks
    path = work / "first/model.safetensors.index.json"
    in_memory = {name.removeprefix("model."): tensor for name, tensor in load_file(work / "first_full.safetensors").items()
                 if name.startswith("model.")}
    header = read_header(path)
    assert header.weights_sha256 == weights_digest(in_memory) == digest_file(header)


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_a_distributed_save_reloads_bit_identical_in_one_process_and_on_two_ranks(ranks):
    """The model and the optimizer as torch gathers them when saved (first_full) are what loading
    the checkpoint gives: in one process, and on two ranks (reloaded_full, gathered after
    `distributed.load_model` and `distributed.load_training_state`)."""
    work, _ = ranks
    path = work / "first/model.safetensors.index.json"
    reference = load_file(work / "first_full.safetensors")
    assert state_dicts_bit_identical(load_file(work / "reloaded_full.safetensors"), reference)
    model = ckptfmt.load_model(path).train()
    assert state_dicts_bit_identical({f"model.{k}": v for k, v in model.state_dict().items()},
                                     {k: v for k, v in reference.items() if k.startswith("model.")})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ckptfmt.load_training_state(path, optimizer)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    moments = {f"optimizer.{names[id(p)]}.{key}": value for p, state in optimizer.state.items() for key, value in state.items()}
    assert state_dicts_bit_identical(moments, {k: v for k, v in reference.items() if k.startswith("optimizer.")})


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_safetensors_and_huggingface_hub_read_a_distributed_save(ranks):
    from huggingface_hub import load_torch_model

    work, _ = ranks
    reference = {k.removeprefix("model."): v for k, v in load_file(work / "first_full.safetensors").items()
                 if k.startswith("model.")}
    index = json.loads((work / "first/model.safetensors.index.json").read_text())
    shards = {}
    for shard in sorted(set(index["weight_map"].values())):
        shards.update(load_file(work / "first" / shard))
    assert state_dicts_bit_identical(shards, reference)
    model = MultiTaskUNet(base_filters=4, depth=2)
    load_torch_model(model, work / "first", strict=True)
    assert state_dicts_bit_identical(model.state_dict(), reference)


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_replicated_buffers_that_differ_across_ranks_are_refused_naming_one(ranks):
    work, reports = ranks
    assert [report["disagree"] for report in reports] == [{
        "type": "ConfigError",
        "message": f"{work / 'disagree/model.safetensors.index.json'}: the replicated tensor 'enc.0.1.running_mean' of "
                   "the model holds other values on rank 1 than on rank 0; ranks that do not sync their buffers (FSDP2 "
                   "does not) must agree before saving: use SyncBatchNorm, or broadcast rank 0's (for b in "
                   "model.buffers(): dist.broadcast(b, src=0))",
    }] * WORLD
    assert not (work / "disagree").exists()


@pytest.mark.subprocess  # Ranks, one process each, as torchrun starts them.
def test_an_async_save_on_two_ranks_holds_the_state_at_the_call_while_training_goes_on(tmp_path):
    run_ranks(tmp_path, "--save-in-background")
    path = tmp_path / "background/model.safetensors.index.json"
    assert [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)] == [
        {"background": str(path)}] * WORLD
    assert ckptfmt.verify(path).ok
    at_call, trained_on = (tmp_path / f"{run}/model.safetensors.index.json" for run in ("at_call", "trained_on"))
    assert read_header(path).weights_sha256 == read_header(at_call).weights_sha256 != read_header(trained_on).weights_sha256
    companions = [p.with_name("model.optimizer.safetensors.index.json") for p in (path, at_call)]
    assert state_dicts_bit_identical(*(ckptfmt.read_state_dict(companion) for companion in companions))


@pytest.mark.subprocess  # A rank killed by SIGKILL in the middle of a save: only a real kill shows it.
def test_a_rank_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    """Regression guard: shards staged by the ranks take their names only at rank 0's commit, so a
    kill before it leaves every name of the previous set as it was, and it verifies."""
    ranks = start_ranks(tmp_path, "--save-until-killed")
    folder = tmp_path / "victim"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (tmp_path / "saved_once").exists() or not any(".ckptfmt-tmp-" in p.name for p in folder.iterdir()):
            assert time.monotonic() < deadline and all(rank.poll() is None for rank in ranks), (
                (tmp_path / "rank0.log").read_text()[-3000:])
            time.sleep(0.005)
        ranks[1].kill()  # in the middle of a later save: its staged shards exist
        ranks[1].wait()
        time.sleep(1)  # rank 0 goes on alone until it waits for rank 1
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    index = folder / "model.safetensors.index.json"
    report = ckptfmt.verify(index)
    assert report.ok, report
    assert ckptfmt.load_model(index).state_dict().keys() == MultiTaskUNet(64, 3).state_dict().keys()


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_it_loads_into_two_ranks_and_into_one_process_with_identical_outputs(ranks):
    work, reports = ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank computed, so that the sums add up in the same order
    try:
        model = ckptfmt.load_model(work / "big/model.safetensors")
        with torch.no_grad():
            seg, cls = model(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7)))
    finally:
        torch.set_num_threads(threads)
    # load_model from one file and from shards; load_into a model the user sharded along dim 1
    for loaded in ("big", "big_sharded", "own"):
        for rank in range(WORLD):
            outputs = load_file(work / f"{loaded}_rank{rank}.safetensors")
            assert torch.equal(outputs["seg"], seg) and torch.equal(outputs["cls"], cls), (loaded, rank)
    assert all(report["placements"] == ["(Shard(dim=0),)", "(Shard(dim=1),)"] for report in reports)
    # saved again from the dim-1 shards: the same weights
    assert read_header(work / "own_saved/model.safetensors.index.json").weights_sha256 == \
        read_header(work / "big/model.safetensors").weights_sha256


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_each_rank_reads_only_its_own_slices_and_holds_no_more(ranks):
    work, reports = ranks
    data = read_header(work / "big/model.safetensors").data_bytes
    for report in reports:
        load = report["big_load"]
        assert load["local_bytes"] < 0.55 * data  # its half of each tensor, and the (small) buffers whole
        assert load["read"] < load["local_bytes"] + 256 * 1024  # those bytes, and the header
        if load["peak_growth"] is not None:  # Linux lets a process restart its peak: it did
            assert load["peak_growth"] < 0.75 * data  # a full state dict would be 1x on top of the shards


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_resuming_on_two_ranks_then_stepping_equals_never_stopping(ranks):
    work, reports = ranks
    assert all(report["record"]["epoch"] == 3 for report in reports)
    straight, resumed = (work / f"{run}/model.safetensors.index.json" for run in ("straight", "resumed"))
    assert read_header(resumed).weights_sha256 == read_header(straight).weights_sha256
    companions = [path.with_name("model.optimizer.safetensors.index.json") for path in (straight, resumed)]
    assert state_dicts_bit_identical(*(ckptfmt.read_state_dict(companion) for companion in companions))
    sections = [read_training_state(companion) for companion in companions]
    assert sections[0]["optimizer"]["param_groups"] == sections[1]["optimizer"]["param_groups"]
    names = sorted(name for name, _ in MultiTaskUNet(4, 2).named_parameters())
    assert sorted(sections[0]["optimizer"]["state"]) == names


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_a_checkpoint_saved_by_one_process_resumes_on_two_ranks(ranks):
    work, _ = ranks
    saved = load_file(work / "single/model.optimizer.safetensors")  # keyed by position
    resumed = ckptfmt.read_state_dict(work / "single_resumed/model.optimizer.safetensors.index.json")  # keyed by name
    names = [name for name, _ in MultiTaskUNet(4, 2).named_parameters()]
    assert 0 < len(saved) < len(resumed) == 3 * len(names)  # only the classification path had gradients
    for position, name in enumerate(names):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            before = saved.get(f"optimizer.state.{position}.{key}")
            after = resumed[f"optimizer.state.{name}.{key}"]
            if before is not None:
                assert torch.equal(after, before), (name, key)
            elif key != "step":  # torch's set_optimizer_state_dict starts the others with zero moments
                assert not after.any(), (name, key)


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_a_distributed_save_resumes_in_one_process_too(ranks):
    work, _ = ranks
    path = work / "first/model.safetensors.index.json"
    model = ckptfmt.load_model(path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert ckptfmt.load_training_state(path, optimizer)["epoch"] == 3
    assert all(float(state["step"]) == 3 for state in optimizer.state.values())


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_errors_on_rank_0_are_raised_on_every_rank(ranks):
    work, reports = ranks
    assert [report["exists"] for report in reports] == [{
        "type": "OutputExistsError",
        "message": f"{work / 'straight/model.safetensors.index.json'}: already exists; pass overwrite=True to replace it",
    }] * WORLD
    assert [report["mismatch"] for report in reports] == [{
        "type": "ShapeMismatchError",
        "message": f"{work / 'big/model.safetensors'}: the model does not fit the file: it expects enc.0.0.weight "
                   "[32, 1, 3, 3]; the file has [64, 1, 3, 3], and 77 more; build the model the file was saved from "
                   "(ckptfmt.distributed.load_model builds it from the file's config)",
    }] * WORLD
    assert [report["legacy"] for report in reports] == [{
        "type": "LegacyCheckpointError",
        "message": f"{work / 'single/model.pth'}: is a legacy checkpoint, which cannot be read in slices; convert it "
                   "first (`ckptfmt convert`), then load the .safetensors it gives",
    }] * WORLD


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_a_rank_that_cannot_write_fails_the_save_on_every_rank_and_leaves_the_previous_checkpoint(ranks):
    work, reports = ranks
    folder = work / "limited"
    assert [report["limited"] for report in reports] == [{
        "type": "WriteError",
        "message": f"{folder / 'model-00002-of-00002.safetensors'}: writing failed: the file is larger than this "
                   "process may write (its file-size limit); raise the limit (ulimit -f) and retry. Any previous file "
                   "there is intact",
    }] * WORLD
    # Its own shards written, its rows of another rank's shard refused: the same, naming that shard.
    assert [report["limited_rows"] for report in reports] == [{
        "type": "WriteError",
        "message": f"{folder / 'model-00002-of-00009.safetensors'}: writing failed: the file is larger than this "
                   "process may write (its file-size limit); raise the limit (ulimit -f) and retry. Any previous file "
                   "there is intact",
    }] * WORLD
    index = folder / "model.safetensors.index.json"
    assert ckptfmt.verify(index).ok
    assert read_header(index).weights_sha256 == read_header(work / "straight/model.safetensors.index.json").weights_sha256
    assert sorted(p.name for p in folder.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "model_config.json",
    ]


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_verify_divides_the_tensor_checks_among_the_ranks(ranks):
    """load_model(verify=True): each tensor is checked against its own digest by one rank, so a
    rank reads about half the file to check it (not all of it) besides its own slices; a
    damaged tensor fails every rank, named."""
    work, reports = ranks
    data = read_header(work / "big_sharded/model.safetensors.index.json").data_bytes
    assert all(report["verified_read"] < 1.1 * data for report in reports), [r["verified_read"] for r in reports]
    path = work / "damaged/model.safetensors"
    damaged = max(read_header(path).tensors.values(), key=lambda info: info.end).name
    assert [report["damaged"] for report in reports] == [{
        "type": "IntegrityError",
        "message": f"{path}: tensor '{damaged}' was changed or corrupted: its bytes do not match its digest in the "
                   "header; restore the file from a good copy",
    }] * WORLD


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_a_dcp_folder_from_two_ranks_reads_back_whole(ranks):
    work, _ = ranks
    saved = read_dcp_state_dict(work / "dcp")
    assert sorted(saved) == ["extra", "model", "optim"]
    assert state_dicts_bit_identical(saved["model"], ckptfmt.read_state_dict(work / "first/model.safetensors.index.json"))
    assert saved["extra"] == {"epoch": 3, "note": "two ranks"}
    assert saved["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert sorted(saved["optim"]["state"]) == sorted(name for name, _ in MultiTaskUNet(4, 2).named_parameters())


@pytest.mark.subprocess  # Its module's ranks: one process each, as torchrun starts them.
def test_a_dcp_folder_converts_to_a_checkpoint(ranks, tmp_path):
    work, _ = ranks
    result = ckptfmt.convert(work / "dcp", output=tmp_path / "from_dcp.safetensors")
    assert result.status == "converted" and result.config_source == "inferred"
    assert result.carried == {"weights": ["model"], "companion": ["optim"], "training": ["extra"]}
    converted = ckptfmt.load_model(result.output)
    assert state_dicts_bit_identical(converted.state_dict(), ckptfmt.load_model(work / "first").state_dict())
    provenance = read_header(result.output).provenance()["source"]
    assert provenance["file"] == "dcp" and provenance["serialization"] == "torch.distributed.checkpoint"
    assert read_header(result.output).training()["extra"] == {"extra": {"epoch": 3, "note": "two ranks"}}
    optimizer = torch.optim.AdamW(converted.train().parameters(), lr=1e-2, weight_decay=0.1)
    ckptfmt.load_training_state(result.output, optimizer)
    assert all(float(state["step"]) == 3 for state in optimizer.state.values())
    shown = run_cli("convert", str(work / "dcp"), "-o", str(tmp_path / "cli"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"[OK]   {work / 'dcp'} -> {tmp_path / 'cli/dcp.safetensors'}  multitask(")


@pytest.fixture
def evil_marker(tmp_path):
    marker = tmp_path / "payload_ran"
    yield marker
    assert not marker.exists(), "the payload ran"


class Payload:
    """Unpickled, it would run a shell command; nothing here may ever unpickle it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_dcp_metadata_runs_nothing(tmp_path, evil_marker):
    """Regression: torch's FileSystemReader.read_metadata unpickles .metadata with plain
    pickle.load, which runs the payload."""
    folder = write_dcp_folder(tmp_path / "evil", {"w": torch.ones(3)})
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(evil_marker)))
    with pytest.raises(UnsafePickleError) as excinfo:
        read_dcp_metadata(folder)
    assert str(excinfo.value) == (
        f"{folder / '.metadata'}: needs the global posix.system, which a DCP .metadata never holds (only DCP's "
        "metadata classes, torch.Size, dtypes and paths); refused without running it. The folder was crafted or "
        "damaged; re-save it with torch.distributed.checkpoint"
    )
    result = ckptfmt.convert_all([folder])
    assert [r.status for r in result] == ["failed"] and "needs the global posix.system" in result[0].error


def test_a_malicious_value_in_a_dcp_folder_runs_nothing(tmp_path, evil_marker):
    """Regression: torch's DefaultLoadPlanner and dcp_to_torch_save torch.load non-tensor values
    with weights_only=False, which runs the payload."""
    folder = write_dcp_folder(tmp_path / "evil_value", {"w": torch.ones(3), "note": Payload(evil_marker)})
    with pytest.raises(UnsafePickleError, match=r"value 'note' is a pickle that torch's weights-only loader refuses"):
        read_dcp_state_dict(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda md: [setattr(info, "relative_path", "../elsewhere/__0_0.distcp") for info in md.storage_data.values()],
     "the file of 'w' must be a plain file name in the checkpoint's folder, not '../elsewhere/__0_0.distcp'; the "
     "file is damaged or was crafted to read elsewhere"),
    (lambda md: [setattr(info, "relative_path", "/etc/passwd") for info in md.storage_data.values()],
     "the file of 'w' must be a plain file name in the checkpoint's folder, not '/etc/passwd'"),
    (lambda md: [setattr(info, "length", 10**9) for info in md.storage_data.values()],
     "'w' is stored at bytes"),
    (lambda md: setattr(md.state_dict_metadata["w"], "size", torch.Size([10**9])),
     "the chunks of 'w' do not cover it exactly once; the folder is damaged or was crafted"),
], ids=["path traversal", "absolute path", "bytes outside the file", "size larger than its chunks"])
def test_a_dcp_metadata_that_reads_outside_its_folder_or_its_bytes_is_refused(tmp_path, edit, message):
    (tmp_path / "elsewhere").mkdir()
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3)})
    (tmp_path / "elsewhere/__0_0.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    edit_dcp_metadata(folder, edit)
    with pytest.raises(LegacyCheckpointError) as excinfo:
        read_dcp_state_dict(folder)
    assert message in str(excinfo.value) and str(excinfo.value).startswith(f"{folder / '.metadata'}: ")


def test_a_dcp_data_file_that_links_out_of_its_folder_is_not_followed(tmp_path):
    """A plain name in .metadata can still be a link to ../elsewhere: refused as a traversal is."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3)})
    (tmp_path / "elsewhere").mkdir()
    data = next(folder.glob("*.distcp"))
    data.rename(tmp_path / "elsewhere" / data.name)
    data.symlink_to(tmp_path / "elsewhere" / data.name)
    with pytest.raises(LegacyCheckpointError) as excinfo:
        read_dcp_state_dict(folder)
    assert str(excinfo.value).startswith(f"{folder / '.metadata'}: ")
    assert "a link that leads outside the checkpoint's folder" in str(excinfo.value)


def test_a_dcp_value_that_multiplies_a_string_is_refused_before_it_is_used(tmp_path):
    """The bounds of a legacy file's object graph hold for each value of a DCP folder too."""
    text = "x" * (1 << 20)
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3), "notes": [text] * 100})
    with pytest.raises(LegacyCheckpointError, match="holds more than 64 MiB of strings and bytes"):
        read_dcp_state_dict(folder)
