"""The answers ``strongroom-wal`` gives without starting any machinery.

* push: the pusher already stored this very file (an ``ok`` marker that is a hard
  link to it, or a text record of its size, mtime, inode and repository) -> 0.
* fetch: the fetcher already verified this file into the cache -> rename it to
  ``%p`` -> 0.

Only ``os`` is used: this is what PostgreSQL waits for once per WAL file, and
Python's own start-up is the bulk of it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from strongroom.engines.postgres.wal.config import WalConfig

MARKER_VERSION = "srwal-ok-1"


def push_dir(cfg: WalConfig, pg_wal: str) -> str:
    return os.path.join(cfg.spool_base(pg_wal), "push")


def fetch_dir(cfg: WalConfig, pg_wal: str) -> str:
    return os.path.join(cfg.spool_base(pg_wal), "fetch")


def file_identity(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def format_marker(identity: tuple[int, int, int], repo_id: str, sha256: str) -> str:
    size, mtime_ns, ino = identity
    return f"{MARKER_VERSION} {size} {mtime_ns} {ino} {repo_id} {sha256}\n"


def marker_matches(marker_path: str, wal_path: str, repo_id: str) -> bool:
    """True when the marker says: this very file went durably into the repository.

    The pusher's marker is a hard link to the WAL file it stored (so the shell can
    check it with ``[ MARKER -ef %p ]``: same inode, without starting anything); where
    hard links are not possible it is a text record of size, mtime, inode and
    repository."""
    try:
        marker = os.stat(marker_path)
        wal = os.stat(wal_path)
    except OSError:
        return False
    if (marker.st_dev, marker.st_ino) == (wal.st_dev, wal.st_ino):
        return True
    try:
        with open(marker_path) as f:
            parts = f.read().split()
        if len(parts) != 6 or parts[0] != MARKER_VERSION or parts[4] != repo_id:
            return False
        return (int(parts[1]), int(parts[2]), int(parts[3])) == file_identity(wal_path)
    except (OSError, ValueError):
        return False


def ok_dir(push_root: str, repo_id: str) -> str:
    """Where the markers of files stored in one repository (and target) live."""
    return os.path.join(push_root, f"ok-{repo_id}")


def push_fast(cfg: WalConfig, wal_path: str) -> bool:
    """True when ``wal_path`` is already archived (by the pusher, ahead of this call)."""
    path = os.path.abspath(wal_path)
    pg_wal, name = os.path.split(path)
    marker = os.path.join(ok_dir(push_dir(cfg, pg_wal), cfg.repo_id), name)
    return marker_matches(marker, path, cfg.repo_id)


def fetch_fast(cfg: WalConfig, name: str, dest_path: str) -> bool:
    """True when ``name`` was waiting, verified, in the cache and is now at ``dest_path``."""
    dest = os.path.abspath(dest_path)
    folder = fetch_dir(cfg, os.path.dirname(dest))
    if "/" in name or name.startswith("."):
        return False
    try:
        os.replace(os.path.join(folder, "cache", name), dest)
    except OSError:
        return False
    took = os.path.join(folder, "took")
    tmp = f"{took}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, took)  # the fetcher moves its prefetch window on
    except OSError:
        pass
    return True


def archive_command(
    command: str = "strongroom-wal", config: str | None = None, repo_id: str | None = None
) -> str:
    """``archive_command`` for postgresql.conf. With ``repo_id`` (the configuration's
    repository id, see ``WalConfig.repo_id``; ``strongroom wal-config`` prints the
    line) the shell's own ``-ef`` test answers for files the pusher already stored
    in that repository (same inode as the marker), so most calls under a backlog start
    no process at all; everything else runs ``strongroom-wal push``. If the
    configuration later points elsewhere the test simply stops matching. Assumes the
    default spool (``pg_wal/strongroom``); archive_command runs in the data directory."""
    import shlex

    option = f" --config {shlex.quote(config)}" if config else ""
    full = f"{command} push{option} %p"
    if not repo_id:
        return full
    marker = f"pg_wal/strongroom/push/ok-{repo_id}/%f"
    return f"[ {marker} -ef %p ] || {full}"
