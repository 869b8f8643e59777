"""One archived WAL file in the repository: its key, its stored form, push and fetch.

Key: ``wal/<target>/<timeline>/<name>`` (``<timeline>`` is the 8 hex digits that
start the name). Stored form: one text line, then the age-encrypted zstd frame::

    SRWAL1 <name> <raw size> <sha256 of the zstd frame> zstd-<version>-<level>[ <history>]\n
    <age(X25519) ciphertext of the zstd frame of the file>

The first line lets a duplicate push be compared without the decryption key (the
archiver holds only the public recipient). Single-threaded zstd is deterministic
for one version and level, so equal frames mean equal files and different frames
mean different files; hashing the frame (a few MiB) instead of the 16 MiB file
keeps the hot path cheap. A re-push compressed with another level recompresses at
the archived level to compare; one by another zstd version cannot be compared
and fails loudly rather than guess. For a timeline history file, ``<history>``
lists its entries as ``parent:switchpoint,...`` so continuity checks can follow
timelines without the key (LSNs and timeline ids are public in the names anyway).

Integrity at fetch: age authenticates every ciphertext chunk, the decrypted
frame must have the SHA-256 of the first line (content swapped under a kept first
line is refused), zstd checks its frame checksum (XXH64 of the content), the size
must match the header and the WAL page header must match the name. An object
re-made from scratch by someone holding the public recipient and write access
passes all of these: only object lock / versioning on the bucket prevents that. With stock tools:
``tail -n +2 OBJ | age -d -i key.txt | zstd -d``.

Objects are written with ``put_bytes(overwrite=False)``: never replaced. A push
of a name that is already archived succeeds when the content is identical and
fails (Conflict) when it differs. The one exception is a ``<segment>.partial``
(the receiver's growing segment, ``push_partial`` at the end of this module): it is
replaced by a partial that extends it, never by anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from strongroom.engines.postgres.wal import names
from strongroom.errors import Conflict, IntegrityError, InvalidInput, NotFound

if TYPE_CHECKING:
    from collections.abc import Iterator

    from strongroom.repository.base import ObjectInfo, Repository

MAGIC = b"SRWAL1"
MAX_HEADER = 512


def wal_prefix(target: str) -> str:
    return f"wal/{target}/"


def archived_files(repo: Repository, target: str) -> Iterator[tuple[ObjectInfo, str, str]]:
    """``(object, file name, kind)`` of every WAL file archived for ``target``; objects
    whose names are not WAL file names are skipped."""
    for info in repo.list(wal_prefix(target)):
        name = info.key.rsplit("/", 1)[-1]
        try:
            kind = names.kind(name)
        except names.WalNameError:
            continue
        yield info, name, kind


def wal_key(target: str, name: str) -> str:
    names.kind(name)
    return f"wal/{target}/{name[:8]}/{name}"


def codec(level: int) -> str:
    import zstandard

    return f"zstd-{'.'.join(str(v) for v in zstandard.ZSTD_VERSION)}-{level}"


@dataclass(frozen=True)
class StoredHeader:
    name: str
    raw_size: int
    frame_sha256: str
    codec: str
    header_size: int
    history: list[names.HistoryEntry] | None = None

    @property
    def level(self) -> int | None:
        parts = self.codec.split("-", 2)  # zstd-<version>-<level>, level may be negative
        return int(parts[2]) if len(parts) == 3 and parts[2].lstrip("-").isdigit() else None

    @property
    def zstd_version(self) -> str:
        parts = self.codec.split("-", 2)
        return parts[1] if len(parts) == 3 else ""


def parse_header(blob: bytes) -> StoredHeader:
    end = blob.find(b"\n", 0, MAX_HEADER)
    if end < 0 or not blob.startswith(MAGIC + b" "):
        raise IntegrityError("not a strongroom WAL object (bad header)")
    parts = blob[:end].decode("ascii", "replace").split(" ")
    if (
        len(parts) not in (5, 6)
        or not parts[2].isdigit()
        or len(parts[3]) != 64
        or not parts[4].startswith("zstd-")
    ):
        raise IntegrityError("not a strongroom WAL object (malformed header)")
    history = None
    if len(parts) == 6:
        try:
            history = [
                names.HistoryEntry(int(tli), names.parse_lsn(lsn), "")
                for tli, lsn in (item.split(":") for item in parts[5].split(",") if item)
            ]
        except ValueError:
            raise IntegrityError("not a strongroom WAL object (malformed history)") from None
    return StoredHeader(parts[1], int(parts[2]), parts[3], parts[4], end + 1, history)


def compress(raw: bytes | memoryview, level: int) -> bytes:
    import zstandard

    # threads=0 (single-threaded): deterministic output, which the fingerprint needs
    return zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0).compress(raw)


def encode(
    name: str, raw: bytes | memoryview, recipients: list[str], level: int = 1
) -> tuple[bytes, str]:
    """The stored form of ``raw``; returns (object bytes, sha256 of the zstd frame)."""
    import pyrage

    from strongroom.pipeline import parse_recipients

    frame = compress(raw, level)
    digest = hashlib.sha256(frame).hexdigest()
    sealed = pyrage.encrypt(frame, parse_recipients(recipients))
    extra = ""
    if names.kind(name) == "history":
        entries = names.parse_history(bytes(raw).decode("utf-8", "replace"))
        extra = " " + ",".join(f"{e.parent}:{names.format_lsn(e.switchpoint)}" for e in entries)
    head = f"{MAGIC.decode()} {name} {len(raw)} {digest} {codec(level)}{extra}\n".encode()
    return b"".join((head, sealed)), digest


def same_content(existing: StoredHeader, raw: bytes | memoryview, digest: str, level: int) -> bool:
    """Whether the archived object holds exactly ``raw`` (``digest``: our frame's hash
    at ``level``). Raises Conflict when the two cannot be compared."""
    if existing.raw_size != len(raw):
        return False
    if existing.codec == codec(level):
        return existing.frame_sha256 == digest
    if existing.zstd_version == codec(level).split("-", 2)[1] and existing.level is not None:
        return hashlib.sha256(compress(raw, existing.level)).hexdigest() == existing.frame_sha256
    raise Conflict(
        f"WAL {existing.name} is already archived, compressed by {existing.codec}; this "
        f"strongroom uses {codec(level)} and cannot tell without the decryption key whether "
        "the content is the same. Compare with `strongroom-wal fetch` on a host holding the "
        "identity; nothing was overwritten."
    )


def decode_into(
    name: str,
    blob: bytes,
    identities: list[str],
    out: BinaryIO,
    *,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> int:
    """Decrypt and decompress a stored WAL object into ``out`` (streamed: no 16 MiB
    intermediate copy); returns the size. Raises IntegrityError naming the file on any
    failed check: age authentication, zstd frame checksum, size, or a WAL page header
    that does not match the name. Write to a temporary file and only rename it into
    place when this returns."""
    import io

    import pyrage
    import zstandard

    from strongroom.pipeline import parse_identities

    head = parse_header(blob)
    if head.name != name:
        raise IntegrityError(f"WAL {name}: the archived object says it is {head.name}")
    try:
        compressed = pyrage.decrypt(blob[head.header_size :], parse_identities(identities))
    except pyrage.DecryptError as exc:
        text = str(exc).lower()
        if "no matching keys" in text or "no identity" in text:
            raise IntegrityError(
                f"WAL {name}: cannot decrypt with the configured identity (wrong key?)"
            ) from None
        raise IntegrityError(
            f"WAL {name}: archived object failed authentication ({exc}); it is truncated or altered"
        ) from None
    # age authenticated every ciphertext chunk, but anyone holding the public recipient
    # can make a valid ciphertext: the frame's SHA-256 binds the clear first line (which
    # push compares duplicates against) to what is decrypted, so content swapped under a
    # kept header is refused. zstd checks its frame checksum; the size and the WAL page
    # header catch a file stored under the wrong name. (Hashing the compressed frame, a
    # few MiB, not the 16 MiB file, keeps the replay path cheap.)
    if hashlib.sha256(compressed).hexdigest() != head.frame_sha256:
        raise IntegrityError(
            f"WAL {name}: the archived content does not match the checksum recorded at push "
            "(frame sha256); the object was replaced or altered"
        )
    size = 0
    first = b""
    try:
        reader = zstandard.ZstdDecompressor().read_to_iter(io.BytesIO(compressed))
        for piece in reader:
            if len(first) < 64:
                first += piece[: 64 - len(first)]
            size += len(piece)
            if size > head.raw_size:
                break
            out.write(piece)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"WAL {name}: compressed data is corrupt ({exc})") from None
    if size != head.raw_size:
        raise IntegrityError(
            f"WAL {name}: {size} bytes after decryption, {head.raw_size} recorded at push"
        )
    what = names.kind(name)
    try:
        if what in ("segment", "partial"):
            header = names.check_segment(
                f"{name[:24]}.partial",  # size is checked above; this checks the header
                first,
                segment_size=segment_size,
                system_identifier=system_identifier,
            )
            if what == "segment" and header is not None and size != header.seg_size:
                raise names.WalNameError(f"{size} bytes, a segment has {header.seg_size}")
    except names.WalNameError as exc:
        raise IntegrityError(f"WAL {name}: {exc}") from None
    return size


def decode(
    name: str,
    blob: bytes,
    identities: list[str],
    *,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> bytes:
    """``decode_into`` to memory (small files, tests)."""
    import io

    out = io.BytesIO()
    decode_into(
        name,
        blob,
        identities,
        out,
        segment_size=segment_size,
        system_identifier=system_identifier,
    )
    raw = out.getvalue()
    if names.kind(name) in ("history", "backup"):
        try:
            names.check_segment(name, raw)
        except names.WalNameError as exc:
            raise IntegrityError(f"WAL {name}: {exc}") from None
    return raw


def read_stored_header(repo: Repository, key: str) -> StoredHeader:
    source = repo.open_read(key)
    try:
        return parse_header(source.read(MAX_HEADER))
    finally:
        with contextlib.suppress(Exception):
            source.close()


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    raw_size: int
    stored_size: int
    sha256: str
    already_archived: bool


def push_bytes(
    repo: Repository,
    target: str,
    name: str,
    raw: bytes | memoryview,
    recipients: list[str],
    *,
    level: int = 1,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> PushResult:
    """Archive one WAL file; returns once the storage has it durably.

    Identical content already archived: success (``already_archived``). Different
    content: Conflict, and the archived object is left untouched. A ``.partial``
    follows ``push_partial`` (replaced only by a partial that extends it).
    """
    if names.kind(name) == "partial":
        got = push_partial(
            repo,
            target,
            names.segment_of_partial(name),
            raw,
            recipients,
            level=level,
            segment_size=segment_size,
            system_identifier=system_identifier,
        )
        kept = got.outcome not in ("stored", "replaced")
        stored_size = repo.size(got.key) if repo.exists(got.key) else 0
        return PushResult(name, got.key, got.raw_size, stored_size, got.sha256, kept)
    try:
        names.check_segment(
            name, raw, segment_size=segment_size, system_identifier=system_identifier
        )
    except names.WalNameError as exc:
        raise InvalidInput(f"refusing to archive {name}: {exc}") from None
    key = wal_key(target, name)
    blob, digest = encode(name, raw, recipients, level)
    try:
        repo.put_bytes(key, blob, overwrite=False)
    except Conflict:
        try:
            existing = read_stored_header(repo, key)
        except NotFound:  # removed between the put and this read: try once more
            repo.put_bytes(key, blob, overwrite=False)
            return PushResult(name, key, len(raw), len(blob), digest, False)
        if same_content(existing, raw, digest, level):
            return PushResult(name, key, len(raw), repo.size(key), digest, True)
        raise Conflict(
            f"WAL {name} is already archived at {repo.describe()}/{key} with DIFFERENT "
            f"content (archived {existing.raw_size} bytes, frame sha256 "
            f"{existing.frame_sha256[:16]}...; this file {len(raw)} bytes, frame sha256 "
            f"{digest[:16]}...). Refusing to overwrite: is another cluster archiving into "
            f"target {target!r}?"
        ) from None
    return PushResult(name, key, len(raw), len(blob), digest, False)


def fetch_bytes(
    repo: Repository,
    target: str,
    name: str,
    identities: list[str],
    *,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> bytes:
    """The verified raw content of one archived WAL file; NotFound if not archived."""
    blob = repo.get_bytes(wal_key(target, name))
    return decode(
        name, blob, identities, segment_size=segment_size, system_identifier=system_identifier
    )


def fetch_to_file(
    repo: Repository,
    target: str,
    name: str,
    identities: list[str],
    dest: str,
    *,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> int:
    """Fetch, verify and write one WAL file to ``dest`` atomically (temporary file, then
    rename once every check passed); NotFound if not archived. A segment that is not
    archived but whose ``<segment>.partial`` is (the receiver's newest) is served from
    the partial, zero-padded to the segment size: replay stops at its end."""
    import os

    stored = name
    try:
        blob = repo.get_bytes(wal_key(target, name))
    except NotFound:
        if not names.is_segment(name):
            raise
        stored = names.partial_name(name)
        blob = repo.get_bytes(wal_key(target, stored))  # NotFound: neither is archived
    folder, base = os.path.split(dest)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            size = decode_into(
                stored,
                blob,
                identities,
                out,
                segment_size=segment_size,
                system_identifier=system_identifier,
            )
        if stored != name:
            with open(tmp, "r+b") as out:
                full = segment_size or names.read_segment_header(out.read(40)).seg_size
                out.truncate(full)
                size = full
        if names.kind(name) in ("history", "backup"):
            with open(tmp, "rb") as f:
                names.check_segment(name, f.read())
        os.replace(tmp, dest)
    except names.WalNameError as exc:
        raise IntegrityError(f"WAL {name}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size


# ------------------------------------------------------------------- partials
# Partial WAL segments in the repository: the receiver's newest, still growing segment.
#
# ``pg_receivewal`` writes the segment it is receiving as ``<segment>.partial``
# (preallocated with zeros). The receiver archives it under
# ``wal/<target>/<timeline>/<segment>.partial`` (``names.partial_name``) in the same
# stored form as a segment (``store.encode``: zstd, age, frame SHA-256 in the clear
# first line) with its trailing zeros cut, so that when the primary is lost a recovery
# reaches the last transaction the receiver has: ``store.fetch_to_file`` serves the
# partial, zero-padded to the segment size, when PostgreSQL asks for a segment that is
# not archived but whose partial is (what Barman does).
#
# Replacement rules (``push_partial``), decided without the decryption key:
#
# * a completed segment always wins: no partial is stored once the segment is;
# * an identical partial is a no-op; a shorter one (older) leaves the stored one;
# * a longer one replaces the stored one only when it extends it: the first
#   ``raw_size`` bytes of the new one, compressed at the stored level, must have the
#   stored frame SHA-256 (single-threaded zstd is deterministic), i.e. the stored
#   partial is a prefix of the new one. WAL only grows, so anything else is a
#   different history under the same name: Conflict, nothing replaced.
#
# ``store.push_bytes`` (``wal-push``, archive_command) follows the same rules for a
# ``.partial`` name, so the partial PostgreSQL archives when a server is promoted and
# the receiver's partial of the same segment share one key without conflicting when
# one extends the other. A shorter partial than the stored one is accepted without a
# comparison (that needs the decryption key).
#
# Standard library at load time.


@dataclass(frozen=True)
class PartialResult:
    name: str  # <segment>.partial
    key: str
    raw_size: int  # bytes stored (trailing zeros cut)
    outcome: str  # stored, replaced, unchanged, kept_longer, superseded, empty
    sha256: str = ""  # of the zstd frame of what this push offered ("" when not encoded)


def trim(raw: bytes | memoryview) -> bytes:
    """``raw`` without its trailing zero bytes (zero padding restores them)."""
    return bytes(raw).rstrip(b"\0")


def extends(existing_raw_size: int, existing_sha: str, level: int | None, raw: bytes) -> bool:
    """Whether the stored partial (size, frame sha256, level) is a prefix of ``raw``."""
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
        return PartialResult(name, key, len(data), "stored", digest)
    except Conflict:
        pass
    try:
        existing = read_stored_header(repo, key)
    except NotFound:
        repo.put_bytes(key, blob, overwrite=False)
        return PartialResult(name, key, len(data), "stored", digest)
    if existing.raw_size == len(data) and existing.frame_sha256 == digest:
        return PartialResult(name, key, len(data), "unchanged", digest)
    if existing.raw_size >= len(data):
        return PartialResult(name, key, existing.raw_size, "kept_longer", digest)
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
    return PartialResult(name, key, len(data), "replaced", digest)
