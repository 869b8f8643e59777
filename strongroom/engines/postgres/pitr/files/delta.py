"""Delta restore: bring an existing data directory (a stale copy, an old replica) to a
files backup by fetching only what differs, as pgBackRest's ``--delta`` does.

Before anything is changed the directory is checked: a plain folder without symlinks,
no ``postmaster.pid`` (a server that owns it, or one that crashed: either way not ours
to overwrite), and ``global/pg_control`` of the same database system as the backup (a
directory of another cluster would be rewritten almost whole, and is most likely a
mistake). Then ``global/pg_control`` is removed first, so a delta restore that fails
half way leaves a directory PostgreSQL refuses to start (it is written back last, by
``restore.write_files``); files and folders the backup does not list are removed (old
WAL in ``pg_wal`` too: replaying a stale history would be wrong), and every listed file
is compared with the backup (SHA-256 of a whole file, per 8 KiB block for a block map)
and fetched only where it differs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from strongroom.catalog import Manifest
from strongroom.engines.postgres.pitr.files.walk import system_identifier_of
from strongroom.errors import InvalidInput
from strongroom.sizes import human_size

CONTROL = "global/pg_control"
MARKER = ".strongroom-delta"  # a delta restore is under way (pg_control removed)


def check_target(path: Path, manifest: Manifest) -> None:
    """Refuse a directory a delta restore must not touch (nothing is changed)."""
    if not path.is_dir() or path.is_symlink():
        raise InvalidInput(f"{path} is not a plain directory")
    pid = path / "postmaster.pid"
    if pid.exists() or pid.is_symlink():
        raise InvalidInput(
            f"{path} has a postmaster.pid: a PostgreSQL server owns it (stop it first; if "
            "it crashed, start and stop it cleanly or remove the file yourself)"
        )
    found = system_identifier_of(path)
    wanted = int(manifest.details.get("system_identifier", 0))
    if found is None:
        if (path / MARKER).exists():
            return  # a delta restore into it failed after checking it: run it again
        raise InvalidInput(f"{path} has no readable {CONTROL}: not a PostgreSQL data directory")
    if found != wanted:
        raise InvalidInput(
            f"{path} belongs to database system {found}, backup {manifest.backup_id} to "
            f"{wanted}: a delta restore only refreshes a copy of the same cluster"
        )


def _listed(plan: dict[str, Any]) -> tuple[set[str], set[str]]:
    files = {"/".join(parts) for parts, _ in plan["files"]}
    files |= {"/".join(parts) for parts, _, _ in plan["mapped"]}
    files |= {"/".join(parts) for parts, _, _ in plan["empty"]}
    folders = {"/".join(parts) for parts, _ in plan["dirs"]}
    for name in files | set(folders):
        parts = name.split("/")
        folders |= {"/".join(parts[:i]) for i in range(1, len(parts))}
    return files, folders


def extras(path: Path, plan: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Files and folders below ``path`` the backup does not list (a symlink anywhere is
    refused: tablespaces and relocated WAL are not restored by delta)."""
    files, folders = _listed(plan)
    extra_files: list[str] = []
    extra_dirs: list[str] = []
    for top, dirnames, filenames in os.walk(path, followlinks=False):
        rel = os.path.relpath(top, path)
        rel = "" if rel == "." else rel + "/"
        for name in list(dirnames):
            full = os.path.join(top, name)
            if os.path.islink(full):
                raise InvalidInput(
                    f"{rel}{name} is a symlink: delta restore needs a plain data directory "
                    "(restore into an empty one instead)"
                )
            if rel + name not in folders:
                extra_dirs.append(rel + name)
                dirnames.remove(name)
        for name in filenames:
            mode = os.lstat(os.path.join(top, name)).st_mode
            if stat.S_ISLNK(mode):
                raise InvalidInput(f"{rel}{name} is a symlink: delta restore refuses it")
            if rel + name not in files:
                extra_files.append(rel + name)
    return extra_files, extra_dirs


def prepare(path: Path, manifest: Manifest, plan: dict[str, Any]) -> dict[str, Any]:
    """Check ``path`` (``check_target``), then remove ``pg_control`` and whatever the
    backup does not list. Returns what was removed."""
    check_target(path, manifest)
    extra_files, extra_dirs = extras(path, plan)
    extra_files = [name for name in extra_files if name != MARKER]
    (path / MARKER).touch(mode=0o600)
    (path / CONTROL).unlink(missing_ok=True)
    removed = 0
    for name in extra_files:
        full = path / name
        removed += full.lstat().st_size
        full.unlink()
    for name in sorted(extra_dirs, key=len, reverse=True):
        for top, _dirs, names in os.walk(path / name, topdown=False):
            for each in names:
                os.unlink(os.path.join(top, each))
            os.rmdir(top)
    return {
        "removed_files": len(extra_files),
        "removed_folders": len(extra_dirs),
        "removed": human_size(removed),
        "removed_names": sorted(extra_files + extra_dirs)[:50],
    }


def finish(path: Path) -> None:
    """The delta restore is complete: its marker goes."""
    (path / MARKER).unlink(missing_ok=True)
