"""Extracting a base backup tar as hostile input, streamed, into an empty data directory.

A root-run restore must not let the tar's content reach outside the data directory
(a forged base backup in the bucket would otherwise own the restore host). So this
is not ``tar -x``: Python's ``tarfile`` reads the stream (``mode="r|"``, nothing
staged) and every member is checked before anything is created:

* only regular files and directories, plus the symlinks PostgreSQL itself creates
  (``pg_tblspc/<oid>``); no hard links, devices, fifos, sparse or unknown types;
* names are relative, without ``..``, NUL or empty components; a name is created
  once (``O_EXCL``), so a second member cannot replace the first;
* ``pg_wal/`` holds only its own folders (a base backup taken with ``-X none``
  carries no WAL: a file there could pose as verified WAL to the restore_command's
  cache shortcut); ``recovery.signal`` / ``standby.signal`` are strongroom's to write;
* every folder is opened ``O_DIRECTORY | O_NOFOLLOW`` and everything is created
  relative to its descriptor; files with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode and
  owner set by ``fchmod`` / ``fchown``, symlinks owned with ``lchown``;
* modes are PostgreSQL's: files 0600 (0640 with group access), folders 0700 (0750),
  never set-id or world bits, whatever the tar says;
* pax and GNU long-name records are bounded (no memory blow-up) and any malformed
  header is an ``IntegrityError``.

``pg_verifybackup`` then checks the files against PostgreSQL's own manifest, which
does not cover ``postgresql.auto.conf``, the signal files or ``pg_wal/``: the rules
above do.
"""

from __future__ import annotations

import os
import re
import tarfile
import threading
from typing import IO, Any

from strongroom.engines.postgres.root_fs import DIR_FLAGS, NEW_FILE_FLAGS, Owner
from strongroom.errors import IntegrityError

CHUNK = 1024 * 1024
RECORD_LIMIT = 1024 * 1024  # pax / GNU long-name record: PostgreSQL's are tiny
_TBLSPC_LINK = re.compile(r"^pg_tblspc/[0-9]+$")
_WAL_DIRS = frozenset({("pg_wal",), ("pg_wal", "archive_status")})
_SIGNALS = frozenset({"recovery.signal", "standby.signal"})


class _BoundedInfo(tarfile.TarInfo):
    """Refuses oversized extended-header records before tarfile buffers them."""

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > RECORD_LIMIT:
            raise IntegrityError(f"tar pax header of {self.size} bytes: refused")
        return super()._proc_pax(tarfile_)  # type: ignore[misc]

    def _proc_gnulong(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > RECORD_LIMIT:
            raise IntegrityError(f"tar long-name record of {self.size} bytes: refused")
        return super()._proc_gnulong(tarfile_)  # type: ignore[misc]

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        raise IntegrityError("tar member is a GNU sparse file: refused")


def _refuse(name: str, why: str) -> IntegrityError:
    shown = name.encode("utf-8", "backslashreplace").decode()[:200]
    return IntegrityError(f"base backup tar member {shown!r} refused: {why}")


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, refusing anything that is not a plain
    relative name inside the data directory."""
    if not name or "\x00" in name:
        raise _refuse(name, "empty name or NUL byte")
    if name.startswith("/"):
        raise _refuse(name, "absolute name")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise _refuse(name, "names the data directory itself")
    if ".." in parts:
        raise _refuse(name, "'..' in the name")
    return parts


def check_member(info: tarfile.TarInfo) -> tuple[str, ...]:
    """Why ``info`` may be extracted (its components), or an IntegrityError."""
    parts = member_parts(info.name)
    if info.isdir():
        kind = "dir"
    elif info.isreg() and info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = "file"
    elif info.issym():
        if not _TBLSPC_LINK.match("/".join(parts)):
            raise _refuse(info.name, "symlink outside pg_tblspc/<oid>")
        if not info.linkname.startswith("/") or "\x00" in info.linkname:
            raise _refuse(info.name, "tablespace link is not an absolute path")
        return parts
    elif info.islnk():
        raise _refuse(info.name, "hard link")
    elif info.ischr() or info.isblk():
        raise _refuse(info.name, "device node")
    elif info.isfifo():
        raise _refuse(info.name, "fifo")
    else:
        raise _refuse(info.name, f"member type {info.type!r}")
    if parts[0] == "pg_wal" and not (kind == "dir" and parts in _WAL_DIRS):
        raise _refuse(info.name, "a base backup carries no WAL (pg_wal/ holds folders only)")
    if len(parts) == 1 and parts[0] in _SIGNALS:
        raise _refuse(info.name, "strongroom writes the recovery signal itself")
    return parts


class FolderTree:
    """Folders of the data directory opened so far, by components."""

    def __init__(self, root_fd: int, owner: Owner) -> None:
        self._fds: dict[tuple[str, ...], int] = {(): root_fd}
        self._owner = owner

    def folder(self, parts: tuple[str, ...], mode: int = 0o700) -> int:
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        parent = self.folder(parts[:-1])
        try:
            os.mkdir(parts[-1], mode, dir_fd=parent)
            created = True
        except FileExistsError:
            created = False
        try:
            fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
        except OSError:
            raise _refuse("/".join(parts), "exists and is not a plain folder") from None
        if created:
            os.fchmod(fd, mode)
            if self._owner is not None:
                os.fchown(fd, *self._owner)
        self._fds[parts] = fd
        return fd

    def close(self) -> None:
        for parts, fd in self._fds.items():
            if parts:
                os.close(fd)
        self._fds = {}


def file_mode(mode: int) -> int:
    return 0o600 | (mode & 0o040)


def dir_mode(mode: int) -> int:
    return 0o700 | (mode & 0o050)


def extract_stream(source: IO[bytes], root_fd: int, owner: Owner) -> dict[str, int]:
    """Extract the tar read from ``source`` below the folder ``root_fd``."""
    tree = FolderTree(root_fd, owner)
    counts = {"files": 0, "dirs": 0, "links": 0, "bytes": 0}
    try:
        with tarfile.open(fileobj=source, mode="r|", tarinfo=_BoundedInfo) as tar:
            for info in tar:
                parts = check_member(info)
                if info.isdir():
                    fd = tree.folder(parts, dir_mode(info.mode))
                    os.fchmod(fd, dir_mode(info.mode))
                    counts["dirs"] += 1
                    continue
                parent = tree.folder(parts[:-1])
                if info.issym():
                    os.symlink(info.linkname, parts[-1], dir_fd=parent)
                    if owner is not None:
                        os.chown(parts[-1], *owner, dir_fd=parent, follow_symlinks=False)
                    counts["links"] += 1
                    continue
                counts["bytes"] += _write_file(tar, info, parent, parts, owner)
                counts["files"] += 1
            # the rest of the stream (end-of-archive padding) is read to its end, so
            # the writer never meets a closed pipe
            while source.read(CHUNK):
                pass
    except IntegrityError:
        raise
    except FileExistsError as exc:
        raise IntegrityError(f"base backup tar has a member twice: {exc.filename!r}") from None
    except (tarfile.TarError, EOFError, ValueError, UnicodeError, RecursionError) as exc:
        raise IntegrityError(f"base backup tar is malformed: {str(exc)[:200]}") from None
    finally:
        tree.close()
    return counts


def _write_file(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    parent: int,
    parts: tuple[str, ...],
    owner: Owner,
) -> int:
    mode = file_mode(info.mode)
    try:
        fd = os.open(parts[-1], NEW_FILE_FLAGS, mode, dir_fd=parent)
    except FileExistsError:
        raise _refuse(info.name, "the name already exists (a member twice?)") from None
    except OSError as exc:
        raise _refuse(info.name, f"cannot be created ({exc.strerror})") from None
    written = 0
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        data = tar.extractfile(info)
        assert data is not None
        while chunk := data.read(CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            written += len(chunk)
        if written != info.size:
            raise IntegrityError(f"base backup tar ends inside {info.name!r} (truncated)")
        os.utime(fd, (info.mtime, info.mtime))
    finally:
        os.close(fd)
    return written


class PipeExtractor:
    """A sink for ``read_artifact``: bytes written here go through a pipe to a thread
    that extracts them (streaming: the pipe holds at most its kernel buffer)."""

    def __init__(self, root_fd: int, owner: Owner) -> None:
        read_fd, self._write_fd = os.pipe()
        self._error: BaseException | None = None
        self.result: dict[str, int] = {}

        def run() -> None:
            try:
                with os.fdopen(read_fd, "rb", buffering=CHUNK) as source:
                    self.result = extract_stream(source, root_fd, owner)
            except BaseException as exc:  # handed to the writer's thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="pitr-extract", daemon=True)
        self._thread.start()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self._write_fd, view) :]
        except BrokenPipeError:
            self._thread.join()
            raise self._error or IntegrityError("the tar extraction stopped early") from None
        return len(data)

    def finish(self) -> dict[str, int]:
        """End of the stream: wait for the extraction and return its counts."""
        self.close()
        if self._error is not None:
            raise self._error
        return self.result

    def close(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        self._thread.join()

    def flush(self) -> None:
        pass


def summary(counts: dict[str, int]) -> dict[str, Any]:
    return {f"tar_{k}": v for k, v in counts.items()}
