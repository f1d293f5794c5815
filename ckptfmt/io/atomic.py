"""Atomic writes: a file appears whole under its name, or not at all.

Every output goes to a temp file in the same folder (so the final rename never crosses a file
system), is flushed and fsynced, then takes its name: by `os.link` when nothing may be
overwritten (which fails, atomically, if the name was taken meanwhile), by `os.replace` when
overwriting was asked for. The folder is fsynced after the rename. On any failure the temp file
is removed; one left by a killed process has a recognisable name, `.NAME.ckptfmt-tmp-PID-XXXX`,
and the next write to the same name removes it once its process is gone.

Files are created with mode 0o666 and so follow the umask, as `open()` would.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OVERWRITE_FIX, OutputExistsError, WriteError

__all__ = ["atomic_link", "atomic_write", "check_writable", "fsync_folder", "write_all"]

_TMP_MARK = ".ckptfmt-tmp-"
_WRITE_CHUNK = 64 << 20


def check_writable(path: Path, *, overwrite: bool) -> None:
    """Refuse early what the final rename would refuse: a symlink, a folder, an existing file."""
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
    check_writable(path, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, path, "cannot create its folder") from None
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise _write_error(exc, path, "cannot create a file in its folder") from None
    try:
        try:
            yield fd
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path, overwrite=overwrite)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, (WriteError, OutputExistsError)):
            raise _write_error(exc, path, "writing failed") from exc
        raise
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
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise _write_error(exc, path, "linking failed") from None
        with open(source, "rb") as copied, atomic_write(path, overwrite=True) as fd:
            while chunk := copied.read(_WRITE_CHUNK):
                write_all(fd, chunk)
        return
    try:
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise _write_error(exc, path, "linking failed") from None
    fsync_folder(path.parent)


def write_all(fd: int, data) -> None:
    """Write a whole bytes-like object to `fd`, however many calls it takes."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:_WRITE_CHUNK])
        view = view[written:]


def _commit(tmp: Path, path: Path, *, overwrite: bool) -> None:
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


# Folders whose stale temp files this process has removed: one listing per folder, not one per
# file written there (a folder of 2,000 checkpoints would cost 2,000 listings of 2,000 names).
_cleaned: set[Path] = set()


def _remove_stale_temps(path: Path) -> None:
    if path.parent in _cleaned:
        return
    _cleaned.add(path.parent)
    try:
        candidates = [p for p in path.parent.iterdir() if _TMP_MARK in p.name and p.name.startswith(".")]
    except OSError:
        return
    for candidate in candidates:
        pid = candidate.name.rsplit(_TMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                candidate.unlink()
            except OSError:
                pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_folder(folder: Path) -> None:
    """Make the names of files renamed into `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the file itself is already synced
    finally:
        os.close(fd)


def _write_error(exc: OSError, path: Path, what: str) -> WriteError:
    reasons = {
        errno.ENOSPC: "no space left on device; free some space and retry",
        errno.EDQUOT: "disk quota exceeded; free some space and retry",
        errno.EACCES: f"permission denied in {path.parent}; choose a writable output folder (-o)",
        errno.EPERM: f"permission denied in {path.parent}; choose a writable output folder (-o)",
        errno.EROFS: f"{path.parent} is on a read-only file system; choose another output folder (-o)",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    return WriteError(f"{what}: {reason}. Any previous file there is intact", path=path)
