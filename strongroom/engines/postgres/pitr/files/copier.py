"""Copying the files of one file-level backup: whole, by changed blocks, or referenced
from the prior backup, from up to ``jobs`` threads.

Each file is opened ``O_NOFOLLOW`` and read at most up to the size it had when opened
(a relation extended while it is copied gets its new pages from WAL replay; a truncated
one simply ends early). Unchanged files (``chain.unchanged``) are listed with the prior's
record; large relation files go through ``blocks``; the rest stream whole through
``store_artifact``. Everything stored is remembered so a failed backup removes it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from strongroom.artifacts import store_artifact
from strongroom.catalog import Artifact, data_key
from strongroom.config import EncryptionConfig
from strongroom.engines.postgres.pitr.files import blocks, chain
from strongroom.engines.postgres.pitr.files.parallel import run_all
from strongroom.engines.postgres.pitr.files.walk import FileStat
from strongroom.errors import IntegrityError
from strongroom.pipeline import Progress
from strongroom.repository.base import Repository, StorageSettings

ENGINE = chain.ENGINE

CHUNK = 1024 * 1024


class Bounded:
    """Reads an open file up to the size it had when opened (a file extended while it is
    copied is replayed from WAL; a truncated one simply ends early)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._left = size
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        want = CHUNK if n is None or n <= 0 else min(n, CHUNK)
        want = min(want, self._left)
        if want <= 0:
            return b""
        data = os.read(self._fd, want)
        self._left -= len(data)
        self.read_bytes += len(data)
        if not data:
            self._left = 0
        return data


def _open(root: str, path: str) -> int | None:
    try:
        return os.open(os.path.join(root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # dropped since the walk: WAL replay drops it too


def sha256_of(fd: int, size: int) -> tuple[str, int]:
    """SHA-256 of an open file's first ``size`` bytes (and how many there were)."""
    digest = hashlib.sha256()
    source = Bounded(fd, size)
    while data := source.read():
        digest.update(data)
    return digest.hexdigest(), source.read_bytes


@dataclass(frozen=True)
class _Part:
    """What one part of a large file gave: its map entries, bytes read of ``length``,
    blocks stored, and its blocks artifact (None: the file was gone)."""

    entries: bytearray
    read: int
    length: int
    stored: int
    artifact: Artifact | None


@dataclass
class _Mapped:
    """A large relation file being copied in parts."""

    path: str
    size: int
    mtime: int
    mode: int
    block: int
    prior: blocks.BlockMap | None = None
    prior_loaded: bool = False
    done: dict[int, _Part] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def parts(self) -> list[tuple[int, int]]:
        return blocks.parts_of(self.size)


class Copier:
    """Copies (or references) the files of one backup, from up to ``jobs`` threads;
    remembers what it stored so a failed backup can remove it."""

    def __init__(
        self,
        repo: Repository,
        target: str,
        backup_id: str,
        enc: EncryptionConfig,
        level: int,
        settings: StorageSettings,
        prior: chain.Prior | None,
        checksum: bool,
        progress: Progress | None,
    ) -> None:
        self.repo, self.target, self.backup_id = repo, target, backup_id
        self.enc, self.level, self.settings = enc, level, settings
        self.prior, self.checksum, self.progress = prior, checksum, progress
        self.artifacts: list[Artifact] = []
        self.stored: list[str] = []
        self.empty: list[list[Any]] = []
        self.files = self.files_copied = self.files_referenced = self.files_mapped = 0
        self.copied_bytes = 0
        self.referenced_bytes = 0
        self._lock = threading.Lock()
        self.zstd_threads = -1  # 0 once files are copied in parallel (copy_all)

    def _new_key(self) -> str:
        with self._lock:
            key = data_key(ENGINE, self.target, self.backup_id, f"files/{len(self.stored):06d}")
            self.stored.append(key)
        return key

    def store(self, name: str, source: IO[bytes], content: str, meta: dict[str, Any]) -> Artifact:
        return store_artifact(
            self.repo,
            self._new_key(),
            source,
            name=name,
            content=content,
            encryption=self.enc,
            level=self.level,
            settings=self.settings,
            progress=self.progress,
            meta=meta,
            threads=self.zstd_threads,
        )

    def _add(self, listed: list[Artifact], *, copied: int, referenced: int) -> None:
        with self._lock:
            self.artifacts.extend(listed)
            self.files += 1
            self.copied_bytes += copied
            self.referenced_bytes += referenced
            if copied:
                self.files_copied += 1
            else:
                self.files_referenced += 1

    def file(self, root: str, entry: FileStat, now_ns: int) -> None:
        fd = _open(root, entry.path)
        if fd is None:
            return
        try:
            info = os.fstat(fd)
            size, mtime, mode = info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode)
            if size == 0:
                with self._lock:
                    self.empty.append([entry.path, mode, mtime])
                return
            record = None
            if self.prior is not None:
                record = chain.unchanged(self.prior, entry.path, size, mtime, now_ns)
            if self.checksum and self.prior is not None:
                before = self.prior.records.get(entry.path)
                record = None
                if (
                    before is not None
                    and before.content == chain.CONTENT_FILE
                    and before.raw_size == size
                ):
                    digest, read = sha256_of(fd, size)
                    record = before if digest == before.raw_sha256 and read == size else None
                    os.lseek(fd, 0, os.SEEK_SET)
            if record is not None:
                self._reference(record, entry.path, size, mtime, mode)
            else:
                source = Bounded(fd, size)
                meta = {"path": entry.path, "mtime_ns": mtime, "mode": mode}
                artifact = self.store(entry.path, cast(IO[bytes], source), chain.CONTENT_FILE, meta)
                artifact.meta["size"] = artifact.raw_size
                self._add([artifact], copied=artifact.raw_size, referenced=0)
        finally:
            os.close(fd)

    def _reference(self, record: Artifact, path: str, size: int, mtime: int, mode: int) -> None:
        """List the prior's record of an unchanged file again (a block map with every
        blocks artifact it names)."""
        assert self.prior is not None
        listed = [chain.referenced(record, path, size, mtime, mode)]
        if record.content == blocks.CONTENT_MAP:
            listed += [self._prior_source(str(k), path) for k in record.meta.get("sources") or []]
        self._add(listed, copied=0, referenced=size)

    def _prior_source(self, key: str, path: str) -> Artifact:
        """The prior's blocks artifact ``key`` (its map of ``path`` names it), as this
        backup lists it."""
        assert self.prior is not None
        source = self.prior.sources.get(key)
        if source is None:
            raise IntegrityError(f"backup {self.prior.backup_id}: {path} names no source")
        return chain.referenced_source(source, path)

    def _split(self, root: str, entry: FileStat, failing: Any) -> list[Callable[[], None]]:
        """The tasks for a large relation file: referenced when unchanged, else its
        parts (``blocks.parts_of``) read in parallel, the map stored by the last one."""
        fd = _open(root, entry.path)
        if fd is None:
            return []
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        size, mtime, mode = info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode)
        if not blocks.mappable(entry.path, size):
            return [functools.partial(self._one, root, entry, failing)]
        if self.prior is not None and not self.checksum:
            record = chain.unchanged(self.prior, entry.path, size, mtime, time.time_ns())
            if record is not None:
                self._reference(record, entry.path, size, mtime, mode)
                return []
        mapped = _Mapped(entry.path, size, mtime, mode, blocks.block_size_for(size))
        return [
            functools.partial(self._part, root, mapped, number, start, length, failing)
            for number, (start, length) in enumerate(mapped.parts)
        ]

    def _prior_map(self, mapped: _Mapped) -> blocks.BlockMap | None:
        with mapped.lock:
            if not mapped.prior_loaded:
                before = self.prior.records.get(mapped.path) if self.prior is not None else None
                if before is not None and before.content == blocks.CONTENT_MAP:
                    # one of another block size or digest is not compared with (ChangedBlocks)
                    mapped.prior = blocks.load_map(self.repo, before, self.enc)
                mapped.prior_loaded = True
            return mapped.prior

    def _part(
        self, root: str, mapped: _Mapped, number: int, start: int, length: int, failing: Any
    ) -> None:
        """Store the blocks of one part that differ from the prior's map of the file."""
        failing()
        prior = self._prior_map(mapped)
        own = (len(prior.sources) if prior is not None else 0) + number
        fd = _open(root, mapped.path)
        artifact = None
        if fd is not None:
            try:
                source = blocks.ChangedBlocks(fd, length, prior, mapped.block, start=start, own=own)
                meta: dict[str, Any] = {"path": mapped.path, "part": number}
                artifact = self.store(
                    mapped.path, cast(IO[bytes], source), blocks.CONTENT_BLOCKS, meta
                )
            finally:
                os.close(fd)
        result = (
            _Part(source.entries, source.read_bytes, length, source.stored, artifact)
            if artifact is not None
            else _Part(bytearray(), 0, length, 0, None)
        )
        with mapped.lock:
            mapped.done[number] = result
            last = len(mapped.done) == len(mapped.parts)
        if last:
            self._finish_mapped(mapped, prior)

    def _finish_mapped(self, mapped: _Mapped, prior: blocks.BlockMap | None) -> None:
        """All parts are in: store the file's map and list it with its sources."""
        done = [mapped.done[n] for n in range(len(mapped.parts))]
        own = {p.artifact.key: p.artifact for p in done if p.artifact is not None}
        if not own:
            return  # dropped since the walk: WAL replay drops it too
        keys = [p.artifact.key if p.artifact is not None else "" for p in done]
        sources = [*(prior.sources if prior is not None else []), *keys]
        pieces = [(p.entries, p.read, p.length) for p in done]
        bmap = blocks.assemble(pieces, sources, mapped.block)
        map_meta = {
            "path": mapped.path,
            "size": bmap.size,
            "mtime_ns": mapped.mtime,
            "mode": mapped.mode,
            "block_size": bmap.block,
            "digest": bmap.algorithm,
            "blocks_stored": sum(p.stored for p in done),
            "parts": len(done),
            "sources": bmap.sources,
        }
        record = self.store(
            mapped.path, io.BytesIO(bytes(bmap.entries)), blocks.CONTENT_MAP, map_meta
        )
        listed = [record, *own.values()]
        listed += [self._prior_source(k, mapped.path) for k in bmap.sources if k not in own]
        copied = sum(a.raw_size for a in own.values())
        with self._lock:
            self.files_mapped += 1
        self._add(listed, copied=copied, referenced=max(bmap.size - copied, 0))

    def text(self, name: str, text: str, content: str) -> Artifact:
        artifact = self.store(name, io.BytesIO(text.encode()), content, {"path": name})
        self.artifacts.append(artifact)
        return artifact

    def _one(self, root: str, entry: FileStat, failing: Any) -> None:
        failing()
        self.file(root, entry, time.time_ns())

    def copy_all(self, root: str, files: list[FileStat], jobs: int, failing: Any) -> None:
        """Copy every file, ``jobs`` at a time, the largest first (large relation files
        in parts); the first failure stops the rest."""
        self.zstd_threads = 0 if jobs > 1 else -1
        tasks: list[Callable[[], None]] = []
        for entry in sorted(files, key=lambda e: -e.size):
            if blocks.mappable(entry.path, entry.size):
                tasks.extend(self._split(root, entry, failing))
            else:
                tasks.append(functools.partial(self._one, root, entry, failing))
        run_all(tasks, jobs, "sr-files")
        self.artifacts.sort(key=lambda a: (str(a.meta.get("path")), a.content, a.key))

    def clean_up(self) -> None:
        """Remove what this backup stored (never a referenced artifact of another)."""
        for key in self.stored:
            if self.repo.exists(key):
                self.repo.delete(key)
