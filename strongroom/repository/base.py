"""The storage interface every repository (local folder, S3 bucket) implements.

Keys are relative to the repository's prefix and always use '/' separators.
Writers are streaming: ``write`` may be called many times with bounded chunks,
``commit`` makes the object durable and visible, ``abort`` removes every trace
(temporary files, multipart parts).
"""

from __future__ import annotations

import datetime as dt
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from strongroom.errors import IntegrityError, InvalidInput
from strongroom.signing import Trust

if TYPE_CHECKING:
    from strongroom.repository.throttle import RateLimit

# '%': ClickHouse's native BACKUP escapes table names as %XX in the files it writes
# (e.g. a materialized view's ``.inner_id.<uuid>``); it is no path separator
_KEY_PART_RE = re.compile(r"^[A-Za-z0-9_.=+%-]{1,200}$")


def check_key(key: str) -> str:
    """Refuse keys that could escape the repository (``..``, absolute, odd bytes)."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") or not _KEY_PART_RE.fullmatch(p) for p in parts)
    ):
        raise InvalidInput(f"invalid repository key {key[:120]!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: dt.datetime


@dataclass(frozen=True)
class StorageSettings:
    """Per-object protection the storage should apply (S3 only; local ignores)."""

    retain_until: dt.datetime | None = None


class ObjectWriter(ABC):
    """A streaming upload. Use as a context manager: an exception aborts it."""

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    @abstractmethod
    def commit(self) -> int:
        """Make the object durable; returns its size in bytes."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; safe to call more than once."""

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def too_large(key: str, size: int, max_size: int) -> IntegrityError:
    return IntegrityError(
        f"{key} has {size} bytes, over the {max_size}-byte limit for a record; not read"
    )


class Repository(ABC):
    """A place backups live. Implementations: LocalRepository, S3Repository.

    ``trust`` (``strongroom.signing.Trust``) holds the public keys readers of this
    repository trust and, on a backup runner, the signing key; by default nothing is
    trusted and nothing can be signed."""

    trust: Trust = Trust()
    # max_bytes_per_second: artifact streams (open_write/open_read) pass through it
    rate_limit: RateLimit | None = None

    @abstractmethod
    def describe(self) -> str:
        """A human description with no secrets (e.g. ``s3://bucket/prefix``)."""

    @abstractmethod
    def open_write(self, key: str, settings: StorageSettings | None = None) -> ObjectWriter:
        """Start a streaming write. The object is invisible until ``commit``."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming reader; raises NotFound if the key does not exist."""

    @abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        overwrite: bool = False,
        settings: StorageSettings | None = None,
    ) -> None:
        """Write a small object whole. Raises Conflict if it exists and not overwrite."""

    @abstractmethod
    def get_bytes(self, key: str, *, max_size: int | None = None) -> bytes:
        """Read a small object whole; raises NotFound. With ``max_size``, an object
        over it is an ``IntegrityError`` (``too_large``) before it is read whole."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Stored size in bytes; raises NotFound."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a folder-like prefix ending in '/')."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; missing keys are not an error."""

    @abstractmethod
    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Remove leftovers of interrupted writes (temp files, multipart uploads).

        Returns how many were removed.
        """
