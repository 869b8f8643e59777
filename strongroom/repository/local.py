"""A folder on a local (or mounted) file system as a backup repository.

Every write goes to a temporary file ``.<name>.tmp-<random>`` in the target's
own folder, is fsynced, then renamed into place and the folder fsynced, so a
crash leaves either the old object, the new one, or a temp file that
``cleanup_incomplete`` removes: never a torn object under the real name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from strongroom.config import RepositoryConfig
from strongroom.errors import AccessDenied, Conflict, InvalidInput, NotFound, StorageFull
from strongroom.repository.base import (
    ObjectInfo,
    ObjectWriter,
    Repository,
    StorageSettings,
    check_key,
    too_large,
)
from strongroom.repository.throttle import RateLimit, ThrottledWriter, throttled_reader
from strongroom.signing import Trust

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{16}$")
_FILE_MODE = 0o600  # backups hold database contents: owner-only
_NO_HARDLINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(fd: int) -> None:
    os.fsync(fd)


class LocalRepository(Repository):
    """A repository in a folder. ``StorageSettings`` (object lock) do not apply here."""

    def __init__(
        self, root: Path | str, *, trust: Trust | None = None, rate_limit: RateLimit | None = None
    ) -> None:
        self.root = Path(root)
        self.trust = trust if trust is not None else Trust()
        self.rate_limit = rate_limit

    @classmethod
    def from_config(cls, config: RepositoryConfig) -> LocalRepository:
        if not config.path:
            raise InvalidInput("a local repository needs a path")
        rate = config.max_bytes_per_second
        return cls(
            Path(config.path), trust=config.trust(), rate_limit=RateLimit(rate) if rate else None
        )

    def describe(self) -> str:
        return self.root.absolute().as_uri()

    # -------------------------------------------------------------- helpers

    def _path(self, key: str) -> Path:
        check_key(key)
        parts = key.split("/")
        if _TMP_RE.fullmatch(parts[-1]):
            raise InvalidInput(f"invalid repository key {key[:120]!r}: reserved temp-file name")
        return self.root.joinpath(*parts)

    def _ensure_dir(self, directory: Path) -> None:
        """mkdir -p, fsyncing each parent whose entries changed."""
        if directory.is_dir():
            return
        missing: list[Path] = []
        path = directory
        while not path.exists():
            missing.append(path)
            if path.parent == path:
                break
            path = path.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            _fsync_dir(path.parent)

    @contextlib.contextmanager
    def _os_errors(self, key: str, action: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFound(f"object {key!r} not found in {self.describe()}") from exc
        except PermissionError as exc:
            raise AccessDenied(f"permission denied {action} {key!r} in {self.describe()}") from exc
        except OSError as exc:
            full = _no_space(exc, f"{action} {key!r} in {self.describe()}")
            if full is None:
                raise
            raise full from exc

    def _new_temp(self, final: Path) -> tuple[int, Path]:
        self._ensure_dir(final.parent)
        while True:
            tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(8)}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
            except FileExistsError:
                continue
            return fd, tmp

    # ------------------------------------------------------------ interface

    def open_write(self, key: str, settings: StorageSettings | None = None) -> ObjectWriter:
        final = self._path(key)
        with self._os_errors(key, "writing"):
            fd, tmp = self._new_temp(final)
        writer = LocalObjectWriter(key, fd, tmp, final)
        return writer if self.rate_limit is None else ThrottledWriter(writer, self.rate_limit)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        with self._os_errors(key, "reading"):
            reader = path.open("rb")
        return reader if self.rate_limit is None else throttled_reader(reader, self.rate_limit)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        overwrite: bool = False,
        settings: StorageSettings | None = None,
    ) -> None:
        final = self._path(key)
        if overwrite:
            with self.open_write(key, settings) as writer:
                writer.write(data)
                writer.commit()
            return
        with self._os_errors(key, "writing"):
            fd, tmp = self._new_temp(final)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    _fsync_file(f.fileno())
                try:
                    # link(2) fails with EEXIST if the name exists: of two concurrent
                    # writers exactly one wins, and readers never see a partial file.
                    os.link(tmp, final)
                except FileExistsError:
                    raise Conflict(f"object {key!r} already exists in {self.describe()}") from None
                except OSError as exc:
                    if exc.errno not in _NO_HARDLINK:
                        raise
                    self._put_exclusive(key, final, data)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            _fsync_dir(final.parent)

    def _put_exclusive(self, key: str, final: Path, data: bytes) -> None:
        """For file systems without hard links: O_EXCL creates the name atomically
        (still exactly one winner), but a crash mid-write leaves a short file under
        the real name; manifests verify sizes/checksums, so that is detected."""
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        except FileExistsError:
            raise Conflict(f"object {key!r} already exists in {self.describe()}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            _fsync_file(f.fileno())

    def get_bytes(self, key: str, *, max_size: int | None = None) -> bytes:
        path = self._path(key)
        with self._os_errors(key, "reading"), path.open("rb") as f:
            if max_size is None:
                return f.read()
            data = f.read(max_size + 1)
            if len(data) > max_size:
                raise too_large(key, os.fstat(f.fileno()).st_size, max_size)
            return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._os_errors(key, "reading"):
            if not path.is_file():
                raise FileNotFoundError(path)
            return path.stat().st_size

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """(relative path with '/', absolute path) of every file under prefix's folder."""
        if prefix:
            check_key(prefix[:-1] if prefix.endswith("/") else prefix)
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                yield rel, Path(dirpath, name)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found: list[ObjectInfo] = []
        for rel, path in self._walk(prefix):
            if _TMP_RE.fullmatch(path.name) or not rel.startswith(prefix):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            found.append(
                ObjectInfo(
                    key=rel,
                    size=st.st_size,
                    modified=dt.datetime.fromtimestamp(st.st_mtime, dt.UTC),
                )
            )
        found.sort(key=lambda info: info.key)  # same order as S3 listings
        yield from found

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except PermissionError as exc:
            raise AccessDenied(f"permission denied deleting {key!r} in {self.describe()}") from exc
        _fsync_dir(path.parent)

    def cleanup_incomplete(
        self, prefix: str = "", *, older_than: dt.timedelta | None = None
    ) -> int:
        """Remove temp files of interrupted writes whose key starts with ``prefix``.
        ``older_than`` spares temp files modified more recently (a live writer)."""
        now = dt.datetime.now(dt.UTC).timestamp()
        removed = 0
        for rel, path in self._walk(prefix):
            match = _TMP_RE.fullmatch(path.name)
            if not match:
                continue
            rel_dir = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
            if not (rel_dir + match["name"]).startswith(prefix):
                continue
            try:
                if older_than is not None and now - path.stat().st_mtime < (
                    older_than.total_seconds()
                ):
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(exc: BaseException, doing: str) -> StorageFull | None:
    """``StorageFull`` for a full disk or quota; None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return StorageFull(f"no space left on device ({errno.errorcode[exc.errno]}) {doing}")
    return None


WRITEBACK_EVERY = 8 * 1024 * 1024


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting for it.

    POSIX_FADV_DONTNEED starts asynchronous writeback of the range's dirty pages (and
    drops the pages already clean: a backup is not read back soon), so the fsync in
    ``commit`` finds little left to write instead of the whole file. Best effort."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class LocalObjectWriter(ObjectWriter):
    """Writes into a temp file; ``commit`` fsyncs and renames it into place.

    Writeback starts every ``WRITEBACK_EVERY`` bytes while the stream is written, so the
    disk works alongside the stream and the final fsync is short."""

    def __init__(self, key: str, fd: int, tmp: Path, final: Path) -> None:
        self._key = key
        self._file = os.fdopen(fd, "wb")
        self._tmp = tmp
        self._final = final
        self._size = 0
        self._written_back = 0
        self._state = "open"

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._state != "open":
            raise InvalidInput(f"writer for {self._key!r} is already {self._state}")
        try:
            n = self._file.write(data)
            self._size += n
            if self._size - self._written_back >= WRITEBACK_EVERY:
                self._file.flush()
                _start_writeback(
                    self._file.fileno(), self._written_back, self._size - self._written_back
                )
                self._written_back = self._size
        except BaseException as exc:
            self.abort()
            full = _no_space(exc, f"writing {self._key!r}")
            if full is None:
                raise
            raise full from exc
        return n

    def commit(self) -> int:
        if self._state == "committed":
            return self._size
        if self._state != "open":
            raise InvalidInput(f"writer for {self._key!r} is already {self._state}")
        try:
            self._file.flush()
            _fsync_file(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._final)
        except BaseException as exc:
            self.abort()
            full = _no_space(exc, f"writing {self._key!r}")
            if full is None:
                raise
            raise full from exc
        self._state = "committed"
        _fsync_dir(self._final.parent)
        return self._size

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
