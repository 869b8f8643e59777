"""File restores into a Redis with ``appendonly yes``: the multi-part AOF rewritten around
the restored RDB, so the server loads the restored data at start and never an older AOF.

Redis 7 keeps its AOF in a folder (``appenddirname`` under ``dir``) described by a
manifest (``<appendfilename>.manifest``) that lists one base file (an RDB,
``type b``) and the increments (``type i``) written since. At start a server with
``appendonly yes`` loads that folder and ignores ``dbfilename``. A file restore
therefore builds a new folder holding the restored RDB as its only base file
(hard-linked to the restored ``dump.rdb``: no second copy) and a manifest naming
just that file, then swaps it for the old folder while the server is stopped
(the old one is kept as ``<appenddirname>.pre-restore-<backup id>``, or removed
with ``keep_previous=False``). The server opens a new increment file at start
and goes on appending to it. Redis before 7.0 (one AOF file) is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from strongroom.engines.redis.conn import config_value
from strongroom.engines.redis.rdb import parse_version
from strongroom.errors import InvalidInput


@dataclass
class AofLayout:
    """Where the target keeps its AOF, as the runner sees it."""

    folder: Path  # <dir>/<appenddirname>
    filename: str  # appendfilename (the manifest is <filename>.manifest)

    @property
    def base_name(self) -> str:
        return f"{self.filename}.1.base.rdb"

    @property
    def manifest_name(self) -> str:
        return f"{self.filename}.manifest"

    def facts(self) -> dict[str, Any]:
        return {"aof_dir": str(self.folder), "appendfilename": self.filename}


def aof_layout(client: redis.Redis, data_path: Path, version: str) -> AofLayout:
    """The target's AOF folder (``appendonly yes`` was read already); refused before 7.0."""
    if parse_version(version) < (7, 0, 0):
        raise InvalidInput(
            f"the target runs Redis {version} with appendonly yes: file restores rewrite the "
            "multi-part AOF of Redis 7+ only. Disable AOF for the restore (CONFIG SET "
            "appendonly no, and in its config file) or use mode=live. Nothing was changed"
        )
    dirname = config_value(client, "appenddirname") or "appendonlydir"
    filename = config_value(client, "appendfilename") or "appendonly.aof"
    if "/" in dirname or dirname in (".", "..") or "/" in filename or not filename:
        raise InvalidInput(f"unexpected appenddirname/appendfilename {dirname!r}/{filename!r}")
    return AofLayout(folder=data_path.parent / dirname, filename=filename)


def stage_aof(layout: AofLayout, rdb: Path, backup_id: str) -> Path:
    """A new AOF folder next to the old one: the restored RDB as its base, a manifest."""
    staged = layout.folder.with_name(f"{layout.folder.name}.restore-{backup_id}")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(mode=0o700)
    try:
        try:
            os.link(rdb, staged / layout.base_name)
        except OSError:
            shutil.copyfile(rdb, staged / layout.base_name)
        manifest = staged / layout.manifest_name
        with open(manifest, "w", encoding="ascii") as handle:
            handle.write(f"file {layout.base_name} seq 1 type b\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def previous_aof(layout: AofLayout, backup_id: str) -> Path:
    return layout.folder.with_name(f"{layout.folder.name}.pre-restore-{backup_id}")


def swap_aof(layout: AofLayout, staged: Path, backup_id: str) -> bool:
    """Old folder aside, staged folder in place (server stopped); True if one was moved."""
    moved = False
    if layout.folder.exists():
        os.replace(layout.folder, previous_aof(layout, backup_id))
        moved = True
    os.replace(staged, layout.folder)
    return moved


def unswap_aof(layout: AofLayout, backup_id: str, had_previous: bool) -> str:
    """Rollback: the restored folder aside, the previous one back."""
    failed = layout.folder.with_name(f"{layout.folder.name}.failed-restore")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(failed)
    if layout.folder.exists():
        os.replace(layout.folder, failed)
    if had_previous:
        os.replace(previous_aof(layout, backup_id), layout.folder)
        return "previous AOF folder put back"
    return "restored AOF folder moved aside"


def drop_staged(layout: AofLayout, backup_id: str) -> None:
    shutil.rmtree(
        layout.folder.with_name(f"{layout.folder.name}.restore-{backup_id}"), ignore_errors=True
    )
