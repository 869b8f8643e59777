"""Restoring a file-level backup into an empty data directory, with the bucket assumed
hostile.

The manifest is signed, but a restore running as root must still not let a name in it
reach outside the data directory, so every path is checked before anything is created
(relative, no ``..``, NUL or empty component; no file below ``pg_wal/``, which holds
only its folders; no signal file, which strongroom writes itself; ``backup_label`` and
``tablespace_map`` only from their own artifacts) and everything is created relative to
folders opened ``O_DIRECTORY | O_NOFOLLOW``, files with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` (a name twice is refused), modes PostgreSQL's own (0600/0700 plus group
read) whatever the manifest says (``pitr.extract``).

Before a byte is written the chain is checked whole (``chain.check_chain``: every backup
it depends on listed and trusted, every artifact present with its size); each file then
streams through ``read_artifact`` (stored and plaintext SHA-256 checked), into a private
``mkdtemp`` folder inside the data directory, moved up only when every file is in. A
failed restore leaves the directory as empty as it was.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Artifact, Catalog, Manifest, owner_of
from strongroom.config import EncryptionConfig
from strongroom.engines.postgres import root_fs as fs
from strongroom.engines.postgres.pitr.extract import FolderTree, dir_mode, file_mode
from strongroom.engines.postgres.pitr.files import blocks, chain
from strongroom.engines.postgres.pitr.files import delta as stale_copy
from strongroom.engines.postgres.pitr.files.copier import sha256_of
from strongroom.engines.postgres.pitr.files.parallel import run_all
from strongroom.errors import IntegrityError, InvalidInput, TargetNotEmpty
from strongroom.pipeline import Progress
from strongroom.repository.base import Repository

_SIGNALS = frozenset({"recovery.signal", "standby.signal"})
_OWN_ARTIFACTS = frozenset({chain.LABEL, chain.SPCMAP})


def check_path(path: object, *, what: str = "file") -> tuple[str, ...]:
    """The components of a data-directory path from a manifest, or an IntegrityError."""

    def refuse(why: str) -> IntegrityError:
        shown = str(path).encode("utf-8", "backslashreplace").decode()[:200]
        return IntegrityError(f"backup lists {what} {shown!r}: refused, {why}")

    if not isinstance(path, str) or not path or "\x00" in path:
        raise refuse("empty, not text or with a NUL byte")
    if path.startswith("/"):
        raise refuse("absolute path")
    parts = tuple(path.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise refuse("empty, '.' or '..' component")
    if what == "file":
        if parts[0] == "pg_wal":
            raise refuse("a backup carries no WAL (pg_wal/ holds folders only)")
        if len(parts) == 1 and parts[0] in _SIGNALS:
            raise refuse("strongroom writes the recovery signal itself")
        if len(parts) == 1 and parts[0] in _OWN_ARTIFACTS:
            raise refuse("the backup label and tablespace map come from their own artifacts")
    return parts


class _FdSink:
    """``read_artifact``'s sink: writes into an open file descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._fd, view) :]
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IntegrityError(f"backup lists a {what} that is not a number: {str(value)[:40]!r}")
    return value


def _record(artifact: Artifact, seen: set[tuple[str, ...]]) -> tuple[str, ...]:
    parts = check_path(artifact.meta.get("path"))
    _int(artifact.meta.get("mode"), "file mode")
    _int(artifact.meta.get("mtime_ns"), "modification time")
    if parts in seen:
        raise IntegrityError(f"backup lists {'/'.join(parts)!r} twice")
    seen.add(parts)
    return parts


def plan_files(manifest: Manifest) -> dict[str, Any]:
    """Every path of the backup checked (nothing is written): folders, files with their
    artifacts (a block map with the blocks artifacts it names), empty files, label and
    map. Raises IntegrityError on the first bad one."""
    if manifest.kind != chain.KIND:
        raise InvalidInput(f"backup {manifest.backup_id} is a {manifest.kind} backup, not files")
    seen: set[tuple[str, ...]] = set()
    dirs: list[tuple[tuple[str, ...], int]] = []
    for entry in manifest.details.get("directories") or []:
        if not isinstance(entry, list) or len(entry) != 2:
            raise IntegrityError("backup lists a malformed folder entry")
        dirs.append((check_path(entry[0], what="folder"), _int(entry[1], "folder mode")))
    files: list[tuple[tuple[str, ...], Artifact]] = []
    maps: list[tuple[tuple[str, ...], Artifact]] = []
    sources: dict[tuple[str, ...], dict[str, Artifact]] = {}
    special: dict[str, Artifact] = {}
    for artifact in manifest.artifacts:
        if artifact.content == chain.CONTENT_FILE:
            files.append((_record(artifact, seen), artifact))
        elif artifact.content == blocks.CONTENT_MAP:
            maps.append((_record(artifact, seen), artifact))
            _int(artifact.meta.get("size"), "file size")
        elif artifact.content == blocks.CONTENT_BLOCKS:
            sources.setdefault(check_path(artifact.meta.get("path")), {})[artifact.key] = artifact
        elif artifact.content in (chain.CONTENT_LABEL, chain.CONTENT_SPCMAP):
            if artifact.name in special or artifact.name not in _OWN_ARTIFACTS:
                raise IntegrityError(f"backup lists a second or odd {artifact.name[:40]!r}")
            special[artifact.name] = artifact
        else:
            raise IntegrityError(f"backup lists an artifact of content {artifact.content[:40]!r}")
    if chain.LABEL not in special:
        raise IntegrityError(f"backup {manifest.backup_id} has no backup_label")
    mapped: list[tuple[tuple[str, ...], Artifact, dict[str, Artifact]]] = []
    for parts, record in maps:
        named = record.meta.get("sources")
        mine = sources.pop(parts, {})
        if not isinstance(named, list) or any(k not in mine for k in named):
            raise IntegrityError(
                f"the block map of {'/'.join(parts)!r} names a source the backup does not list"
            )
        mapped.append((parts, record, {k: mine[k] for k in named}))
    if sources:
        raise IntegrityError(f"backup lists blocks of {'/'.join(next(iter(sources)))!r}, no map")
    empty: list[tuple[tuple[str, ...], int, int]] = []
    for entry in manifest.details.get("empty_files") or []:
        if not isinstance(entry, list) or len(entry) != 3:
            raise IntegrityError("backup lists a malformed empty-file entry")
        parts = check_path(entry[0])
        if parts in seen:
            raise IntegrityError(f"backup lists {'/'.join(parts)!r} twice")
        seen.add(parts)
        empty.append((parts, _int(entry[1], "file mode"), _int(entry[2], "modification time")))
    return {"dirs": dirs, "files": files, "mapped": mapped, "empty": empty, "special": special}


class _Writer:
    """Writes the files of one plan below a folder, from up to ``jobs`` threads; with
    ``delta`` onto files already there (only what differs is fetched)."""

    def __init__(
        self,
        repo: Repository,
        enc: EncryptionConfig,
        root_fd: int,
        owner: fs.Owner,
        progress: Progress | None,
        delta: bool,
    ) -> None:
        self.repo, self.enc, self.owner, self.progress, self.delta = (
            repo,
            enc,
            owner,
            progress,
            delta,
        )
        self.tree = FolderTree(root_fd, owner)
        self._lock = threading.Lock()
        self.written = 0
        self.kept = 0  # delta: bytes already right on disk
        self.open_fds: set[int] = set()  # mapped files still being written

    def _open(self, parts: tuple[str, ...], mode: int) -> tuple[int, int]:
        """The file to write and the size it already has (0 for a new one)."""
        with self._lock:
            parent = self.tree.folder(parts[:-1])
        if self.delta:
            try:
                fd = os.open(parts[-1], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except FileNotFoundError:
                pass
            else:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    os.close(fd)
                    raise IntegrityError(f"{'/'.join(parts)!r} exists and is not a plain file")
                os.fchmod(fd, file_mode(mode))
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                return fd, info.st_size
        try:
            return fs.new_file(parent, parts[-1], mode=file_mode(mode), owner=self.owner), 0
        except FileExistsError:
            raise IntegrityError(f"{'/'.join(parts)!r} is listed twice") from None

    def whole(self, parts: tuple[str, ...], artifact: Artifact) -> None:
        fd, size = self._open(parts, int(artifact.meta["mode"]))
        try:
            if size == artifact.raw_size and sha256_of(fd, size)[0] == artifact.raw_sha256:
                self._count(0, size)
            else:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                sink = _FdSink(fd)
                self._read(artifact, sink)
                self._count(sink.written, 0)
            mtime = int(artifact.meta["mtime_ns"])
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def mapped(
        self, parts: tuple[str, ...], record: Artifact, sources: dict[str, Artifact]
    ) -> None:
        """A mapped file written by this task alone (delta: hashing the blocks already
        on disk is the larger part of the work, kept off the thread that plans)."""
        for task in self.mapped_tasks(parts, record, sources):
            task()

    def _read(self, artifact: Artifact, sink: Any) -> None:
        read_artifact(self.repo, artifact, sink, encryption=self.enc, progress=self.progress)

    def mapped_tasks(
        self, parts: tuple[str, ...], record: Artifact, sources: dict[str, Artifact]
    ) -> list[Callable[[], None]]:
        """A mapped file written by one task per source that holds blocks it needs, at
        once (each block has its own offset; with ``delta`` only blocks that differ
        from the file on disk); the last task to finish sets its mtime and closes it."""
        bmap = blocks.load_map(self.repo, record, self.enc)
        fd, size = self._open(parts, int(record.meta["mode"]))
        self.open_fds.add(fd)
        try:
            wanted = blocks.plan_mapped(fd, bmap, existing_size=size)
        except BaseException:
            self._close(fd)
            raise
        left, written = [len(wanted)], [0]
        mtime = int(record.meta["mtime_ns"])

        def done() -> None:
            self._count(0, bmap.size - written[0])
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                self._close(fd)

        def read(key: str, sink: Any) -> None:
            self._read(sources[key], sink)

        def one(source: int, slots: blocks.Slots) -> None:
            try:
                count = blocks.write_source(fd, bmap, source, slots, read)
                self._count(count, 0)
                with self._lock:
                    written[0] += count
            finally:
                with self._lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    done()

        if not wanted:
            done()
            return []
        return [functools.partial(one, s, slots) for s, slots in sorted(wanted.items())]

    def _close(self, fd: int) -> None:
        with self._lock:
            if fd not in self.open_fds:
                return
            self.open_fds.discard(fd)
        os.close(fd)

    def close(self) -> None:
        """Close files a failed restore left open (tasks cancelled), then the folders."""
        for fd in list(self.open_fds):
            self._close(fd)
        self.tree.close()

    def empty(self, parts: tuple[str, ...], mode: int, mtime: int) -> None:
        fd, _ = self._open(parts, mode)
        try:
            os.ftruncate(fd, 0)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _count(self, written: int, kept: int) -> None:
        with self._lock:
            self.written += written
            self.kept += kept


def write_files(
    repo: Repository,
    enc: EncryptionConfig,
    manifest: Manifest,
    root_fd: int,
    owner: fs.Owner = None,
    progress: Progress | None = None,
    *,
    jobs: int = 1,
    delta: bool = False,
) -> dict[str, Any]:
    """Write every file of ``manifest`` below the folder ``root_fd`` (empty and
    strongroom-made; with ``delta`` a data directory whose extra files are already
    removed): folders, data files from whichever backup stored them, empty files,
    ``backup_label`` and a non-empty ``tablespace_map``; ``global/pg_control`` last.
    Checks every path first."""
    plan = plan_files(manifest)
    started = time.monotonic()
    writer = _Writer(repo, enc, root_fd, owner, progress, delta)
    control = ("global", "pg_control")
    try:
        for parts, mode in plan["dirs"]:
            os.fchmod(writer.tree.folder(parts, dir_mode(mode)), dir_mode(mode))
        tasks: list[Callable[[], None]] = []
        last: list[Callable[[], None]] = []
        for parts, artifact in plan["files"]:
            task = functools.partial(writer.whole, parts, artifact)
            (last if parts == control else tasks).append(task)
        for parts, record, sources in plan["mapped"]:
            if delta:
                tasks.append(functools.partial(writer.mapped, parts, record, sources))
            else:
                tasks[:0] = writer.mapped_tasks(parts, record, sources)  # the largest first
        for parts, mode, mtime in plan["empty"]:
            tasks.append(functools.partial(writer.empty, parts, mode, mtime))
        run_all(tasks, jobs, "sr-restore")
        run_all(last, 1, "sr-restore")
        for name, artifact in plan["special"].items():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=root_fd)
            if name == chain.SPCMAP and artifact.raw_size == 0:
                continue  # no tablespaces: PostgreSQL writes no tablespace_map either
            fd = fs.new_file(root_fd, name, mode=0o600, owner=owner)
            try:
                read_artifact(repo, artifact, _FdSink(fd), encryption=enc)
            finally:
                os.close(fd)
    finally:
        writer.close()
    listed = [a for _, a in plan["files"]] + [m for _, m, _ in plan["mapped"]]
    return {
        "files": len(plan["files"]) + len(plan["mapped"]) + len(plan["empty"]),
        "folders": len(plan["dirs"]),
        "bytes": writer.written,
        "bytes_kept": writer.kept,
        "jobs": jobs,
        "referenced_from": sorted({owner_of(a) for a in listed} - {manifest.backup_id}),
        "seconds": round(time.monotonic() - started, 3),
    }


def load_checked(repo: Repository, target: str, backup_id: str) -> Manifest:
    """A trusted files backup whose chain is whole, and whose every path is acceptable:
    everything a restore refuses, refused before it writes."""
    manifest = Catalog(repo).resolve(backup_id, chain.ENGINE, target, kind=chain.KIND)
    chain.check_chain(repo, manifest)
    plan_files(manifest)
    return manifest


def _check_empty(data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir() or data_dir.is_symlink():
            raise InvalidInput(f"{data_dir} exists and is not a plain directory")
        entries = sorted(p.name for p in data_dir.iterdir())
        if entries:
            raise TargetNotEmpty(
                f"data directory {data_dir} is not empty ({', '.join(entries[:5])}); "
                "a files backup restores only into an empty one"
            )


def restore_files_backup(
    repo: Repository,
    enc: EncryptionConfig,
    target: str,
    backup_id: str,
    data_dir: str,
    *,
    os_user: str | None = None,
    progress: Progress | None = None,
    jobs: int = 1,
    delta: bool = False,
) -> dict[str, Any]:
    """Restore the files of one backup (any of a chain) into the empty ``data_dir``, or
    with ``delta`` onto a stale copy of the same cluster there (only what differs is
    fetched, what the backup lacks removed), without recovery settings (``pitr_restore``
    adds those and starts the server)."""
    manifest = load_checked(repo, target, backup_id)
    path = Path(data_dir).absolute()
    if delta and path.is_dir() and any(path.iterdir()):
        report = delta_files(repo, enc, manifest, path, os_user, progress, jobs)
        stale_copy.finish(path)
        return {"backup_id": manifest.backup_id, "data_dir": str(path), **report}
    _check_empty(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = fs.owner_of(os_user)
    data_fd = fs.open_dir(path)
    staging = tempfile.mkdtemp(prefix=".strongroom-files-", dir=path)
    stage_fd = fs.open_dir(os.path.basename(staging), data_fd)
    moved = False
    try:
        os.fchmod(data_fd, 0o700)
        report = write_files(repo, enc, manifest, stage_fd, owner, progress, jobs=jobs)
        if owner is not None:
            os.fchown(data_fd, *owner)
        moved = True
        for entry in os.listdir(stage_fd):
            os.rename(entry, entry, src_dir_fd=stage_fd, dst_dir_fd=data_fd)
        os.rmdir(os.path.basename(staging), dir_fd=data_fd)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if moved:
            for entry in os.listdir(data_fd):
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry, dir_fd=data_fd)
                with contextlib.suppress(OSError):
                    os.unlink(entry, dir_fd=data_fd)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    finally:
        os.close(stage_fd)
        os.close(data_fd)
    return {"backup_id": manifest.backup_id, "data_dir": str(path), **report}


def delta_files(
    repo: Repository,
    enc: EncryptionConfig,
    manifest: Manifest,
    path: Path,
    os_user: str | None,
    progress: Progress | None,
    jobs: int,
) -> dict[str, Any]:
    """Bring the existing data directory ``path`` to ``manifest`` (``delta``): checked
    and cleaned first, then only differing files and blocks fetched. A failure leaves a
    directory without ``global/pg_control`` (PostgreSQL will not start it) that a second
    run finishes."""
    plan = plan_files(manifest)
    removed = stale_copy.prepare(path, manifest, plan)
    owner = fs.owner_of(os_user)
    data_fd = fs.open_dir(path)
    try:
        os.fchmod(data_fd, 0o700)
        report = write_files(repo, enc, manifest, data_fd, owner, progress, jobs=jobs, delta=True)
    finally:
        os.close(data_fd)
    return {**report, "delta": removed}
