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
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Artifact, Catalog, Manifest, owner_of
from strongroom.config import EncryptionConfig
from strongroom.engines.postgres import root_fs as fs
from strongroom.engines.postgres.pitr.extract import FolderTree, dir_mode, file_mode
from strongroom.engines.postgres.pitr.files import chain
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


def plan_files(manifest: Manifest) -> dict[str, Any]:
    """Every path of the backup checked (nothing is written): folders, files with their
    artifacts, empty files, label and map. Raises IntegrityError on the first bad one."""
    if manifest.kind != chain.KIND:
        raise InvalidInput(f"backup {manifest.backup_id} is a {manifest.kind} backup, not files")
    seen: set[tuple[str, ...]] = set()
    dirs: list[tuple[tuple[str, ...], int]] = []
    for entry in manifest.details.get("directories") or []:
        if not isinstance(entry, list) or len(entry) != 2:
            raise IntegrityError("backup lists a malformed folder entry")
        dirs.append((check_path(entry[0], what="folder"), _int(entry[1], "folder mode")))
    files: list[tuple[tuple[str, ...], Artifact]] = []
    special: dict[str, Artifact] = {}
    for artifact in manifest.artifacts:
        if artifact.content == chain.CONTENT_FILE:
            parts = check_path(artifact.meta.get("path"))
            _int(artifact.meta.get("mode"), "file mode")
            _int(artifact.meta.get("mtime_ns"), "modification time")
            if parts in seen:
                raise IntegrityError(f"backup lists {'/'.join(parts)!r} twice")
            seen.add(parts)
            files.append((parts, artifact))
        elif artifact.content in (chain.CONTENT_LABEL, chain.CONTENT_SPCMAP):
            if artifact.name in special or artifact.name not in _OWN_ARTIFACTS:
                raise IntegrityError(f"backup lists a second or odd {artifact.name[:40]!r}")
            special[artifact.name] = artifact
        else:
            raise IntegrityError(f"backup lists an artifact of content {artifact.content[:40]!r}")
    if chain.LABEL not in special:
        raise IntegrityError(f"backup {manifest.backup_id} has no backup_label")
    empty: list[tuple[tuple[str, ...], int, int]] = []
    for entry in manifest.details.get("empty_files") or []:
        if not isinstance(entry, list) or len(entry) != 3:
            raise IntegrityError("backup lists a malformed empty-file entry")
        parts = check_path(entry[0])
        if parts in seen:
            raise IntegrityError(f"backup lists {'/'.join(parts)!r} twice")
        seen.add(parts)
        empty.append((parts, _int(entry[1], "file mode"), _int(entry[2], "modification time")))
    return {"dirs": dirs, "files": files, "empty": empty, "special": special}


def _new_file(tree: FolderTree, parts: tuple[str, ...], mode: int, owner: fs.Owner) -> int:
    parent = tree.folder(parts[:-1])
    try:
        return fs.new_file(parent, parts[-1], mode=file_mode(mode), owner=owner)
    except FileExistsError:
        raise IntegrityError(f"{'/'.join(parts)!r} is listed twice") from None


def write_files(
    repo: Repository,
    enc: EncryptionConfig,
    manifest: Manifest,
    root_fd: int,
    owner: fs.Owner = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write every file of ``manifest`` below the (empty, strongroom-made) folder
    ``root_fd``: folders, data files from whichever backup stored them, empty files,
    ``backup_label`` and a non-empty ``tablespace_map``. Checks every path first."""
    plan = plan_files(manifest)
    started = time.monotonic()
    tree = FolderTree(root_fd, owner)
    written = 0
    try:
        for parts, mode in plan["dirs"]:
            os.fchmod(tree.folder(parts, dir_mode(mode)), dir_mode(mode))
        for parts, artifact in plan["files"]:
            fd = _new_file(tree, parts, int(artifact.meta["mode"]), owner)
            try:
                sink = _FdSink(fd)
                read_artifact(repo, artifact, sink, encryption=enc, progress=progress)
                mtime = int(artifact.meta["mtime_ns"])
                os.utime(fd, ns=(mtime, mtime))
                written += sink.written
            finally:
                os.close(fd)
        for parts, mode, mtime in plan["empty"]:
            fd = _new_file(tree, parts, mode, owner)
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        for name, artifact in plan["special"].items():
            if name == chain.SPCMAP and artifact.raw_size == 0:
                continue  # no tablespaces: PostgreSQL writes no tablespace_map either
            fd = _new_file(tree, (name,), 0o600, owner)
            try:
                read_artifact(repo, artifact, _FdSink(fd), encryption=enc)
            finally:
                os.close(fd)
    finally:
        tree.close()
    return {
        "files": len(plan["files"]) + len(plan["empty"]),
        "folders": len(plan["dirs"]),
        "bytes": written,
        "referenced_from": sorted({owner_of(a) for _, a in plan["files"]} - {manifest.backup_id}),
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
) -> dict[str, Any]:
    """Restore the files of one backup (any of a chain) into the empty ``data_dir``,
    without recovery settings (``pitr_restore`` adds those and starts the server)."""
    manifest = load_checked(repo, target, backup_id)
    path = Path(data_dir).absolute()
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
        report = write_files(repo, enc, manifest, stage_fd, owner, progress)
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
