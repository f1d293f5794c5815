"""Atomic writes: a file appears whole under its name, or not at all.

Every output goes to a temp file in the same folder (so the final rename never crosses a file
system), is flushed and fsynced, then takes its name: by `os.link` when nothing may be
overwritten (which fails, atomically, if the name was taken meanwhile), by `os.replace` when
overwriting was asked for. The folder is fsynced after the rename. On any failure the temp file
is removed; one left by a killed process has a recognisable name,
`.NAME.ckptfmt-tmp-PID-HOST-XXXX` (see `hidden_name` for names near the file-system limit), and
the next write into the same folder on the same host removes it once its process is gone.

This is the one-file case; the files of one checkpoint are committed together by
`transaction.Transaction`, which stages them with `write_temp` below.

Files are created with mode 0o666 and so follow the umask, as `open()` would.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OVERWRITE_FIX, OutputExistsError, WriteError
from .folder import fsync_folder, note_folder, temp_path, write_reason
from .records import clean_folder

__all__ = ["atomic_link", "atomic_write", "check_writable", "discard_temp", "name_temp", "write_all", "write_error",
           "write_temp"]

_WRITE_CHUNK = 64 << 20


def check_writable(path: Path, *, overwrite: bool) -> None:
    """Refuse early what the final rename would refuse: a symlink, a folder, an existing file;
    after finishing what killed writers left in the folder (`records.clean_folder`), so that
    the checks see the files as they are to be."""
    clean_folder(path.parent)
    if path.is_symlink():
        raise WriteError(
            f"is a symbolic link (to {os.readlink(path)}); ckptfmt does not write through links. "
            "Give the real path as the output, or remove the link",
            path=path,
        )
    if path.is_dir():
        raise WriteError("is a folder; give a file name as the output", path=path)
    if path.exists() and not path.is_file():
        raise WriteError(
            "is not a regular file (a FIFO, a device or a socket); ckptfmt writes only regular files "
            "and never through one of those. Give another output",
            path=path,
        )
    if path.exists() and not overwrite:
        raise OutputExistsError("already exists", path=path, fix=OVERWRITE_FIX)


@contextmanager
def write_temp(path: Path, *, overwrite: bool, durable: bool = True) -> Iterator[tuple[int, Path]]:
    """A temp file in `path`'s folder, for `path`: checked as `check_writable`, its folder made.
    Yields its
    descriptor and its path; on normal exit it is fsynced (unless not `durable`) and closed, and
    kept for the caller to name; on failure it is removed and an OSError becomes a WriteError."""
    check_writable(path, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path, "cannot create its folder") from None
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise write_error(exc, path, "cannot create a file in its folder") from None
    note_folder(path.parent)
    try:
        try:
            yield fd, tmp
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        error = discard_temp(tmp, exc, path)
        if error is exc:
            raise
        raise error from exc


def discard_temp(tmp: Path, exc: BaseException, path: Path) -> BaseException:
    """Remove a temp file that will not take its name; the exception to raise for `exc`: an
    OSError said as a WriteError about `path`, anything else as it is."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    note_folder(tmp.parent)
    if isinstance(exc, OSError) and not isinstance(exc, (WriteError, OutputExistsError)):
        return write_error(exc, path, "writing failed")
    return exc


@contextmanager
def atomic_write(
    path: str | os.PathLike, *, overwrite: bool = False, sync_folder: bool = True, durable: bool = True,
) -> Iterator[int]:
    """Write `path` atomically, creating its folder if needed; the body writes to the yielded
    file descriptor. With `sync_folder=False` the caller fsyncs the folder itself
    (`fsync_folder`), once for many files written into it. With `durable=False` nothing is
    fsynced: for a cache, which a crash may lose but never leaves half written.

    Example:
        >>> with atomic_write("model_config.json") as fd:
        ...     write_all(fd, b"{}")
    """
    path = Path(path)
    with write_temp(path, overwrite=overwrite, durable=durable) as (fd, tmp):
        yield fd
    try:
        name_temp(tmp, path, overwrite=overwrite)
    except BaseException as exc:
        error = discard_temp(tmp, exc, path)
        if error is exc:
            raise
        raise error from exc
    note_folder(path.parent)
    if sync_folder and durable:
        fsync_folder(path.parent)


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make `path` name the same file as `source` (a hard link), replacing what `path` named in
    one step: a reader sees the old file or the new one, never none. Where the file system has
    no hard links, `path` becomes a copy of `source`, written atomically.

    Example:
        >>> atomic_link("runs/step-00001200.safetensors", "runs/last_model.safetensors")
    """
    source, path = Path(source), Path(path)
    check_writable(path, overwrite=True)
    tmp = temp_path(path)
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise write_error(exc, path, "linking failed") from None
        with open(source, "rb") as copied, atomic_write(path, overwrite=True) as fd:
            while chunk := copied.read(_WRITE_CHUNK):
                write_all(fd, chunk)
        return
    try:
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise write_error(exc, path, "linking failed") from None
    fsync_folder(path.parent)


def write_all(fd: int, data) -> None:
    """Write a whole bytes-like object to `fd`, however many calls it takes."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:_WRITE_CHUNK])
        view = view[written:]


def name_temp(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Give a written temp file its name: replacing what is there only when `overwrite`."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError("already exists", path=path, fix=OVERWRITE_FIX) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        # A file system without hard links: fall back to a checked rename.
        if path.exists():
            raise OutputExistsError("already exists", path=path, fix=OVERWRITE_FIX) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def write_error(exc: OSError, path: Path, what: str) -> WriteError:
    """A write that failed before its commit point, which leaves the previous files untouched."""
    return WriteError(f"{what}: {write_reason(exc, path)}. Any previous file there is intact", path=path)
