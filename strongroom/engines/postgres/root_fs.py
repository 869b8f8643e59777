"""File operations of root-run PITR restores that the ``postgres`` account cannot steer.

A restore running as root writes into folders the cluster's OS user controls (the
data directory once it is handed over, often its parent too). Anything done there
by a fixed name and by path can be redirected by a planted symlink or a swapped
directory. So every write here goes through descriptors:

* folders are opened with ``O_DIRECTORY | O_NOFOLLOW`` and everything below them is
  reached relative to that descriptor (``dir_fd``), never by a path again;
* new files get a random name with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and their mode
  and owner are set with ``fchmod`` / ``fchown`` on the open descriptor, then
  ``rename(2)`` puts them in place (a symlink planted at the final name is replaced,
  never followed);
* an existing file is opened ``O_NOFOLLOW`` and must be a regular file with one link;
* ownership of a tree is set with ``fchownat(AT_SYMLINK_NOFOLLOW)`` while walking it
  with ``os.fwalk`` (which never follows symlinks).

Standard library only: ``strongroom-wal``'s configuration writer uses it too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Owner = tuple[int, int] | None  # (uid, gid), None: leave ownership alone


class UnsafePath(OSError):
    """A name that should be a plain file or folder is something else (symlink,
    device, hard link...)."""


def owner_of(user: str | None) -> Owner:
    """(uid, gid) of ``user`` when we are root and there is someone to hand files to."""
    if not user or os.geteuid() != 0:
        return None
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def open_dir(path: str | os.PathLike[str], dir_fd: int | None = None) -> int:
    """A descriptor of the folder ``path`` (its last component must not be a symlink)."""
    try:
        return os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (20, 40):  # ENOTDIR, ELOOP: a file or a symlink stands there
            raise UnsafePath(exc.errno, f"{os.fspath(path)} is not a plain folder") from None
        raise


def write_new(
    dir_fd: int, name: str, data: bytes, *, mode: int = 0o600, owner: Owner = None
) -> None:
    """Write ``data`` to ``name`` inside ``dir_fd`` atomically: a random temporary name
    (O_EXCL | O_NOFOLLOW), fchmod / fchown on the descriptor, fsync, rename."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _plain_file(fd: int, name: str) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise UnsafePath(0, f"{name} is not a plain file (type or hard links)")


def read_plain(dir_fd: int, name: str, limit: int = 16 * 1024 * 1024) -> bytes | None:
    """The content of the regular file ``name`` (None when absent)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise UnsafePath(exc.errno, f"{name} is a symlink") from None
        raise
    _plain_file(fd, name)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(0, f"{name} is unreasonably large")
    return data


def new_file(dir_fd: int, name: str, *, mode: int = 0o600, owner: Owner = None) -> int:
    """Create ``name`` exclusively (no symlink followed, nothing replaced)."""
    fd = os.open(name, NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    os.fchmod(fd, mode)
    if owner is not None:
        os.fchown(fd, *owner)
    return fd


def chown_tree(dir_fd: int, owner: Owner) -> None:
    """Hand the folder of ``dir_fd`` and everything below it to ``owner`` without
    following a single symlink."""
    if owner is None:
        return
    os.fchown(dir_fd, *owner)
    for _root, dirs, files, root_fd in os.fwalk(".", dir_fd=dir_fd, follow_symlinks=False):
        for name in dirs + files:
            os.chown(name, *owner, dir_fd=root_fd, follow_symlinks=False)


def ensure_dir(dir_fd: int, name: str, mode: int = 0o700) -> int:
    """Open (creating it when absent) the plain folder ``name`` inside ``dir_fd``."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=dir_fd)
    return open_dir(name, dir_fd)
