"""Block maps: incremental copies of large relation files by block (8 or 32 KiB), and
the restore that puts such a file back together.

A relation segment is up to 1 GiB; one changed row must not recopy all of it. Like
pgBackRest's block incremental, a large relation file that changed (by size and mtime,
``chain.unchanged``) is read whole and every block hashed (BLAKE3, 16 bytes: a
collision-resistant hash 2.3 times as fast as SHA-256 with SHA-NI here; maps written
with SHA-256 are still read); only blocks whose digest differs from the prior backup's
map of that file are stored, in this backup's *blocks* artifacts (one per 256 MiB part),
in block order. The *map* artifact lists, per block of the file, its digest and where
its bytes are: a source (an artifact key, a blocks artifact of this backup or of an
earlier one) and the block's position in that source's plaintext.

Why content digests and not page LSNs: a block is reused only when its bytes are the
bytes just read, so the restored file is byte for byte the copy a full backup would
have made now. Nothing depends on page LSNs being advanced (hint bits are written
without WAL unless checksums are on), on relfilenodes not being reused, or on the prior
backup's pages being untorn: a torn page in the prior hashes differently and is stored
again. Cost: changed files are read and hashed whole (no transfer for unchanged blocks).

At restore each written block is hashed again and compared with the signed map, so a
source artifact that is intact but holds other bytes, or a map that points to the wrong
position, is refused; a delta restore hashes the blocks already on disk and fetches only
those that differ, reading each source only up to its last needed block.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from blake3 import blake3

from strongroom.artifacts import read_artifact
from strongroom.catalog import Artifact
from strongroom.config import EncryptionConfig
from strongroom.errors import IntegrityError
from strongroom.repository.base import Repository

PAGE = 8192
BLOCK = PAGE  # the block of files below LARGE
LARGE = 256 * 1024 * 1024
LARGE_BLOCK = 4 * PAGE  # 32 KiB: a quarter of the map for the largest files
MIN_MAPPED = 1024 * 1024  # smaller files are copied whole
READ = 1024 * 1024
DIGEST = 16
ENTRY = struct.Struct("<16sII")  # digest, source index, position in that source
CONTENT_MAP = "pg-block-map"
CONTENT_BLOCKS = "pg-data-blocks"
MAX_BLOCKS = (1 << 30) // PAGE * 4  # a segment is 1 GiB unless built otherwise


def _sha256_128(block: bytes | memoryview) -> bytes:
    return hashlib.sha256(block).digest()[:DIGEST]


def _blake3_128(block: bytes | memoryview) -> bytes:
    return bytes(blake3(block).digest(DIGEST))


DIGESTS: dict[str, Callable[[bytes | memoryview], bytes]] = {
    "blake3-128": _blake3_128,  # 2.3x SHA-256's speed here (SHA-NI), also collision-resistant
    "sha256-128": _sha256_128,  # maps written before blake3
}
ALGORITHM = "blake3-128"
digest = DIGESTS[ALGORITHM]


def mappable(path: str, size: int) -> bool:
    """Large relation files get block maps; everything else is copied whole."""
    return path.startswith(("base/", "global/")) and size >= MIN_MAPPED and size % PAGE == 0


def block_size_for(size: int) -> int:
    """8 KiB blocks (PostgreSQL's pages), 32 KiB for files of 256 MiB and more: the map
    is 24 bytes per block, mostly an incompressible digest, and for a 1 GiB segment of
    well-compressible rows 8 KiB maps would cost a few percent of what the data itself
    stores. A file crossing the threshold is stored whole once."""
    return LARGE_BLOCK if size >= LARGE else BLOCK


@dataclass
class BlockMap:
    """Where every block of one file version is: digest, source index, position."""

    size: int
    entries: bytearray
    sources: list[str]
    block: int = BLOCK
    algorithm: str = ALGORITHM

    @property
    def blocks(self) -> int:
        return len(self.entries) // ENTRY.size

    def entry(self, index: int) -> tuple[bytes, int, int]:
        digest_, source, position = ENTRY.unpack_from(self.entries, index * ENTRY.size)
        return bytes(digest_), int(source), int(position)

    @classmethod
    def parse(
        cls,
        data: bytes,
        size: int,
        sources: list[str],
        block: int = BLOCK,
        algorithm: str = ALGORITHM,
    ) -> BlockMap:
        """A map as stored, checked: one entry per block of ``size``, known sources."""
        if algorithm not in DIGESTS:
            raise IntegrityError(f"block map: digest {str(algorithm)[:20]!r} is not known")
        if not isinstance(size, int) or size < 0 or not all(isinstance(s, str) for s in sources):
            raise IntegrityError("block map: malformed size or sources")
        if block not in (BLOCK, LARGE_BLOCK):
            raise IntegrityError(f"block map: block size {str(block)[:20]!r}")
        blocks = -(-size // block)
        if blocks > MAX_BLOCKS or len(data) != blocks * ENTRY.size:
            raise IntegrityError(
                f"block map has {len(data)} bytes, {blocks} blocks of {size} bytes need "
                f"{blocks * ENTRY.size}"
            )
        for i, (_, source, _) in enumerate(ENTRY.iter_unpack(data)):
            if source >= len(sources):
                raise IntegrityError(f"block map: block {i} names source {source}")
        return cls(size, bytearray(data), list(sources), block, algorithm)


class MapSink:
    """An in-memory sink for a stored map, with a limit: 24 bytes per block of at most
    ``MAX_BLOCKS`` (restore and verify read maps through it)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if len(self.data) + len(data) > MAX_BLOCKS * ENTRY.size:
            raise IntegrityError("a block map is larger than any file can need")
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def parse_record(data: bytes, record: Artifact) -> BlockMap:
    """The map ``data`` read from ``record``, checked against what its meta records
    (size, sources, block size, digest; maps without ``digest`` are SHA-256 ones)."""
    sources = record.meta.get("sources")
    listed = sources if isinstance(sources, list) else []
    return BlockMap.parse(
        data,
        record.meta.get("size", -1),
        listed,
        record.meta.get("block_size", BLOCK),
        record.meta.get("digest", "sha256-128"),
    )


def load_map(repo: Repository, record: Artifact, enc: EncryptionConfig) -> BlockMap:
    """A stored block map, read (digests checked) and parsed against its record."""
    sink = MapSink()
    read_artifact(repo, record, sink, encryption=enc)
    return parse_record(bytes(sink.data), record)


class ChangedBlocks:
    """The byte source ``store_artifact`` reads for a mapped file: reads the file (up to
    the size it had when opened), hashes every block and hands on only the blocks whose
    digest differs from ``prior``'s; ``finish`` gives the new map."""

    def __init__(
        self,
        fd: int,
        size: int,
        prior: BlockMap | None,
        block: int = BLOCK,
        *,
        start: int = 0,
        own: int | None = None,
    ) -> None:
        if prior is not None and (prior.block != block or prior.algorithm != ALGORITHM):
            prior = None  # the file crossed the size threshold (or an older map): whole once
        if start % block:
            raise ValueError("a part starts on a block boundary")
        self._fd, self._left, self._prior, self.block = fd, size, prior, block
        self._offset = start
        self._entries = bytearray()
        self._pending = b""
        self._index = start // block
        if own is None:
            own = len(prior.sources) if prior is not None else 0
        self._own = own  # the source index of this backup's blocks artifact
        self.stored = 0  # blocks handed on
        self.read_bytes = 0

    def _next_chunk(self) -> bytes:
        want = min(READ, self._left)
        if want <= 0:
            return b""
        data = os.pread(self._fd, want, self._offset)
        if not data:
            self._left = 0  # truncated while read: the file ends here
            return b""
        self._offset += len(data)
        self._left -= len(data)
        self.read_bytes += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        hasher, size, entry, own = digest, ENTRY.size, ENTRY.pack, self._own
        block_size = self.block
        prior = self._prior
        known = prior.entries if prior is not None else bytearray()
        # the prior's last block may be partial: only its whole blocks are compared here
        whole_prior = min(len(known) // size, prior.size // block_size) if prior is not None else 0
        while True:
            chunk = self._pending + self._next_chunk()
            if not chunk:
                return b""
            whole = len(chunk) - len(chunk) % block_size if self._left > 0 else len(chunk)
            self._pending = chunk[whole:]
            out = bytearray()
            view = memoryview(chunk)
            entries = self._entries
            index = self._index
            for start in range(0, whole, block_size):
                block = view[start : start + block_size]
                found = hasher(block)
                at = index * size
                if (
                    index < whole_prior
                    and len(block) == block_size
                    and known[at : at + DIGEST] == found
                ):
                    entries += known[at : at + size]
                else:
                    entries += entry(found, own, self.stored)
                    self.stored += 1
                    out += block
                index += 1
            self._index = index
            if out:
                return bytes(out)

    @property
    def entries(self) -> bytearray:
        return self._entries

    def finish(self, own_key: str) -> BlockMap:
        """The map of what was read (a whole file): this backup's blocks artifact is the
        source after the prior's."""
        sources = [*(self._prior.sources if self._prior is not None else []), own_key]
        return compact(self._entries, sources, self.read_bytes, self.block)


PART = 256 * 1024 * 1024  # a large file is read as parts of this size, in parallel


def parts_of(size: int) -> list[tuple[int, int]]:
    """(start, length) of the parts a file of ``size`` bytes is read in."""
    return [(start, min(PART, size - start)) for start in range(0, size, PART)] or [(0, 0)]


def compact(entries: bytearray, sources: list[str], size: int, block: int) -> BlockMap:
    """A map from entries whose source indices point into ``sources``; sources no block
    uses are dropped (and the rest renumbered)."""
    used = {source for _, source, _ in ENTRY.iter_unpack(entries)}
    if len(used) == len(sources):
        return BlockMap(size, entries, sources, block)
    keep = sorted(used)
    renumber = {old: new for new, old in enumerate(keep)}
    out = bytearray(len(entries))
    for i, (digest_, source, position) in enumerate(ENTRY.iter_unpack(entries)):
        ENTRY.pack_into(out, i * ENTRY.size, digest_, renumber[source], position)
    return BlockMap(size, out, [sources[i] for i in keep], block)


def assemble(pieces: list[tuple[bytearray, int, int]], sources: list[str], block: int) -> BlockMap:
    """The map of a file read in parts (``(entries, bytes read, part length)`` each, in
    order; a part's source index is ``len(prior sources) + its number``): a part that
    read less than its length (the file was truncated while read) ends the file there,
    as a truncated whole read would."""
    entries = bytearray()
    size = 0
    for part_entries, read, length in pieces:
        entries += part_entries
        size += read
        if read < length:
            break
    return compact(entries, sources, size, block)


def existing_digests(
    fd: int, size: int, block: int = BLOCK, algorithm: str = ALGORITHM
) -> list[bytes]:
    """Digests of the blocks already in an open file (a delta restore keeps those that
    match), reading at most ``size`` bytes."""
    hasher = DIGESTS[algorithm]
    found: list[bytes] = []
    pending = b""
    left = size
    while left > 0:
        data = os.read(fd, min(READ, left))
        if not data:
            break
        left -= len(data)
        chunk = pending + data
        whole = len(chunk) - len(chunk) % block
        view = memoryview(chunk)
        found.extend(hasher(view[i : i + block]) for i in range(0, whole, block))
        pending = chunk[whole:]
    if pending:
        found.append(hasher(pending))
    return found


class _Done(Exception):
    """Every wanted block of a source is written: stop reading it."""


class _BlockSink:
    """``read_artifact``'s sink for one source: writes the wanted positions at their
    block offsets in ``fd``, each checked against the map's digest."""

    def __init__(
        self, fd: int, wanted: dict[int, tuple[int, bytes, int]], block: int, algorithm: str
    ) -> None:
        self._fd, self._wanted = fd, wanted  # position -> (block index, digest, length)
        self.block = block
        self._hasher = DIGESTS[algorithm]
        self._buffer = bytearray()
        self._position = 0
        self._last = max(wanted) if wanted else -1
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        bs = self.block
        start = 0
        if self._buffer:
            start = min(bs - len(self._buffer), len(view))
            self._buffer += view[:start]
            if len(self._buffer) < bs:
                return len(view)
            self._block(bytes(self._buffer))
            self._buffer.clear()
        end = start + (len(view) - start) // bs * bs
        run_at, run_index, hasher = -1, -1, self._hasher
        wanted = self._wanted
        for at in range(start, end, bs):
            want = wanted.pop(self._position, None)
            self._position += 1
            if want is not None:
                index, expected, length = want
                block = view[at : at + bs]
                if length != bs or hasher(block) != expected:
                    self._refuse(index)
                if run_at >= 0 and index == run_index + (at - run_at) // bs:
                    pass  # extends the run: written at once below
                else:
                    self._flush_run(view, run_at, at, run_index)
                    run_at, run_index = at, index
            elif run_at >= 0:
                self._flush_run(view, run_at, at, run_index)
                run_at = -1
            if self._position > self._last:
                self._flush_run(view, run_at, at + bs, run_index)
                raise _Done
        self._flush_run(view, run_at, end, run_index)
        self._buffer += view[end:]
        return len(view)

    def _flush_run(self, view: memoryview, run_at: int, end: int, index: int) -> None:
        """Write the verified blocks ``view[run_at:end]`` (consecutive in the file from
        block ``index``) with one call."""
        if run_at < 0 or end <= run_at:
            return
        data, offset = view[run_at:end], index * self.block
        while data:
            done = os.pwrite(self._fd, data, offset)
            data, offset = data[done:], offset + done
        self.written += end - run_at

    def _refuse(self, index: int) -> None:
        raise IntegrityError(f"block {index}: the stored block differs from the map's digest")

    def flush(self) -> None:
        pass

    def _block(self, block: bytes | memoryview) -> None:
        want = self._wanted.pop(self._position, None)
        self._position += 1
        if want is not None:
            index, expected, length = want
            bs = self.block
            if len(block) != length or self._hasher(block) != expected:
                self._refuse(index)
            os.pwrite(self._fd, block, index * bs)
            self.written += len(block)
        if self._position > self._last:
            raise _Done

    def finish(self) -> None:
        if self._buffer:
            self._block(bytes(self._buffer))
            self._buffer.clear()


Reader = Callable[[str, _BlockSink], None]  # streams source ``key``'s plaintext into a sink


Slots = dict[int, tuple[int, bytes, int]]  # position -> (block index, digest, length)


def plan_mapped(fd: int, bmap: BlockMap, *, existing_size: int = 0) -> dict[int, Slots]:
    """The blocks to fetch into the open file ``fd``, by source: all of them, or with
    ``existing_size`` > 0 those whose digest differs from the block already there. The
    file is cut or extended to its final size."""
    block = bmap.block
    size = min(existing_size, bmap.size)
    have = existing_digests(fd, size, block, bmap.algorithm) if existing_size else []
    wanted: dict[int, Slots] = {}
    for index in range(bmap.blocks):
        found, source, position = bmap.entry(index)
        if index < len(have) and have[index] == found:
            continue
        length = min(block, bmap.size - index * block)
        slots = wanted.setdefault(source, {})
        if position in slots:
            raise IntegrityError(f"block map: position {position} of a source used twice")
        slots[position] = (index, found, length)
    os.ftruncate(fd, bmap.size)
    return wanted


def write_source(fd: int, bmap: BlockMap, source: int, slots: Slots, read: Reader) -> int:
    """Fetch the ``slots`` of one source into ``fd`` (sources of one file may be written
    at once: each block has its own offset). Returns the bytes written."""
    sink = _BlockSink(fd, dict(slots), bmap.block, bmap.algorithm)
    try:
        read(bmap.sources[source], sink)
        sink.finish()
    except _Done:
        pass
    if sink._wanted:
        raise IntegrityError(
            f"source {bmap.sources[source][-60:]!r} ends before block position {min(sink._wanted)}"
        )
    return sink.written
