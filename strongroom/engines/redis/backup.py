"""Redis backup: an RDB snapshot streamed over the replication protocol, with fallbacks.

Methods, tried in this order by ``auto`` (the manifest records which one ran
and why the others did not):

1. ``sync``: a full resynchronization as a replica would get it (PSYNC, or SYNC
   on old servers), payload streamed straight into the repository; the RDB's
   CRC64 is checked as the last bytes pass.
2. ``bgsave``: when the server refuses replication but the runner shares its
   data volume: BGSAVE, wait for it, stream the new RDB file.
3. ``logical``: SCAN + PTTL + DUMP per key into the framed format of
   ``redis_logical`` (for managed Redis that forbids both).

Importing this module registers the verify checks for ``redis-rdb`` and
``redis-logical`` artifacts.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import redis

from strongroom.artifacts import claim_backup_id, publish_backup, storage_settings, store_artifact
from strongroom.catalog import Artifact, Manifest, data_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.redis.conn import (
    BackupMethod,
    RedisConnection,
    config_value,
    is_refusal,
    keyspace,
    redis_errors,
    server_info,
)
from strongroom.engines.redis.logical import CONTENT_LOGICAL, LogicalCheck, LogicalExport
from strongroom.engines.redis.rdb import CONTENT_RDB, RdbCheck, RdbTracker, max_rdb_version
from strongroom.engines.redis.sync import ReplicationSnapshot, SyncRefused, check_complete
from strongroom.errors import InvalidInput, ServiceUnavailable, StrongroomError, ToolFailed
from strongroom.ids import new_backup_id
from strongroom.pipeline import Progress
from strongroom.redact import register
from strongroom.repository.base import Repository, StorageSettings
from strongroom.verify import register_check

ENGINE = "redis"
ARTIFACT_RDB = "dump.rdb"
ARTIFACT_LOGICAL = "keys.srlog"
BGSAVE_TIMEOUT = 3600.0
METHODS = ("auto", "sync", "bgsave", "logical")

ProgressFactory = Callable[[str, int | None], Progress]
log = logging.getLogger("strongroom.redis")

register_check(CONTENT_RDB, RdbCheck)
register_check(CONTENT_LOGICAL, LogicalCheck)


class MethodUnavailable(StrongroomError):
    """A backup method cannot be used against this server from this runner."""


class _FileSource:
    """Reads an RDB file, following it with an RdbTracker (CRC checked at the end)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.tracker = RdbTracker()
        self.facts: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.handle.read(n if n and n > 0 else 1024 * 1024)
            if data:
                self.tracker.update(data)
            elif self.facts is None:
                self.facts = self.tracker.finish()
            return data
        except BaseException as exc:
            self.error = exc
            raise

    def readable(self) -> bool:
        return True


def _store(
    source: Any,
    repo: Repository,
    key: str,
    enc: EncryptionConfig,
    *,
    name: str,
    content: str,
    level: int,
    settings: StorageSettings,
    progress: Progress | None,
    meta: dict[str, object],
) -> Artifact:
    """store_artifact, re-raising the source's own error (the pipeline wraps it)."""
    try:
        return store_artifact(
            repo,
            key,
            source,
            name=name,
            content=content,
            encryption=enc,
            level=level,
            settings=settings,
            progress=progress,
            meta=meta,
        )
    except BaseException:
        if getattr(source, "error", None) is not None:
            raise source.error from None
        raise


def _server_facts(conn: RedisConnection, info: dict[str, Any]) -> dict[str, Any]:
    version = str(info.get("redis_version", "0"))
    return {
        "host": conn.host,
        "port": conn.port,
        "version": version,
        "mode": info.get("redis_mode", "standalone"),
        "role": info.get("role"),
        "os": info.get("os"),
        "used_memory": info.get("used_memory"),
        "used_memory_human": info.get("used_memory_human"),
        "maxmemory": info.get("maxmemory"),
        "aof_enabled": bool(info.get("aof_enabled", 0)),
        "max_rdb_version": max_rdb_version(version),
        "tls": conn.tls,
    }


def _ks_json(ks: dict[int, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {str(db): v for db, v in sorted(ks.items())}


def _via_sync(
    conn: RedisConnection,
    repo: Repository,
    key: str,
    enc: EncryptionConfig,
    *,
    level: int,
    settings: StorageSettings,
    progress: Progress | None,
) -> tuple[Artifact, dict[str, Any]]:
    snap = ReplicationSnapshot(conn)
    facts = snap.open()  # SyncRefused here, before any byte is stored
    try:
        artifact = _store(
            snap,
            repo,
            key,
            enc,
            name=ARTIFACT_RDB,
            content=CONTENT_RDB,
            level=level,
            settings=settings,
            progress=progress,
            meta={"method": "sync"},
        )
    finally:
        snap.close()
    try:
        check_complete(snap)
    except BaseException:
        repo.delete(key)
        raise
    details = {
        "method": "sync",
        "sync": {
            "command": facts.get("command"),
            "transfer": facts.get("transfer"),
            "rdb_only": facts.get("rdb_only"),
            "replid": facts.get("replid"),
            "offset": facts.get("offset"),
        },
        "rdb": facts["rdb"],
    }
    if facts.get("keyspace") is not None:
        details["keyspace"] = _ks_json(facts["keyspace"])
        details["keyspace_source"] = "INFO keyspace on the replication connection before PSYNC"
    return artifact, details


def _shared_rdb_path(conn: RedisConnection, client: redis.Redis) -> Path:
    if conn.data_path:
        path = Path(conn.data_path)
        if not path.parent.is_dir():
            raise MethodUnavailable(
                f"data_path {path} is not reachable from this runner (no folder {path.parent})"
            )
        return path
    try:
        with redis_errors("CONFIG GET dir"):
            folder = config_value(client, "dir")
            dbfile = config_value(client, "dbfilename")
    except ToolFailed as exc:
        raise MethodUnavailable(f"CONFIG GET refused and no data_path configured ({exc})") from None
    except StrongroomError as exc:
        raise MethodUnavailable(f"cannot ask the server for its data dir ({exc})") from None
    if not folder or not dbfile:
        raise MethodUnavailable("the server did not report its data dir")
    path = Path(folder) / dbfile
    if not path.parent.is_dir():
        raise MethodUnavailable(
            f"the server's data dir {folder} is not visible from this runner "
            "(set data_path to where the runner mounts it)"
        )
    return path


def _persistence(client: redis.Redis) -> dict[str, Any]:
    with redis_errors("INFO persistence"):
        info: dict[str, Any] = client.info("persistence")
    return info


def _wait_bgsave_idle(client: redis.Redis, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = _persistence(client)
        if not int(info.get("rdb_bgsave_in_progress", 0)):
            return info
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"a background save is still running after {timeout:.0f} s")
        time.sleep(0.1)


def _run_bgsave(client: redis.Redis, timeout: float) -> dict[str, Any]:
    """BGSAVE and wait for it; returns INFO persistence afterwards."""
    deadline = time.monotonic() + timeout
    before = _wait_bgsave_idle(client, timeout)
    saves_before = before.get("rdb_saves")
    schedule = False
    while True:
        try:
            if schedule:
                client.execute_command("BGSAVE", "SCHEDULE")
            else:
                client.bgsave()
            break
        except redis.ResponseError as exc:
            text = str(exc)
            if is_refusal(exc):
                raise MethodUnavailable(f"BGSAVE refused ({text})") from None
            if "already in progress" in text:
                _wait_bgsave_idle(client, max(1.0, deadline - time.monotonic()))
            elif "AOF" in text or "append only" in text.lower():
                schedule = True
            else:
                raise ToolFailed(f"BGSAVE failed: {text}") from None
            if time.monotonic() > deadline:
                raise ServiceUnavailable("BGSAVE could not start in time") from None
            time.sleep(0.1)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable(f"BGSAVE: server unreachable ({exc})") from None
    time.sleep(0.05)
    while True:
        info = _persistence(client)
        done = not int(info.get("rdb_bgsave_in_progress", 0))
        if done and (saves_before is None or int(info.get("rdb_saves", 0)) > int(saves_before)):
            break
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"BGSAVE did not finish within {timeout:.0f} s")
        time.sleep(0.05)
    if info.get("rdb_last_bgsave_status") != "ok":
        raise ToolFailed(
            f"BGSAVE failed on the server (rdb_last_bgsave_status="
            f"{info.get('rdb_last_bgsave_status')}); see the server's log"
        )
    return info


def _via_bgsave(
    conn: RedisConnection,
    client: redis.Redis,
    repo: Repository,
    key: str,
    enc: EncryptionConfig,
    *,
    level: int,
    settings: StorageSettings,
    progress: Progress | None,
) -> tuple[Artifact, dict[str, Any]]:
    path = _shared_rdb_path(conn, client)
    _wait_bgsave_idle(client, BGSAVE_TIMEOUT)
    with redis_errors("INFO keyspace"):
        ks = keyspace(client.info("keyspace"))
    started = time.time()
    _run_bgsave(client, BGSAVE_TIMEOUT)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise MethodUnavailable(f"cannot read {path} after BGSAVE ({exc})") from None
    with handle:
        stat = os.fstat(handle.fileno())
        if stat.st_mtime < started - 2:
            raise MethodUnavailable(
                f"{path} was not rewritten by the BGSAVE: this runner does not see the "
                "server's data volume"
            )
        source = _FileSource(handle)
        artifact = _store(
            source,
            repo,
            key,
            enc,
            name=ARTIFACT_RDB,
            content=CONTENT_RDB,
            level=level,
            settings=settings,
            progress=progress,
            meta={"method": "bgsave", "path": str(path)},
        )
    if source.facts is None:
        repo.delete(key)
        raise ToolFailed(f"{path}: the RDB file was not read to its end")
    details = {
        "method": "bgsave",
        "bgsave": {"path": str(path), "file_mtime": stat.st_mtime},
        "rdb": source.facts,
        "keyspace": _ks_json(ks),
        "keyspace_source": "INFO keyspace just before BGSAVE",
    }
    return artifact, details


def _via_logical(
    conn: RedisConnection,
    info: dict[str, Any],
    repo: Repository,
    key: str,
    enc: EncryptionConfig,
    *,
    level: int,
    settings: StorageSettings,
    progress: Progress | None,
) -> tuple[Artifact, dict[str, Any]]:
    dbs = conn.dbs or sorted(keyspace(info)) or [0]
    export = LogicalExport(conn, dbs, redis_version=str(info.get("redis_version", "")))
    artifact = _store(
        export,
        repo,
        key,
        enc,
        name=ARTIFACT_LOGICAL,
        content=CONTENT_LOGICAL,
        level=level,
        settings=settings,
        progress=progress,
        meta={"method": "logical", "format": "strongroom-redis-logical/1"},
    )
    version = export.max_payload_version or max_rdb_version(str(info.get("redis_version", "0")))
    details = {
        "method": "logical",
        "logical": {
            "format": "strongroom-redis-logical/1",
            "dbs": {str(db): {"records": n} for db, n in export.counts.items()},
            "vanished_during_export": export.vanished,
            "point_in_time": False,
        },
        "rdb": {"version": version, "source": "DUMP payload footer"},
        "keyspace": {str(db): {"keys": n} for db, n in export.counts.items()},
        "keyspace_source": "keys exported",
    }
    return artifact, details


def backup_redis(
    conn: RedisConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    method: BackupMethod | None = None,
    backup_id: str | None = None,
    labels: dict[str, str] | None = None,
    progress: ProgressFactory | None = None,
) -> Manifest:
    """Back up ``conn``; returns the published manifest (see the module doc for methods)."""
    register(*conn.secrets(), *repo_config.secrets(), *enc.secrets())
    chosen = method or conn.backup_method
    if chosen not in METHODS:
        raise InvalidInput(f"unknown backup method {chosen!r}: expected one of {METHODS}")
    started = dt.datetime.now(dt.UTC)
    bid = backup_id or new_backup_id(started)
    claim_backup_id(repo, ENGINE, conn.name, bid)
    settings = storage_settings(repo_config, started)
    client = conn.client()
    try:
        info = server_info(client, f"Redis target {conn.name!r} at {conn.address}")
        if info.get("cluster_enabled"):
            raise InvalidInput(
                f"{conn.address} runs Redis Cluster: back up each primary as its own target"
            )
        level = repo_config.compression_level
        attempts: list[dict[str, str]] = []
        result: tuple[Artifact, dict[str, Any]] | None = None
        rdb_key = data_key(ENGINE, conn.name, bid, ARTIFACT_RDB)

        def reporter(name: str) -> Progress | None:
            return progress(name, info.get("used_memory")) if progress else None

        if chosen in ("auto", "sync"):
            try:
                result = _via_sync(
                    conn,
                    repo,
                    rdb_key,
                    enc,
                    level=level,
                    settings=settings,
                    progress=reporter(ARTIFACT_RDB),
                )
            except SyncRefused as exc:
                attempts.append({"method": "sync", "outcome": "refused", "reason": str(exc)})
                if chosen == "sync":
                    raise
                log.warning("%s refuses replication (%s); trying the fallbacks", conn.name, exc)
        if result is None and chosen in ("auto", "bgsave"):
            try:
                result = _via_bgsave(
                    conn,
                    client,
                    repo,
                    rdb_key,
                    enc,
                    level=level,
                    settings=settings,
                    progress=reporter(ARTIFACT_RDB),
                )
            except MethodUnavailable as exc:
                attempts.append({"method": "bgsave", "outcome": "unavailable", "reason": str(exc)})
                if chosen == "bgsave":
                    raise
                log.warning("%s: BGSAVE fallback unavailable (%s); logical export", conn.name, exc)
        if result is None:
            result = _via_logical(
                conn,
                info,
                repo,
                data_key(ENGINE, conn.name, bid, ARTIFACT_LOGICAL),
                enc,
                level=level,
                settings=settings,
                progress=reporter(ARTIFACT_LOGICAL),
            )
    finally:
        client.close()
    artifact, details = result
    try:
        if "keyspace" not in details:
            details["keyspace"] = _ks_json(keyspace(info))
            details["keyspace_source"] = "INFO keyspace before the snapshot"
        details["attempts"] = attempts
        details["used_memory"] = info.get("used_memory")
        details["redis_version"] = info.get("redis_version")
        details["rdb_version"] = details["rdb"]["version"]
        details["fallback"] = bool(attempts)
        manifest = Manifest(
            backup_id=bid,
            engine=ENGINE,
            target=conn.name,
            kind="logical" if details["method"] == "logical" else "rdb",
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            repository=repo.describe(),
            tool_versions={"redis-py": redis.__version__},
            server=_server_facts(conn, info),
            artifacts=[artifact],
            details=details,
            labels=dict(labels or {}),
        )
        publish_backup(repo, manifest, settings)
    except BaseException:
        repo.delete(artifact.key)
        raise
    return manifest
