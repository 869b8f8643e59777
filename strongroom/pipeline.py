"""The stream: raw bytes -> SHA-256 -> zstd -> age encryption -> SHA-256 -> storage.

Backups flow through ``store_stream`` and restores through ``restore_stream``;
both move bounded chunks, so memory does not grow with the size of the data.

Encryption is age (X25519 recipients, ChaCha20-Poly1305 in 64 KiB chunks with
a final-chunk flag), so truncation, reordering and flipped bytes fail
authentication and an operator can decrypt any artifact with the stock ``age``
tool: ``age -d -i key.txt artifact | zstd -d``. The SHA-256 of the stored
bytes is checked against the manifest as well, because age recipients are
public and anyone holding one could produce a different, well-formed file.

``restore_stream`` holds back the last bytes of the plaintext until every
check has passed, so a consumer such as ``pg_restore`` or ``psql -1`` cannot
reach the end of its input, and commit, from an artifact that fails a check.

Backups also record the SHA-256 of every chunk of stored bytes (the manifest, signed,
holds the list): 1 MiB first, each chunk twice the one before up to ``VERIFY_CHUNK``
(64 MiB), so the first verified bytes are ready at once and the list stays short. A
restore checks each chunk as it is read, before its bytes reach the decryptor, and
calls ``on_verified`` each time everything produced so far comes from verified
bytes: a consumer that only
ever sees published plaintext (the parallel restore's spool) never runs a byte the
backup did not write, without waiting for the end of the artifact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Protocol, cast

import pyrage
import zstandard

from strongroom.errors import IntegrityError, InvalidInput, StrongroomError

CHUNK = 1024 * 1024
HOLDBACK = 1024 * 1024
VERIFY_CHUNK = 64 * 1024 * 1024
VERIFY_FIRST_CHUNK = 1024 * 1024  # chunks double from here up to VERIFY_CHUNK
ENCRYPTION = "age-x25519"
COMPRESSION = "zstd"

Progress = Callable[[int], None]


class Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> Any: ...


@dataclass(frozen=True)
class StreamStats:
    raw_size: int
    raw_sha256: str
    stored_size: int
    stored_sha256: str
    stored_chunk_sha256: tuple[str, ...] = ()
    stored_chunk_size: int = 0
    stored_chunk_first: int = 0


class _ChunkHasher:
    """SHA-256 of each chunk of a stream: ``first`` bytes, then twice as many each time
    up to ``size`` (``first`` 0: all ``size``); the last chunk may be shorter."""

    def __init__(self, size: int, first: int = 0) -> None:
        self.size = size
        self._next = min(size, first) if first > 0 else size
        self._hash = hashlib.sha256()
        self._filled = 0
        self.digests: list[str] = []

    def update(self, view: memoryview) -> int:
        """Hash ``view``; returns how many chunks it completed."""
        completed = 0
        while view:
            take = min(len(view), self._next - self._filled)
            self._hash.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._next:
                self.digests.append(self._hash.hexdigest())
                self._hash = hashlib.sha256()
                self._filled = 0
                self._next = min(self.size, self._next * 2)
                completed += 1
        return completed

    def close(self) -> list[str]:
        if self._filled:
            self.digests.append(self._hash.hexdigest())
            self._filled = 0
        return self.digests


def _nothing() -> None:
    pass


class _ChunkCheck:
    """Checks the stored stream chunk by chunk against the manifest's list as it is read."""

    def __init__(
        self, expected: list[str], size: int, first: int, on_verified: Callable[[], None]
    ) -> None:
        self.expected = expected
        self.hasher = _ChunkHasher(size, first)
        self.on_verified = on_verified

    def update(self, view: memoryview, name: str) -> None:
        if self.hasher.update(view):
            self._compare(name)
            self.on_verified()  # what came out so far derives from verified bytes only

    def close(self, name: str) -> None:
        self.hasher.close()
        self._compare(name)
        if len(self.hasher.digests) != len(self.expected):
            raise IntegrityError(
                f"{name}: {len(self.hasher.digests)} stored chunks, the manifest lists "
                f"{len(self.expected)}; the artifact was altered or replaced"
            )

    def _compare(self, name: str) -> None:
        for index, digest in enumerate(self.hasher.digests):
            if index >= len(self.expected) or digest != self.expected[index]:
                raise IntegrityError(
                    f"{name}: stored chunk {index} does not match the manifest; "
                    "the artifact was altered or replaced (nothing after it was used)"
                )


def parse_recipients(recipients: list[str]) -> list[pyrage.x25519.Recipient]:
    if not recipients:
        raise InvalidInput("no encryption recipient configured: backups are always encrypted")
    parsed = []
    for text in recipients:
        try:
            parsed.append(pyrage.x25519.Recipient.from_str(text.strip()))
        except Exception as exc:
            raise InvalidInput(f"invalid age recipient {text.strip()[:12]}...: {exc}") from None
    return parsed


def parse_identities(identities: list[str]) -> list[pyrage.x25519.Identity]:
    if not identities:
        raise InvalidInput("no decryption identity configured: restore and verify need one")
    parsed = []
    for text in identities:
        try:
            parsed.append(pyrage.x25519.Identity.from_str(text.strip()))
        except Exception:
            # never echo the text: it is a secret key
            raise InvalidInput("invalid age identity (expected AGE-SECRET-KEY-1...)") from None
    return parsed


class _HashingReader:
    """Reads from ``source`` and hashes/counts every byte that passes."""

    def __init__(
        self,
        source: IO[bytes],
        progress: Progress | None = None,
        chunks: _ChunkCheck | None = None,
        name: str = "",
    ) -> None:
        self._source = source
        self._progress = progress
        self._chunks = chunks
        self._name = name
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._source.read(n if n is not None and n > 0 else CHUNK)
        except BaseException as exc:
            self.error = exc  # the storage failed, not the artifact
            raise
        if data:
            if self._chunks is not None:
                try:
                    self._chunks.update(memoryview(data), self._name)
                except IntegrityError as exc:
                    self.error = exc
                    raise
            self.sha256.update(data)
            self.size += len(data)
            if self._progress is not None:
                self._progress(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


class _HashingWriter:
    """Hashes/counts every byte on its way to ``sink``."""

    def __init__(self, sink: Writable, chunk_size: int = 0, first: int = 0) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.chunks = _ChunkHasher(chunk_size, first) if chunk_size else None
        self.size = 0
        self.error: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        if self.chunks is not None:
            self.chunks.update(view)
        self.size += view.nbytes
        try:
            self._sink.write(view)
        except BaseException as exc:
            self.error = exc  # the storage failed, not the stream
            raise
        return view.nbytes

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


class _HoldbackWriter:
    """Passes bytes to ``sink`` but keeps the last ``holdback`` bytes until ``release``."""

    def __init__(self, sink: Writable, holdback: int) -> None:
        self._sink = sink
        self._holdback = holdback
        self._tail = bytearray()
        self.error: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        self._tail += view
        excess = len(self._tail) - self._holdback
        if excess >= CHUNK or (excess > 0 and len(self._tail) > 2 * self._holdback):
            try:
                self._sink.write(bytes(self._tail[:excess]))
            except BaseException as exc:
                self.error = exc  # the consumer failed, not the artifact
                raise
            del self._tail[:excess]
        return view.nbytes

    def flush(self) -> None:
        pass

    def release(self) -> None:
        if self._tail:
            self._sink.write(bytes(self._tail))
            self._tail.clear()


def store_stream(
    source: IO[bytes],
    sink: Writable,
    *,
    recipients: list[str],
    level: int = 3,
    progress: Progress | None = None,
    threads: int = -1,
) -> StreamStats:
    """Compress and encrypt ``source`` into ``sink``; returns sizes and checksums.

    ``source`` needs ``read(n)``; ``sink`` needs ``write(bytes)``. ``threads``: zstd's
    worker threads (-1: one per core; 0 when the caller runs streams in parallel
    itself, which also spares small streams the cost of starting them).
    """
    keys = parse_recipients(recipients)
    raw = _HashingReader(source, progress)
    stored = _HashingWriter(sink, VERIFY_CHUNK, VERIFY_FIRST_CHUNK)
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with compressor.stream_reader(
        cast(IO[bytes], raw), read_size=CHUNK, closefd=False
    ) as compressed:
        try:
            pyrage.encrypt_io(compressed, stored, keys)
        except pyrage.EncryptError as exc:
            # pyrage wraps errors of the source and the sink: surface the real one
            cause = stored.error or raw.error
            if cause is not None:
                raise cause from None
            raise StrongroomError(f"encrypting the stream failed: {exc}") from None
    assert stored.chunks is not None
    return StreamStats(
        raw_size=raw.size,
        raw_sha256=raw.sha256.hexdigest(),
        stored_size=stored.size,
        stored_sha256=stored.sha256.hexdigest(),
        stored_chunk_sha256=tuple(stored.chunks.close()),
        stored_chunk_size=VERIFY_CHUNK,
        stored_chunk_first=VERIFY_FIRST_CHUNK,
    )


def restore_stream(
    source: BinaryIO,
    sink: Writable,
    *,
    identities: list[str],
    expected_stored_sha256: str,
    expected_raw_sha256: str,
    name: str,
    holdback: int = HOLDBACK,
    progress: Progress | None = None,
    expected_chunks: tuple[list[str], int, int] | None = None,
    on_verified: Callable[[], None] | None = None,
) -> StreamStats:
    """Decrypt and decompress ``source`` into ``sink``, checking both checksums.

    Raises IntegrityError naming ``name`` on any mismatch, authentication
    failure or wrong key; in that case the last ``holdback`` bytes were never
    written to ``sink``. With ``expected_chunks`` (digests, chunk size, first size) and
    ``on_verified``, each stored chunk is checked as it arrives (see the module's
    docstring); every reader of such an artifact fails at the first chunk that differs,
    so verify passing means every restore's chunk checks pass too.
    """
    keys = parse_identities(identities)
    chunks = None
    if expected_chunks is not None and expected_chunks[1] > 0:
        digests, size, first = expected_chunks
        chunks = _ChunkCheck(digests, size, first, on_verified or _nothing)
    stored = _HashingReader(source, progress, chunks, name)
    held = _HoldbackWriter(sink, holdback)
    raw = _HashingWriter(held)
    decompressor = zstandard.ZstdDecompressor()
    try:
        with decompressor.stream_writer(
            cast(IO[bytes], raw), write_size=CHUNK, closefd=False
        ) as plain:
            pyrage.decrypt_io(stored, plain, keys)
            plain.flush()
    except (pyrage.DecryptError, OSError, ValueError) as exc:
        if held.error is not None:
            raise held.error from None
        if stored.error is not None:
            raise stored.error from None
        text = str(exc)
        if "no matching keys" in text.lower() or "no identity" in text.lower():
            raise IntegrityError(
                f"{name}: cannot decrypt with the configured identity (wrong key?)"
            ) from None
        raise IntegrityError(
            f"{name}: encrypted stream failed authentication ({text}); "
            "the artifact is truncated, reordered or altered"
        ) from None
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{name}: compressed stream is corrupt ({exc})") from None
    except Exception:
        if stored.error is not None:
            raise stored.error from None
        raise
    if chunks is not None:
        chunks.close(name)
    stats = StreamStats(
        raw_size=raw.size,
        raw_sha256=raw.sha256.hexdigest(),
        stored_size=stored.size,
        stored_sha256=stored.sha256.hexdigest(),
    )
    if stats.stored_sha256 != expected_stored_sha256:
        raise IntegrityError(
            f"{name}: stored checksum mismatch (manifest {expected_stored_sha256[:16]}..., "
            f"read {stats.stored_sha256[:16]}...); the artifact was altered or replaced"
        )
    if stats.raw_sha256 != expected_raw_sha256:
        raise IntegrityError(f"{name}: content checksum mismatch after decryption")
    held.release()
    return stats


class NullSink:
    """A sink that discards bytes (for verify)."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)
