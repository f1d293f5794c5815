"""Opening the files that a user or a checkpoint names, safely.

Only regular files are read: a FIFO or a device named like a checkpoint would block forever or
never end. The check is made on the opened descriptor (opened with O_NONBLOCK, so that opening a
FIFO does not itself block), which closes the race between looking and opening. Whole-file reads
have a size cap, so a sidecar that is a link to /dev/zero, or simply huge, is refused before it
is read.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointNotFoundError, CkptfmtError, InputError

__all__ = [
    "CACHE_ENV", "FolderWalk", "cache_folder", "check_plain_name", "file_in_folder", "files_sha256", "is_regular_file",
    "open_regular", "sha256_fd", "sha256_file", "read_capped", "unreadable_error", "walk_files",
]


CACHE_ENV = "CKPTFMT_CACHE_DIR"


def cache_folder() -> Path:
    """Where ckptfmt keeps what it can always work out again: `$CKPTFMT_CACHE_DIR`, else
    `$XDG_CACHE_HOME/ckptfmt`, else `~/.cache/ckptfmt`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckptfmt"


def open_regular(path: str | os.PathLike, *, error: type[CkptfmtError] = InputError) -> int:
    """An O_RDONLY descriptor of `path`, refused unless it is a regular file.

    Raises:
        CheckpointNotFoundError: nothing is there.
        `error`: a folder, a FIFO, a device or a socket, named as such.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise unreadable_error(path, exc, error=CheckpointNotFoundError) from None
        raise CheckpointNotFoundError("no such file", path=path) from None
    except IsADirectoryError:
        raise error("is a folder, not a file", path=path) from None
    except OSError as exc:  # permission denied, a link loop, ...: said by name, never as a bare OSError
        raise unreadable_error(path, exc, error=error) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"is {_kind(mode)}, not a regular file; refused (reading it could block or never end)", path=path)
    # Reads from here on must block as usual (O_NONBLOCK only kept the open from waiting).
    os.set_blocking(fd, True)
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def read_capped(path: str | os.PathLike, *, limit: int, what: str, error: type[CkptfmtError] = InputError) -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    fd = open_regular(path, error=error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"is {size:,} bytes, over the {limit:,}-byte limit for {what}", path=path)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"is over the {limit:,}-byte limit for {what}", path=path)
    return data


def is_regular_file(path: Path) -> bool:
    """True for a regular file (following a link), without opening it."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def check_plain_name(name: object, *, key: str, path: str | os.PathLike | None, error: type[CkptfmtError]) -> str:
    """A file name read from a header or a sidecar, refused unless it names a file in the same
    folder: no separator, no `..`, not absolute, not empty, no NUL.

    Example:
        >>> check_plain_name("best_model.optimizer.safetensors", key="optimizer.file", path=None, error=ValueError)
        'best_model.optimizer.safetensors'
    """
    if (
        not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
        or "\x00" in name or os.path.isabs(name)
    ):
        raise error(
            f"{key} must be a plain file name in the checkpoint's folder, not {name!r}; the file is "
            "damaged or was crafted to read elsewhere",
            path=path,
        )
    return name


def file_in_folder(
    folder: str | os.PathLike, name: object, *, key: str, path: str | os.PathLike | None, error: type[CkptfmtError],
) -> Path:
    """`folder / name`, for a file that a header or a sidecar names: every place that opens such a
    file gets it here. `name` must be a plain name (`check_plain_name`), and the file, links
    followed, must lie inside `folder` too: a plain name can still be a link to ../elsewhere. A
    link that stays inside the folder is fine.

    Raises:
        `error`, naming `key`: a name that is not plain, or that leads outside the folder.
    """
    name = check_plain_name(name, key=key, path=path, error=error)
    target = Path(folder) / name
    if not _inside(target, folder):
        raise error(
            f"{key} names {name!r}, a link that leads outside the checkpoint's folder; refused: a file that a "
            "checkpoint names must lie in its folder",
            path=path,
        )
    return target


def _inside(path: Path, root: str | os.PathLike) -> bool:
    """Whether `path`, every link on the way resolved, lies in `root` (resolved alike)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def unreadable_error(path: str | os.PathLike, exc: OSError, *, error: type[CkptfmtError] = InputError,
                     folder: bool = False) -> CkptfmtError:
    """`exc`, met opening or listing `path`, as our error naming `path`: permission denied, a link
    loop, a link to nothing; `folder` says that nothing in it was read.

    Example:
        >>> str(unreadable_error("runs/a.pth", PermissionError(errno.EACCES, "Permission denied")))
        'runs/a.pth: cannot be read: permission denied'
    """
    if exc.errno == errno.ELOOP:
        return error("is a link loop (following it leads back to itself); nothing was read", path=path)
    if exc.errno == errno.ENOENT:
        return error("is a link to nothing (what it names does not exist)", path=path)
    reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or str(exc)).lower()
    problem = f"is a folder that cannot be read: {reason}; nothing in it was read" if folder else f"cannot be read: {reason}"
    return error(problem, path=path)


@dataclass(frozen=True)
class FolderWalk:
    """What a walk found: `files`, sorted, and `unreadable`, one error (naming its path) for each
    thing under the folder that it could not enter or read. A command that walks a folder
    reports each of those as a failure: what it could not see, it cannot say is fine."""

    files: list[Path]
    unreadable: list[CkptfmtError]


def walk_files(root: str | os.PathLike, suffixes: tuple[str, ...]) -> FolderWalk:
    """The regular files under `root` whose names end in one of `suffixes`, and what could not
    be walked or read there (a folder without permission, a link loop, a link to nothing).

    A walk stays inside the folder it was given: links to folders are not followed, and a link
    to a file counts only when it resolves inside `root` (a link planted in a folder of
    downloads cannot make `convert` or `inspect` read /etc or someone else's files). What is not
    a regular file (a FIFO, a device) is passed over: reading it could block or never end.

    Example:
        >>> walk = walk_files("checkpoints", (".pth",))
        >>> walk.files[0], walk.unreadable
        (PosixPath('checkpoints/multitask_cls_head/best_model.pth'), [])
    """
    root = Path(root)
    found: list[Path] = []
    unreadable: list[CkptfmtError] = []

    def refuse_folder(exc: OSError) -> None:
        unreadable.append(unreadable_error(Path(exc.filename), exc, folder=True))

    # os.walk passes over a folder it cannot list unless told: `refuse_folder` hears of each.
    for folder, _, names in os.walk(root, onerror=refuse_folder, followlinks=False):
        for name in names:
            path = Path(folder) / name
            if not name.endswith(suffixes) or path.is_symlink() and not _inside(path, root):
                continue
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                unreadable.append(unreadable_error(path, exc))
                continue
            if stat.S_ISREG(mode):
                found.append(path)
    return FolderWalk(sorted(found), sorted(unreadable, key=lambda error: error.path))


def files_sha256(paths: list[Path], *, error: type[CkptfmtError] = InputError) -> str:
    """The source digest of a checkpoint made of several files (a DCP folder, an index and its
    shards), as provenance records it: SHA-256 over each file in the order given, as the JSON
    record `[name, size]`, a newline, and its bytes."""
    import hashlib
    import json

    sha = hashlib.sha256()
    for path in paths:
        fd = open_regular(path, error=error)
        try:
            sha.update(json.dumps([path.name, os.fstat(fd).st_size]).encode() + b"\n")
            _hash_into(sha, fd)
        finally:
            os.close(fd)
    return sha.hexdigest()


def sha256_file(path: str | os.PathLike, *, error: type[CkptfmtError] = InputError) -> str:
    """The SHA-256 of a regular file (a FIFO or a device is refused, not read)."""
    fd = open_regular(path, error=error)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def sha256_fd(fd: int) -> str:
    """The SHA-256 of an open file's bytes, read with pread (its offset left to whoever shares it)."""
    import hashlib

    sha = hashlib.sha256()
    _hash_into(sha, fd)
    return sha.hexdigest()


def _hash_into(sha, fd: int) -> None:
    """Feed an open file's bytes to `sha`, read with pread."""
    # No larger than the file: a bytearray is zero-filled, 8 MiB of it cost more than hashing a
    # small checkpoint, in a folder of many.
    buffer = memoryview(bytearray(min(8 << 20, max(os.fstat(fd).st_size, 1 << 16))))
    position = 0
    while got := os.preadv(fd, [buffer], position):
        sha.update(buffer[:got])
        position += got
