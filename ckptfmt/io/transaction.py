"""Transactions: the files of one checkpoint (weights or shards and index, companion, sidecar)
take their names together, or none of them does.

Each file is staged as `atomic_write` writes one (a temp file in the same folder, fsynced) but
not named. `commit` then writes the commit record, `.NAME.ckptfmt-commit` beside the main file:
a small JSON document listing each rename (temp -> final name) and each removal (stale shards
the new set does not name), written to a temp file, fsynced, and linked into place, the folder
fsynced. That link is the commit point. The renames follow (members first, the main file last),
then the removals, a folder fsync, and the record is deleted.

Why a kill or a full disk at any point leaves a complete set:
- before the record takes its name, no name of the previous set has changed: only temp files
  were written, which the next write in the folder removes once their process is gone;
- once it has, every new file is complete and fsynced, and the record says which name each
  takes, so finishing is a matter of renames that need no space: whoever next reads or writes
  the checkpoint rolls it forward (`finish_pending`, `recover`), and a reader that cannot write
  there says so, naming the record, rather than reading a mixed set.
A commit holds an exclusive `flock` on its record from before it is linked until it is
deleted, so a reader that finds the record of a commit under way waits for it rather than
finishing it twice; a killed writer's lock goes with its process.

A transaction of one file and no removal needs no record: its rename is atomic.

Several checkpoints of one folder may be committed as one (`commit_together`: a batch of
conversions, which then writes their shared sidecar once): one record, linked under the record
name of each checkpoint (hard links, so one lock), so that a reader of any of them finds it. The
first link is the commit point; should a further one fail, the record's names are removed before
anything is renamed, and every checkpoint's own transaction is still open, its temps kept, to be
committed alone.

Derived names stay within the file-system limit of 255 bytes: see `folder.hidden_name`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from ..errors import OutputExistsError, WriteError
from .atomic import check_writable, discard_temp, name_temp, write_all, write_error, write_temp
from .folder import fsync_folder, is_temp, note_folder, write_reason
from .records import (
    RECORD_FORMAT,
    RECORD_MARK,
    REMOVABLE_SUFFIX,
    adopted_temps,
    clean_folder,
    finish_pending,
    finish_record,
    record_path,
    recover,
)

# The recovery side (`records`) is part of this module's interface: a writer's caller finishes
# and cleans through the same names.
__all__ = ["RECORD_MARK", "Transaction", "clean_folder", "commit_together", "finish_pending", "finish_record",
           "record_path", "recover"]


class Transaction:
    """The files of one checkpoint, committed together (see the module's docstring).

    Args:
        folder: the checkpoint's folder; every file of the transaction is in it.
        name: the checkpoint's main file (the `.safetensors`, or the index of shards), whose
            commit record is a hidden file beside it.

    Example:
        >>> with Transaction(folder, "m.safetensors") as transaction:
        ...     with transaction.stage(folder / "m.safetensors", overwrite=True) as fd:
        ...         write_all(fd, data)
        ...     write_sidecar(folder, config, "m.safetensors", digest, transaction=transaction)
    """

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = Path(folder)
        self.name = name
        self._staged: list[tuple[Path, Path]] = []
        self._new: set[Path] = set()  # staged to take a name that nothing may hold (overwrite=False)
        self._removals: list[Path] = []
        self._ended = False
        self._aborted = False
        self._others: list[str] = []  # the main files of the checkpoints committed with this one
        self._kept: set[Path] = set()  # temps that an abort leaves to the transaction that staged them

    @property
    def staged(self) -> list[tuple[Path, Path]]:
        """(temp, final) pairs registered so far: what a rank sends to the rank that commits."""
        return list(self._staged)

    @property
    def open(self) -> bool:
        """Whether it is neither committed nor aborted."""
        return not self._ended

    @property
    def record(self) -> Path:
        return record_path(self.folder / self.name)

    def _records(self) -> list[Path]:
        """The record's names: this checkpoint's, then those of the others committed with it."""
        return [self.record, *(record_path(self.folder / name) for name in self._others)]

    @contextmanager
    def stage(self, path: Path, *, overwrite: bool, durable: bool = True) -> Iterator[int]:
        """Write a file of the set: checked and written as `atomic_write` does (yielding its file
        descriptor), fsynced, and registered to take its name at `commit`. With `durable=False`
        it is not fsynced here: the caller writes on and fsyncs it before the commit (the file
        a distributed save's ranks fill in, `distributed.shards`).

        Example:
            >>> with transaction.stage(folder / "m.safetensors", overwrite=False) as fd:
            ...     write_all(fd, data)
        """
        path = self._member(Path(path))
        with write_temp(path, overwrite=overwrite, durable=durable) as (fd, tmp):
            yield fd
        self._staged.append((tmp, path))
        if not overwrite:
            self._new.add(path)

    def adopt(self, temp: Path, path: Path, *, overwrite: bool) -> None:
        """Register a temp file that another process (another rank) wrote and fsynced in the
        folder, to take the name `path` at `commit`."""
        path, temp = self._member(Path(path)), Path(temp)
        if os.path.abspath(temp.parent) != os.path.abspath(self.folder) or not is_temp(temp.name):
            raise ValueError(f"{temp} is not a ckptfmt temp file in {self.folder}")
        check_writable(path, overwrite=overwrite)
        self._staged.append((temp, path))
        adopted_temps.add(temp)
        if not overwrite:
            self._new.add(path)

    def remove(self, path: Path) -> None:
        """Remove, after the commit, a file of the previous set that the new set replaces without
        naming it: a stale shard of the same checkpoint, so a `.safetensors` file (a record that
        removes anything else is not one ckptfmt wrote)."""
        path = Path(path)
        if not path.name.endswith(REMOVABLE_SUFFIX):
            raise ValueError(f"{path} is not a {REMOVABLE_SUFFIX} file; a transaction removes stale shards only")
        if os.path.abspath(path.parent) != os.path.abspath(self.folder):
            raise ValueError(f"{path} is not in the transaction's folder {self.folder}")
        if any(final == path for _, final in self._staged) or path in self._removals:
            raise ValueError(f"{path} is already part of this transaction")
        self._removals.append(path)

    def commit(self) -> None:
        """Give every staged file its name and remove the files to remove, all or none (see the
        module's docstring)."""
        self._end()
        if not self._staged and not self._removals:
            return
        if len(self._staged) + len(self._removals) == 1:
            self._commit_one()
            fsync_folder(self.folder)
        else:
            self._commit_with_record()
        adopted_temps.difference_update(temp for temp, _ in self._staged)
        note_folder(self.folder)

    def abort(self) -> None:
        """Remove the staged temp files; no name of the folder changes."""
        self._ended = self._aborted = True
        for temp, _ in self._staged:
            if temp not in self._kept:
                temp.unlink(missing_ok=True)
        adopted_temps.difference_update(temp for temp, _ in self._staged)
        note_folder(self.folder)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc is None:
            self.commit()
        elif not self._ended:
            self.abort()

    def _member(self, path: Path) -> Path:
        if self._ended:
            raise ValueError(f"the transaction of {self.name} is already committed or aborted")
        if os.path.abspath(path.parent) != os.path.abspath(self.folder):
            raise ValueError(f"{path} is not in the transaction's folder {self.folder}")
        if any(final == path for _, final in self._staged) or path in self._removals:
            raise ValueError(f"{path} is already part of this transaction")
        return path

    def _end(self) -> None:
        if self._ended:
            raise ValueError(f"the transaction of {self.name} is already committed or aborted")
        self._ended = True

    def _commit_one(self) -> None:
        if self._removals:
            self._removals[0].unlink(missing_ok=True)
            return
        temp, path = self._staged[0]
        try:
            name_temp(temp, path, overwrite=path not in self._new)
        except BaseException as exc:
            error = discard_temp(temp, exc, path)
            if error is exc:
                raise
            raise error from exc

    def _ordered(self) -> list[tuple[Path, Path]]:
        """Members first, the main file last: a reader that does not look for the record sees the
        main file of the new set only once the rest of it is there."""
        mains = {self.name, *self._others}
        return sorted(self._staged, key=lambda pair: pair[1].name in mains)

    def _commit_with_record(self) -> None:
        renames, main = self._ordered(), self.folder / self.name
        try:
            for _, path in renames:  # the early checks again, just before the commit point
                check_writable(path, overwrite=path not in self._new)
            lock = self._place_record(renames)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, WriteError) and exc.path == str(self.record):
                raise exc.at(main) from exc  # the record is ours, not a file the user knows
            if isinstance(exc, OSError) and not isinstance(exc, (WriteError, OutputExistsError)):
                raise write_error(exc, main, "writing failed") from exc
            raise
        try:
            done = 0
            try:
                for done, (temp, path) in enumerate(renames):
                    os.replace(temp, path)
                done = len(renames)
                for path in self._removals:
                    path.unlink(missing_ok=True)
            except BaseException as exc:
                self._stopped(exc, done, len(renames))
            fsync_folder(self.folder)
            for record in reversed(self._records()):  # this checkpoint's last: it is the one a writer finishes
                record.unlink(missing_ok=True)
        finally:
            os.close(lock)

    def _stopped(self, exc: BaseException, done: int, total: int) -> None:
        """A commit stopped past its commit point, by an error or an interrupt. Where no file had
        taken its name yet, it is undone whole; otherwise its record stays, for the next reader
        or writer to finish, and the error says so."""
        main = self.folder / self.name
        if done == 0:
            for record in self._records():
                record.unlink(missing_ok=True)
            self.abort()
            if isinstance(exc, OSError):
                raise write_error(exc, main, "writing failed") from exc
            raise exc
        if isinstance(exc, OSError):
            raise WriteError(
                f"committing stopped after {done} of {total} files took their names: "
                f"{write_reason(exc, main)}",
                path=main,
                fix=f"its commit record {self.record.name} lists the rest, and the next ckptfmt command that "
                    "reads or writes this checkpoint finishes it",
            ) from exc
        raise exc

    def _place_record(self, renames: list[tuple[Path, Path]]) -> int:
        """Write the record and link it into place, locked: the commit point. Returns the
        descriptor that holds the lock, to be closed once the record is deleted."""
        record = self.record
        document = {
            "format": RECORD_FORMAT,
            "renames": [[temp.name, path.name] for temp, path in renames],
            "removals": [path.name for path in self._removals],
            "records": [path.name for path in self._records()],
        }
        with write_temp(record, overwrite=True) as (fd, tmp):
            write_all(fd, (json.dumps(document, indent=1) + "\n").encode())
        lock = None
        try:
            lock = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                name_temp(tmp, record, overwrite=False)
            except OutputExistsError:  # a killed commit of the same checkpoint: finished first
                finish_record(record)
                name_temp(tmp, record, overwrite=False)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if lock is not None:
                os.close(lock)
            raise
        try:
            for other in self._records()[1:]:
                try:
                    os.link(record, other)
                except FileExistsError:  # a killed commit of that checkpoint: finished first
                    finish_record(other)
                    os.link(record, other)
        except BaseException:  # nothing renamed yet: the record goes, and with it the commit
            for name in self._records():
                name.unlink(missing_ok=True)
            os.close(lock)
            raise
        fsync_folder(self.folder)
        return lock


def commit_together(members: list[Transaction], shared: Transaction) -> None:
    """Commit the checkpoints of `members` (open transactions of one folder) and the files they
    share, staged in `shared` (the sidecar binding them all), as one transaction: one record, its
    name that of each checkpoint (see the module's docstring).

    Raises:
        What stopped it. If nothing had taken its name, `shared` is aborted and each member is
        still open, its temps kept, for the caller to commit (or abort) alone; otherwise each
        member is ended, and the record finishes the commit for the next reader or writer.

    Example:
        >>> commit_together([first, second], sidecar)
    """
    group = Transaction(members[0].folder, members[0].name)
    group._others = [member.name for member in members[1:]]
    for transaction in (*members, shared):
        if transaction.folder != group.folder:
            raise ValueError(f"{transaction.name} is not in {group.folder}")
        transaction._end()
        group._staged += transaction._staged
        group._new |= transaction._new
        group._removals += transaction._removals
    group._kept = {temp for member in members for temp, _ in member._staged}
    try:
        group.commit()
    except BaseException:
        if group._aborted:
            for member in members:
                member._ended = False
        raise
