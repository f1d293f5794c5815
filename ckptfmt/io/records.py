"""Commit records: what a commit killed past its commit point leaves, and how whoever next reads
or writes the checkpoint finishes it (rolls it forward); and the cleaning of a folder's
leftovers. A record's format and its guarantees are in `transaction`'s docstring.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

from ..errors import WriteError
from .files import check_plain_name
from .folder import (
    TMP_MARK,
    fsync_folder,
    hidden_name,
    is_temp,
    left_by_dead_process,
    note_folder,
    seen_unchanged,
    write_reason,
)

__all__ = ["RECORD_FORMAT", "RECORD_MARK", "REMOVABLE_SUFFIX", "adopted_temps", "clean_folder", "finish_pending",
           "finish_record", "record_path", "recover"]

RECORD_MARK = ".ckptfmt-commit"
RECORD_FORMAT = "ckptfmt-commit-1"
REMOVABLE_SUFFIX = ".safetensors"
_RECORD_LIMIT = 64 << 20  # some 100,000 renames of long names: a predictions run with its masks


def record_path(path: Path) -> Path:
    """The commit record of the checkpoint whose main file is `path`.

    Example:
        >>> record_path(Path("runs/m.safetensors"))
        PosixPath('runs/.m.safetensors.ckptfmt-commit')
    """
    return path.with_name(hidden_name(path.name, RECORD_MARK))


def finish_pending(path: Path) -> None:
    """For a reader about to open the checkpoint `path`: finish the commit that a killed writer
    left of it, if any (one `lstat` when there is none), waiting for one under way.

    Raises:
        WriteError: naming the record, when it cannot be finished from here (a read-only
            folder, another user's files).
    """
    record = record_path(Path(path))
    try:
        os.lstat(record)
    except OSError:
        return
    finish_record(record)


def recover(folder: Path) -> None:
    """Finish (roll forward) each commit record that a killed commit left in `folder`, and remove
    the temp files of ours whose process is gone. Safe to call often and concurrently.

    Example:
        >>> recover(Path("runs"))
    """
    clean_folder(Path(folder), force=True)


def finish_record(record: Path) -> None:
    """Roll forward the commit whose record this is, holding its lock; nothing when it is gone."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _unfinished(record, exc.strerror or str(exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a commit under way holds it: wait for it to end
        status = os.fstat(fd)
        if status.st_nlink == 0:
            return  # finished while we waited
        if not stat.S_ISREG(status.st_mode) or status.st_size > _RECORD_LIMIT:
            raise _unfinished(record, "it is not a commit record ckptfmt wrote")
        renames, removals, records = _read_record(os.pread(fd, status.st_size, 0), record)
        folder = record.parent
        try:
            for temp, final in renames:
                try:
                    os.replace(folder / temp, folder / final)
                except FileNotFoundError:
                    pass  # renamed by the commit that wrote the record
            for name in removals:
                (folder / name).unlink(missing_ok=True)
            fsync_folder(folder)
            for name in records:
                (folder / name).unlink(missing_ok=True)
        except OSError as exc:
            raise _unfinished(record, write_reason(exc, Path(os.path.abspath(record))).split(";")[0]) from None
    finally:
        os.close(fd)


def _unfinished(record: Path, why: str) -> WriteError:
    return WriteError(
        f"a commit of this checkpoint was interrupted (its record {record.name} is left), and this process cannot "
        f"finish it ({why})",
        path=record,
        fix="run any ckptfmt command on the checkpoint as a user who may write to its folder, which finishes it; "
            "until then its files are those of the previous save or of the new one",
    )


def _read_record(data: bytes, record: Path) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """The renames, removals and record names a record lists, each a plain name of its folder,
    each temp file the temp of its own final name and each record name that of a final name (so
    a crafted record renames and removes nothing else)."""
    try:
        document = json.loads(data)
        if document.get("format") != RECORD_FORMAT:
            raise ValueError
        renames = [(str(temp), str(final)) for temp, final in document["renames"]]
        removals = [str(name) for name in document["removals"]]
        records = [str(name) for name in document.get("records", [record.name])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _unfinished(record, "it is not a commit record ckptfmt wrote") from None
    for name in (*(n for pair in renames for n in pair), *removals, *records):
        check_plain_name(name, key="a name in the commit record", path=record, error=WriteError)
    for temp, final in renames:
        if not is_temp(temp) or temp != hidden_name(final, temp[temp.rindex(TMP_MARK):]):
            raise _unfinished(record, f"{temp!r} is not a temp file of {final!r}")
    for name in removals:
        if not name.endswith(REMOVABLE_SUFFIX):
            raise _unfinished(record, f"it removes {name!r}, which is not a {REMOVABLE_SUFFIX} file")
    finals = {hidden_name(final, RECORD_MARK) for _, final in renames}
    if record.name not in records or any(name not in finals and name != record.name for name in records):
        raise _unfinished(record, "its record names are not those of the files it renames")
    return renames, removals, records


# Temp files that a transaction of this process adopted from another process (a rank that may
# have exited, or run on another host, where its process id means nothing here): not leftovers.
adopted_temps: set[Path] = set()


def clean_folder(folder: Path, *, force: bool = False) -> None:
    """Finish the commits that killed writers left in `folder`, then remove the temp files of
    ours whose process, on this host, is gone (another host's are left alone: their process ids
    mean nothing here); nothing to do (one stat) when the folder did not change since
    this process last cleaned or wrote it, unless `force`."""
    if not force and seen_unchanged(folder):
        return
    try:
        names = os.listdir(folder)
    except OSError:
        return
    unfinished = False
    for name in names:
        if name.startswith(".") and name.endswith(RECORD_MARK):
            try:
                finish_record(folder / name)
            except WriteError:
                unfinished = True  # its temps are the new set: kept for whoever can finish it
    if not unfinished:
        for name in names:
            if left_by_dead_process(name) and folder / name not in adopted_temps:
                try:
                    (folder / name).unlink()
                except OSError:
                    pass
    note_folder(folder)
