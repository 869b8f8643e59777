"""Copying one object between repositories, streamed and checked on the way.

The source object is read in bounded chunks (``CHUNK``) and written into a streaming
writer of the destination (``Repository.open_write``: a temp file or a multipart
upload, invisible until ``commit``). Its size and SHA-256 are computed while it
flows; when they differ from what is expected (a signed manifest's ``stored_size`` /
``stored_sha256``) the writer is aborted before commit, so nothing is left visible,
and the copy fails with an ``IntegrityError`` naming the object.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from strongroom.errors import IntegrityError, NotFound
from strongroom.repository.base import Repository, StorageSettings

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Expected:
    """What a copied object must be; None parts are not checked."""

    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Copied:
    key: str
    size: int
    sha256: str


def _close(reader: BinaryIO) -> None:
    with contextlib.suppress(Exception):
        reader.close()


def hash_object(repo: Repository, key: str, limit: int | None = None) -> tuple[int, str]:
    """(size, SHA-256) of a stored object, streamed; reading stops past ``limit``
    bytes (the object is then known to differ from one of that size)."""
    reader = repo.open_read(key)
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                break
    finally:
        _close(reader)
    return size, digest.hexdigest()


def same_object(repo: Repository, key: str, expected: Expected) -> bool | None:
    """None: ``key`` is absent from ``repo``; True: present with the expected size and
    checksum (read back and hashed); False: present and different."""
    try:
        size = repo.size(key)
    except NotFound:
        return None
    if expected.size is not None and size != expected.size:
        return False
    if expected.sha256 is None:
        return True
    got_size, got_sha = hash_object(repo, key, limit=expected.size)
    return got_sha == expected.sha256 and (expected.size is None or got_size == expected.size)


def copy_object(
    source: Repository,
    destination: Repository,
    key: str,
    *,
    expected: Expected,
    settings: StorageSettings | None,
    check_head: Callable[[bytes], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Copied:
    """Stream ``key`` from ``source`` into ``destination`` (same key) and commit it only
    when its size and SHA-256 match ``expected``. ``check_head`` sees the first chunk
    before any byte is written (e.g. a WAL object's header) and raises to refuse it."""
    reader = source.open_read(key)
    digest = hashlib.sha256()
    size = 0
    try:
        writer = destination.open_write(key, settings)
        try:
            first = True
            while chunk := reader.read(CHUNK):
                if first and check_head is not None:
                    check_head(chunk)
                first = False
                size += len(chunk)
                if expected.size is not None and size > expected.size:
                    raise IntegrityError(
                        f"{key} in {source.describe()} is longer than the {expected.size} "
                        "bytes its signed manifest records; not copied"
                    )
                digest.update(chunk)
                writer.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
            _check(key, source, expected, size, digest.hexdigest())
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    finally:
        _close(reader)
    return Copied(key, size, digest.hexdigest())


def _check(key: str, source: Repository, expected: Expected, size: int, sha256: str) -> None:
    if expected.size is not None and size != expected.size:
        raise IntegrityError(
            f"{key} in {source.describe()} has {size} bytes, its signed manifest records "
            f"{expected.size}; not copied"
        )
    if expected.sha256 is not None and sha256 != expected.sha256:
        raise IntegrityError(
            f"{key} in {source.describe()} does not match the checksum its signed manifest "
            f"records (sha256 {sha256[:16]}..., expected {expected.sha256[:16]}...): "
            "not copied (altered in the source?)"
        )
