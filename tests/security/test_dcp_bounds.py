"""A torch.distributed.checkpoint folder's `.metadata` cannot make ckptfmt use more memory or time
than the folder's real bytes allow, nor drop a tensor: each crafted folder is refused by name,
as our error naming the folder's `.metadata`, by convert and inspect alike."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

import ckptfmt
from ckptfmt import LegacyCheckpointError
from ckptfmt.sources.dcp import read_dcp_state_dict

from ..helpers import run_cli, write_dcp_folder
from .crafted import edit_dcp_metadata, refusals_under_2_gb

DAMAGED = "; the folder is damaged or was crafted"


def _refusals(folder) -> list[str]:
    """What convert and inspect each say of `folder`; each must refuse it with our error."""
    said = []
    for use in (ckptfmt.convert, ckptfmt.inspect_checkpoint):
        with pytest.raises(LegacyCheckpointError) as excinfo:
            use(folder)
        said.append(str(excinfo.value))
    return said


def _refusals_under_2_gb(folder) -> list[str]:
    """`_refusals`, in a fresh process under a 2 GB address-space limit."""
    return refusals_under_2_gb(folder, "(ckptfmt.convert, ckptfmt.inspect_checkpoint)")


def _reuse_one_record(copies: int):
    """An edit that adds `copies` tensors, each the same entry and the same storage record as
    `w` (the pickle stores them once and refers to them after)."""

    def edit(metadata):
        entry = metadata.state_dict_metadata["w"]
        (index, info), = metadata.storage_data.items()
        for number in range(copies):
            metadata.state_dict_metadata[f"w{number}"] = entry
            metadata.storage_data[MetadataIndex(f"w{number}", index.offset)] = info
            metadata.planner_data[f"w{number}"] = (f"w{number}",)

    return edit


@pytest.mark.subprocess  # Its own process: the address-space limit (2 GB) is set for the whole process.
def test_storage_records_reused_to_amplify_are_refused_in_bounded_memory(tmp_path):
    """Regression: a 1.4 MB folder whose 1 MiB tensor's storage record is reused by 4,000
    entries made the reader allocate 4 GB (under a 2 GB limit, torch's allocator failed inside).
    No two records may share bytes: refused before anything is allocated."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(1 << 18)})
    edit_dcp_metadata(folder, _reuse_one_record(4000))
    assert sum(path.stat().st_size for path in folder.iterdir()) < 2 << 20
    message = (f"{folder / '.metadata'}: the chunk of 'w' at [0] and the chunk of 'w0' at [0] are stored in the same "
               f"bytes of __0_0.distcp (from byte 0); each stored item has bytes of its own{DAMAGED}")
    assert _refusals_under_2_gb(folder) == [message] * 2


@pytest.mark.subprocess  # Its own process: the address-space limit (2 GB) is set for the whole process.
def test_a_huge_list_index_in_a_key_path_is_refused_in_bounded_memory(tmp_path):
    """Regression: a key path `("model", 300000000)` in a folder of 2 KB made a list of 300
    million places (MemoryError under 2 GB). A list holds at most the places the folder's
    entries could fill."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3)})
    edit_dcp_metadata(folder, lambda metadata: metadata.planner_data.__setitem__("w", ("model", 300_000_000)))
    message = (f"{folder / '.metadata'}: the key paths index the list at model up to 300,000,000: more list places "
               f"than the folder's entries could fill{DAMAGED}")
    assert _refusals_under_2_gb(folder) == [message] * 2


def test_a_sparse_list_in_key_paths_still_reads(tmp_path):
    """What the bound on lists leaves alone: an optimizer state keyed by parameter number, with
    holes where a parameter has no state, reads back as DCP's own reader gives it."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3), "v": torch.zeros(2)})
    edit_dcp_metadata(folder, lambda metadata: metadata.planner_data.update(w=("state", 3, "w"), v=("state", 0, "v")))
    saved = read_dcp_state_dict(folder)
    assert [type(item).__name__ for item in saved["state"]] == ["dict", "NoneType", "NoneType", "dict"]
    assert torch.equal(saved["state"][3]["w"], torch.ones(3))


def test_one_long_key_path_shared_by_many_entries_is_refused_before_it_is_walked(tmp_path):
    """Regression: one key path of 100,000 steps, stored once and shared by 10,000 keys (a
    300 KB .metadata), made the reader walk 10^9 steps: it hung. A key path is no deeper than a
    checkpoint may nest, and its length is checked before its steps."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3)})
    steps = ("a",) * 100_000

    def share(metadata):
        metadata.planner_data.update({f"k{number}": steps for number in range(10_000)}, w=steps)

    edit_dcp_metadata(folder, share)
    message = (f"{folder / '.metadata'}: the key path of 'w' is 100,000 steps deep, deeper than the 64 levels a "
               f"checkpoint may nest{DAMAGED}")
    assert _refusals(folder) == [message] * 2


def test_a_key_path_100000_deep_is_refused_not_a_recursion_error(tmp_path):
    """Regression: a key path 100,000 names deep ended in RecursionError."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3)})
    edit_dcp_metadata(folder, lambda metadata: metadata.planner_data.__setitem__("w", tuple(f"k{n}" for n in range(100_000))))
    message = (f"{folder / '.metadata'}: the key path of 'w' is 100,000 steps deep, deeper than the 64 levels a "
               f"checkpoint may nest{DAMAGED}")
    assert _refusals(folder) == [message] * 2


def test_two_tensors_mapped_to_one_place_are_refused_not_one_dropped(tmp_path):
    """Regression: two stored tensors whose key paths were the same place: one was silently
    dropped and convert said [OK]. Refused naming both, with nothing written."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3), "v": torch.zeros(3)})
    edit_dcp_metadata(folder, lambda metadata: metadata.planner_data.__setitem__("v", metadata.planner_data["w"]))
    message = f"{folder / '.metadata'}: 'w' and 'v' are both mapped to w: one would be lost{DAMAGED}"
    assert _refusals(folder) == [message] * 2
    shown = run_cli("convert", folder)
    assert shown.returncode == 1
    assert shown.stderr.splitlines()[-1] == f"[FAIL] {folder}: {message}"
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_value_mapped_through_another_is_refused_naming_both(tmp_path):
    """A key path that runs through the place another tensor holds would put one inside the
    other, or drop it: refused naming both."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3), "v": torch.zeros(3)})
    edit_dcp_metadata(folder, lambda metadata: metadata.planner_data.__setitem__("v", ("w", "inner")))
    assert _refusals(folder) == [f"{folder / '.metadata'}: the key path of 'v' goes through the value of 'w'{DAMAGED}"] * 2


def test_a_stored_chunk_that_inflates_is_refused_before_torch_inflates_it(tmp_path):
    """A chunk's stored bytes are a torch.save zip: re-packed with deflate, 16 MB of zeros fit in
    16 KB of the folder, and torch.load would inflate them before the chunk's shape is checked.
    Refused from the zip directory, as a .pth's zip bomb is."""
    folder = write_dcp_folder(tmp_path / "dcp", {"w": torch.ones(3)})
    saved = io.BytesIO()
    torch.save(torch.zeros(1 << 22), saved)
    bomb = io.BytesIO()
    with zipfile.ZipFile(saved) as original, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as packed:
        for member in original.infolist():
            packed.writestr(member.filename, original.read(member))
    (folder / "__0_0.distcp").write_bytes(bomb.getvalue())

    def point_at_the_bomb(metadata):
        (info,) = metadata.storage_data.values()
        info.offset, info.length = 0, len(bomb.getvalue())

    edit_dcp_metadata(folder, point_at_the_bomb)
    (data,) = [member for member in zipfile.ZipFile(bomb).infolist() if "/data/" in member.filename]
    message = (f"{folder / '.metadata'}: the stored bytes of 'w': zip member {data.filename!r} would inflate from "
               f"{data.compress_size} to {1 << 24} bytes; refused as a zip bomb")
    assert _refusals(folder) == [message] * 2
