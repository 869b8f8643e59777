"""Which files of a PostgreSQL data directory a file-level backup copies, and which it
leaves out.

The exclusions are PostgreSQL's own (``src/backend/backup/basebackup.c`` of 15, which
pgBackRest follows too): everything left out is either recreated empty by the server
at startup, rebuilt by WAL replay, or describes the running server rather than the
database (``postmaster.pid``), so a restore would be wrong *with* it:

* the contents of ``pg_wal`` (WAL comes from the archive, replayed from the backup's
  start), ``pg_dynshmem``, ``pg_notify``, ``pg_replslot``, ``pg_serial``,
  ``pg_snapshots``, ``pg_stat_tmp`` and ``pg_subtrans`` (the folders themselves are
  kept: the server expects them);
* ``postmaster.pid`` / ``.opts``, ``backup_label`` / ``tablespace_map`` /
  ``backup_manifest`` left on disk (the backup's own label comes from
  ``pg_backup_stop``), ``*.tmp`` files of the config writers, ``pg_internal.init``
  relcache files, the signal files (strongroom writes those at restore);
* temporary files and folders (``pgsql_tmp*``) and temporary relations
  (``t<backend>_<relfilenode>``);
* the main, FSM and VM forks of unlogged relations: only their ``_init`` fork is
  copied, and the server resets the relation from it at the end of recovery.

Tablespaces (``pg_tblspc/<oid>`` links) are refused for now, as are other symlinks;
sockets and fifos are skipped like pg_basebackup does. A file that disappears while
the directory is walked was dropped concurrently: WAL replay drops it again.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass, field

from strongroom.errors import InvalidInput

EXCLUDED_DIR_CONTENTS = frozenset(
    {
        "pg_dynshmem",
        "pg_notify",
        "pg_replslot",
        "pg_serial",
        "pg_snapshots",
        "pg_stat_tmp",
        "pg_subtrans",
        "pg_wal",
    }
)
EXCLUDED_FILES = frozenset(
    {
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "tablespace_map",
        "backup_manifest",
        "backup_label.old",
        "tablespace_map.old",
        "postgresql.auto.conf.tmp",
        "current_logfiles.tmp",
        "recovery.signal",
        "standby.signal",
    }
)
TEMP_PREFIX = "pgsql_tmp"
RELCACHE_INIT = "pg_internal.init"
_TEMP_RELATION = re.compile(r"^t[0-9]+_[0-9]+(_(fsm|vm|init))?(\.[0-9]+)?$")
_RELATION = re.compile(r"^([0-9]+)(_(fsm|vm|init))?(\.[0-9]+)?$")
_DB_DIR = re.compile(r"^base/[0-9]+$")


@dataclass(frozen=True)
class FileStat:
    """One regular file as the walk saw it (path relative to the data directory)."""

    path: str
    size: int
    mtime_ns: int
    mode: int


@dataclass
class Tree:
    """Everything a backup records about the data directory's layout."""

    files: list[FileStat] = field(default_factory=list)
    directories: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _unlogged(names: list[str]) -> set[str]:
    """Files of a database folder that belong to unlogged relations and are not their
    ``_init`` fork (the relfilenodes that have an ``_init`` file)."""
    inits = {m.group(1) for n in names if (m := _RELATION.match(n)) and m.group(3) == "init"}
    if not inits:
        return set()
    return {
        n
        for n in names
        if (m := _RELATION.match(n)) and m.group(1) in inits and m.group(3) != "init"
    }


def excluded_file(rel: str, name: str) -> bool:
    """True when the file ``name`` at ``rel`` is never copied."""
    if rel.count("/") == 0 and name in EXCLUDED_FILES:
        return True
    return (
        name.startswith(TEMP_PREFIX)
        or name == RELCACHE_INIT
        or (rel.startswith("base/") and _TEMP_RELATION.match(name) is not None)
    )


def walk_data_directory(root: str) -> Tree:
    """The files and folders to back up below ``root``, sorted by path."""
    tree = Tree()
    try:
        top = os.stat(root, follow_symlinks=True)
    except OSError as exc:
        raise InvalidInput(f"cannot read the data directory {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode) or not os.access(root, os.R_OK | os.X_OK):
        raise InvalidInput(f"the data directory {root} is not a folder this runner can read")
    _walk(root, "", tree)
    tree.files.sort(key=lambda f: f.path)
    tree.directories.sort()
    return tree


def _walk(root: str, rel: str, tree: Tree) -> None:
    folder = os.path.join(root, rel) if rel else root
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return  # dropped while walking (e.g. a database folder)
    except PermissionError:
        raise InvalidInput(f"the runner cannot read {folder} (permission denied)") from None
    names = [e.name for e in entries]
    unlogged = _unlogged(names) if _DB_DIR.match(rel) else set()
    for entry in entries:
        path = f"{rel}/{entry.name}" if rel else entry.name
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            _symlink(root, rel, entry.name, path, tree)
        elif stat.S_ISDIR(info.st_mode):
            if entry.name.startswith(TEMP_PREFIX):
                continue
            tree.directories.append((path, stat.S_IMODE(info.st_mode)))
            if rel == "" and entry.name in EXCLUDED_DIR_CONTENTS:
                if entry.name == "pg_wal":
                    tree.directories.append(("pg_wal/archive_status", 0o700))
                continue
            if rel == "" and entry.name == "pg_tblspc":
                _tablespaces(os.path.join(root, path))
            _walk(root, path, tree)
        elif stat.S_ISREG(info.st_mode):
            if excluded_file(rel, entry.name) or entry.name in unlogged:
                continue
            tree.files.append(
                FileStat(path, info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode))
            )
        else:
            tree.skipped.append(path)  # sockets, fifos: pg_basebackup skips them too


def _symlink(root: str, rel: str, name: str, path: str, tree: Tree) -> None:
    if path == "pg_wal":  # initdb -X: WAL elsewhere; the backup holds an empty pg_wal
        tree.directories.append(("pg_wal", 0o700))
        tree.directories.append(("pg_wal/archive_status", 0o700))
        return
    if rel == "pg_tblspc":
        _tablespaces(os.path.join(root, rel))
    raise InvalidInput(
        f"the data directory holds a symlink {path!r}; file-level backups copy plain "
        "files and folders only"
    )


def _tablespaces(folder: str) -> None:
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    if entries:
        raise InvalidInput(
            f"the cluster has tablespace(s) {', '.join(sorted(entries)[:5])} in pg_tblspc; "
            "file-level backups support the default tablespaces only (for now)"
        )


def system_identifier_of(data_directory: str | os.PathLike[str]) -> int | None:
    """The system identifier in ``global/pg_control`` (its first 8 bytes), None when
    that file is missing or shorter; an unreadable one is an ``InvalidInput``. A backup
    proves with it that the folder it reads belongs to the server it talks to, a delta
    restore that the copy it refreshes is of the backup's cluster."""
    path = os.path.join(data_directory, "global", "pg_control")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path} ({exc.strerror})") from None
    return int(struct.unpack("<Q", head)[0]) if len(head) == 8 else None
