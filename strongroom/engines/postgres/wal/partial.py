"""Partial WAL segments in the repository: the receiver's newest, still growing segment.

``pg_receivewal`` writes the segment it is receiving as ``<segment>.partial``
(preallocated with zeros). The receiver archives it under
``wal/<target>/<timeline>/<segment>.partial`` (``names.partial_name``) in the same
stored form as a segment (``store.encode``: zstd, age, frame SHA-256 in the clear
first line) with its trailing zeros cut, so that when the primary is lost a recovery
reaches the last transaction the receiver has: ``store.fetch_to_file`` serves the
partial, zero-padded to the segment size, when PostgreSQL asks for a segment that is
not archived but whose partial is (what Barman does).

Replacement rules (``push_partial``), decided without the decryption key:

* a completed segment always wins: no partial is stored once the segment is;
* an identical partial is a no-op; a shorter one (older) leaves the stored one;
* a longer one replaces the stored one only when it extends it: the first
  ``raw_size`` bytes of the new one, compressed at the stored level, must have the
  stored frame SHA-256 (single-threaded zstd is deterministic), i.e. the stored
  partial is a prefix of the new one. WAL only grows, so anything else is a
  different history under the same name: Conflict, nothing replaced.

Standard library at load time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from strongroom.engines.postgres.wal import names
from strongroom.errors import Conflict, InvalidInput, NotFound

if TYPE_CHECKING:
    from strongroom.repository.base import Repository


@dataclass(frozen=True)
class PartialResult:
    name: str  # <segment>.partial
    key: str
    raw_size: int  # bytes stored (trailing zeros cut)
    outcome: str  # stored, replaced, unchanged, kept_longer, superseded, empty


def trim(raw: bytes | memoryview) -> bytes:
    """``raw`` without its trailing zero bytes (zero padding restores them)."""
    return bytes(raw).rstrip(b"\0")


def extends(existing_raw_size: int, existing_sha: str, level: int | None, raw: bytes) -> bool:
    """Whether the stored partial (size, frame sha256, level) is a prefix of ``raw``."""
    from strongroom.engines.postgres.wal.store import compress

    if level is None or existing_raw_size > len(raw):
        return False
    frame = compress(memoryview(raw)[:existing_raw_size], level)
    return hashlib.sha256(frame).hexdigest() == existing_sha


def push_partial(
    repo: Repository,
    target: str,
    segment: str,
    raw: bytes | memoryview,
    recipients: list[str],
    *,
    level: int = 1,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> PartialResult:
    """Archive the partial content ``raw`` of ``segment`` (see the module rules)."""
    from strongroom.engines.postgres.wal.store import (
        codec,
        encode,
        read_stored_header,
        wal_key,
    )

    name = names.partial_name(segment)
    key = wal_key(target, name)
    data = trim(raw)
    if len(data) < 40:  # preallocated, nothing received yet (or only part of the header)
        return PartialResult(name, key, len(data), "empty")
    try:
        names.check_segment(
            name, data, segment_size=segment_size, system_identifier=system_identifier
        )
    except names.WalNameError as exc:
        raise InvalidInput(f"refusing to archive {name}: {exc}") from None
    if repo.exists(wal_key(target, segment)):
        return PartialResult(name, key, len(data), "superseded")
    blob, digest = encode(name, data, recipients, level)
    try:
        repo.put_bytes(key, blob, overwrite=False)
        return PartialResult(name, key, len(data), "stored")
    except Conflict:
        pass
    try:
        existing = read_stored_header(repo, key)
    except NotFound:
        repo.put_bytes(key, blob, overwrite=False)
        return PartialResult(name, key, len(data), "stored")
    if existing.raw_size == len(data) and existing.frame_sha256 == digest:
        return PartialResult(name, key, len(data), "unchanged")
    if existing.raw_size >= len(data):
        return PartialResult(name, key, existing.raw_size, "kept_longer")
    if existing.zstd_version != codec(level).split("-", 2)[1]:
        raise Conflict(
            f"WAL {name} is archived by {existing.codec}; this strongroom uses {codec(level)} "
            "and cannot tell without the decryption key whether the new partial extends it; "
            "nothing was replaced"
        )
    if not extends(existing.raw_size, existing.frame_sha256, existing.level, data):
        raise Conflict(
            f"WAL {name} is already archived at {repo.describe()}/{key} with content that is "
            f"not a prefix of this partial ({existing.raw_size} vs {len(data)} bytes): "
            f"refusing to replace it. Is another cluster archiving into target {target!r}?"
        )
    if repo.exists(wal_key(target, segment)):  # completed meanwhile (archive_command)
        return PartialResult(name, key, len(data), "superseded")
    repo.put_bytes(key, blob, overwrite=True)
    return PartialResult(name, key, len(data), "replaced")
