"""A folder's own files: the hidden names ckptfmt gives its temp files and commit records (within
the file-system limit, tagged with their process and host), which of them a dead process left,
which folders this process has already looked at, folder fsync, and why a write failed there.
`atomic` and `records` both build on it."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

__all__ = ["HOST_TAG", "NAME_MAX", "TMP_MARK", "fsync_folder", "hidden_name", "is_temp", "left_by_dead_process",
           "name_fits", "note_folder", "seen_unchanged", "temp_path", "write_reason"]

NAME_MAX = 255  # bytes in one file name: ext4, xfs, btrfs, tmpfs, APFS and NTFS (in UTF-16 units) alike
TMP_MARK = ".ckptfmt-tmp-"
# In each temp file's name: on a file system shared by several hosts (the ranks of a distributed
# save on other nodes), a process id means something only on the host that wrote it, so only
# the temps of this host are ever judged by whether their process is alive.
# The host's name as the kernel has it (`os.uname`, where `socket.gethostname` would count as
# network use to an audit hook that forbids it, as sandboxes and the library tests do).
_HOST = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")
HOST_TAG = hashlib.sha256(_HOST.encode("utf-8", "surrogateescape")).hexdigest()[:8]



def name_fits(name: str) -> bool:
    """Whether a file name is within the file-system limit of `NAME_MAX` bytes."""
    return len(os.fsencode(name)) <= NAME_MAX


def hidden_name(name: str, suffix: str) -> str:
    """The hidden name `.NAME` + `suffix` that ckptfmt derives from a file's name (temp files, the
    commit record), kept within `NAME_MAX` bytes: where it would be longer, NAME is cut (at a
    character boundary) and followed by `~` and 16 hex digits of the sha256 of the whole name,
    so that two long names still derive two names.

    Example:
        >>> hidden_name("m.safetensors", ".ckptfmt-commit")
        '.m.safetensors.ckptfmt-commit'
    """
    full = f".{name}{suffix}"
    if name_fits(full):
        return full
    raw = os.fsencode(name)
    room = NAME_MAX - 1 - len(os.fsencode(suffix)) - 17
    while 0 < room < len(raw) and raw[room] & 0xC0 == 0x80:  # a UTF-8 character is not split
        room -= 1
    return f".{os.fsdecode(raw[:room])}~{hashlib.sha256(raw).hexdigest()[:16]}{suffix}"


def temp_path(path: Path) -> Path:
    """A new temp file's path for `path`, in its folder, naming this process and this host."""
    return path.with_name(hidden_name(path.name, f"{TMP_MARK}{os.getpid()}-{HOST_TAG}-{os.urandom(4).hex()}"))


def is_temp(name: str) -> bool:
    """Whether `name` is a temp file name of ours."""
    return _temp_owner(name) is not None


def left_by_dead_process(name: str) -> bool:
    """Whether `name` is a temp file of ours whose writer, on this host, is gone. A name without
    a host tag (`PID-XXXX`) is of a single-host writer, judged here."""
    owner = _temp_owner(name)
    return owner is not None and owner[1] in (None, HOST_TAG) and not _process_alive(owner[0])


def _temp_owner(name: str) -> tuple[int, str | None] | None:
    """The process id and host tag in a temp file name of ours; None for another name."""
    if not name.startswith(".") or TMP_MARK not in name:
        return None
    fields = name.rsplit(TMP_MARK, 1)[1].split("-")
    if len(fields) not in (2, 3) or not fields[0].isdigit():
        return None
    return int(fields[0]), fields[1] if len(fields) == 3 else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Each folder's modification time when this process last listed it (`records.clean_folder`)
# or last changed it: a folder that no other process touched since holds no new leftovers, so a
# batch of 2,000 files written into one folder costs one listing and 2,000 stats, not 2,000
# listings.
_seen: dict[str, int] = {}


def seen_unchanged(folder: Path) -> bool:
    """Whether `folder` is as this process last listed or changed it (one stat)."""
    try:
        return _seen.get(os.path.abspath(folder)) == os.stat(folder).st_mtime_ns
    except OSError:
        return False


def note_folder(folder: Path) -> None:
    """Record that this process changed `folder` (see `records.clean_folder`)."""
    try:
        _seen[os.path.abspath(folder)] = os.stat(folder).st_mtime_ns
    except OSError:
        pass


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


def write_reason(exc: OSError, path: Path) -> str:
    """Why writing `path` failed, in words a user can act on."""
    reasons = {
        errno.ENOSPC: "no space left on device; free some space and retry",
        errno.EDQUOT: "disk quota exceeded; free some space and retry",
        errno.EFBIG: "the file is larger than this process may write (its file-size limit); raise the limit "
                     "(ulimit -f) and retry",
        errno.EACCES: f"permission denied in {path.parent}; choose a writable output folder (-o)",
        errno.EPERM: f"permission denied in {path.parent}; choose a writable output folder (-o)",
        errno.EROFS: f"{path.parent} is on a read-only file system; choose another output folder (-o)",
        errno.ENAMETOOLONG: f"its name is over the file system's limit of {NAME_MAX} bytes; choose a shorter one",
    }
    return reasons.get(exc.errno, exc.strerror or str(exc))
