"""Corrupt .pth files: always one of our errors, naming the file; never torch's, zipfile's or pickle's."""

from __future__ import annotations

import io
import random
import zipfile

import pytest

from ckptfmt import CkptfmtError, LegacyCheckpointError, convert
from ckptfmt.sources.legacy import read_legacy_checkpoint

from .crafted import assert_our_error


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    error = assert_our_error(tmp_path / "empty.pth")
    assert error.message == "is empty (0 bytes); it is not a checkpoint"


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, valid_files, kind, keep):
    data = valid_files[kind]
    (tmp_path / "cut.pth").write_bytes(data[: int(len(data) * keep)])
    assert_our_error(tmp_path / "cut.pth")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    (tmp_path / "noise.pth").write_bytes(random.Random(seed).randbytes(4096))
    assert_our_error(tmp_path / "noise.pth")


def test_storage_size_that_does_not_match_its_record(tmp_path, valid_files):
    source = zipfile.ZipFile(io.BytesIO(valid_files["zip"]))
    with zipfile.ZipFile(tmp_path / "short.pth", "w") as short:
        for info in source.infolist():
            data = source.read(info)
            short.writestr(info, data[: len(data) // 2] if info.filename == "zip/data/0" else data)
    error = assert_our_error(tmp_path / "short.pth")
    assert "record size" in error.message and "it is damaged, truncated or not a checkpoint" in error.message


def test_a_zip_that_is_not_a_torch_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert assert_our_error(tmp_path / "other.pth").message == "is a zip archive but not a torch checkpoint (it has no data.pkl)"


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@pytest.mark.parametrize("seed", range(12))
def test_byte_mutations_read_or_raise_ours(tmp_path, valid_files, kind, seed):
    """Mutated files either read (the flips hit tensor data) or raise our error."""
    rng = random.Random(seed)
    data = bytearray(valid_files[kind])
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    (tmp_path / "mutated.pth").write_bytes(bytes(data))
    try:
        read_legacy_checkpoint(tmp_path / "mutated.pth")
    except CkptfmtError as error:
        assert str(error).startswith(f"{tmp_path / 'mutated.pth'}: ")


def test_convert_of_a_corrupt_file_writes_nothing(tmp_path, valid_files):
    (tmp_path / "cut.pth").write_bytes(valid_files["zip"][:500])
    with pytest.raises(LegacyCheckpointError):
        convert(tmp_path / "cut.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pth"]


def test_a_file_that_is_neither_zip_nor_pickle(tmp_path):
    """A config JSON given where a checkpoint belongs is named for what it is not."""
    (tmp_path / "model_config.json").write_text('{"depth": 4}')
    error = assert_our_error(tmp_path / "model_config.json")
    assert error.message == (
        "is not a torch checkpoint: it starts with b'{\"de', neither a zip archive (torch >= 1.6) "
        "nor a pickle (older torch)"
    )
