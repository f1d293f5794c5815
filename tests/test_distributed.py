"""Distributed models: FSDP2 on two ranks (CPU, gloo), each a fresh process, saving to one
self-describing checkpoint, loading back in slices, resuming.

The two ranks run once for the module (tests/distributed_ranks.py, with a timeout); the tests
check what they wrote.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import ModelConfig, read_header
from ckptfmt.models.multitask_unet import MultiTaskUNet
from ckptfmt.training import read_training_state

from .helpers import ROOT, state_dicts_bit_identical

WORLD = 2
TIMEOUT_S = 300


def run_ranks(work: Path) -> None:
    """Start one process per rank with the environment torchrun gives them, and wait for all,
    stopping the others as soon as one fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = []
    for rank in range(WORLD):
        log = open(work / f"rank{rank}.log", "w")
        ranks.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests/distributed_ranks.py"), str(work)], stdout=log, stderr=subprocess.STDOUT,
            env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=ROOT,
        ))
        log.close()
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
        logs = "\n".join(f"--- rank {rank} (exit {process.returncode}):\n{(work / f'rank{rank}.log').read_text()[-4000:]}"
                         for rank, process in enumerate(ranks))
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
    run_ranks(work)
    return work, [json.loads((work / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_a_two_rank_model_saves_to_one_self_describing_checkpoint(ranks):
    work, reports = ranks
    path = work / "first/model.safetensors"
    assert [report["saved"] for report in reports] == [str(path)] * WORLD
    assert ckptfmt.verify(path).ok  # digest, config against shapes, sidecar, optimizer companion
    header = read_header(path)
    assert ModelConfig.from_dict(header.config_dict()) == ModelConfig(
        "multitask", base_filters=4, depth=2, description="two ranks")
    assert header.training()["epoch"] == 3
    assert json.loads((work / "first/model_config.json").read_text())["weights"] == {path.name: header.weights_sha256}
    index = work / "first_sharded/model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    assert ckptfmt.verify(index).ok
    assert read_header(index).weights_sha256 == header.weights_sha256


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


def test_each_rank_reads_only_its_own_slices_and_holds_no_more(ranks):
    work, reports = ranks
    data = read_header(work / "big/model.safetensors").data_bytes
    for report in reports:
        load = report["big_load"]
        assert load["local_bytes"] < 0.55 * data  # its half of each tensor, and the (small) buffers whole
        assert load["read"] < load["local_bytes"] + 256 * 1024  # those bytes, and the header
        if load["peak_growth"] is not None:  # Linux lets a process restart its peak: it did
            assert load["peak_growth"] < 0.75 * data  # a full state dict would be 1x on top of the shards


def test_resuming_on_two_ranks_then_stepping_equals_never_stopping(ranks):
    work, reports = ranks
    assert all(report["record"]["epoch"] == 3 for report in reports)
    straight, resumed = work / "straight/model.safetensors", work / "resumed/model.safetensors"
    assert read_header(resumed).weights_sha256 == read_header(straight).weights_sha256
    companions = [path.with_name("model.optimizer.safetensors") for path in (straight, resumed)]
    assert state_dicts_bit_identical(*(load_file(companion) for companion in companions))
    sections = [read_training_state(companion) for companion in companions]
    assert sections[0]["optimizer"]["param_groups"] == sections[1]["optimizer"]["param_groups"]
    assert sorted(sections[0]["optimizer"]["state"]) == sorted(name for name, _ in MultiTaskUNet(4, 2).named_parameters())


def test_a_distributed_save_resumes_in_one_process_too(ranks):
    work, _ = ranks
    path = work / "first/model.safetensors"
    model = ckptfmt.load_model(path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert ckptfmt.load_training_state(path, optimizer)["epoch"] == 3
    assert all(float(state["step"]) == 3 for state in optimizer.state.values())


def test_errors_on_rank_0_are_raised_on_every_rank(ranks):
    work, reports = ranks
    assert [report["exists"] for report in reports] == [{
        "type": "OutputExistsError",
        "message": f"{work / 'straight/model.safetensors'}: already exists; pass overwrite=True to replace it",
    }] * WORLD
    assert [report["mismatch"] for report in reports] == [{
        "type": "ShapeMismatchError",
        "message": f"{work / 'big/model.safetensors'}: the model does not fit the file: it expects enc.0.0.weight "
                   "[32, 1, 3, 3]; the file has [64, 1, 3, 3], and 77 more",
    }] * WORLD
