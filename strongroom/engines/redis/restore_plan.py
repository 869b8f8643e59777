"""The Redis restore request and the checks made before the target changes.

``restore_redis`` refuses anything it can see in advance (a backup a target or this
runner's redis-server cannot load, a database the target lacks or the backup does not
hold); those checks, and the request they read, live here so the live and the file
restore share them without importing the restore entry point.
"""

from __future__ import annotations

from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from strongroom.catalog import Manifest
from strongroom.engines.redis.conn import MAX_DB, RedisConnection, redis_errors
from strongroom.engines.redis.rdb import first_release, max_rdb_version
from strongroom.engines.redis.scratch import local_redis_version
from strongroom.errors import InvalidInput, NotFound


class RdbVersionTooNew(InvalidInput):
    """The backup was written by a newer Redis than the one that would load it."""


class RedisRestoreRequest(BaseModel):
    """What to restore and how; every field is validated before anything changes."""

    backup_id: str = "latest"
    source_target: str | None = Field(
        default=None, description="target the backup was taken from (default: this target)"
    )
    mode: Literal["live", "file"] = "live"
    flush_existing: bool = Field(
        default=False,
        description="allow removing keys the target holds in the restore's scope",
    )
    key_pattern: str | None = Field(default=None, description="Redis glob (live mode)")
    dbs: list[int] = Field(default_factory=list, description="databases (live mode)")
    copy_method: Literal["auto", "pipeline", "migrate", "replicate"] = Field(
        default="auto",
        description="auto = pipeline (pipelined DUMP/RESTORE); MIGRATE; or replicate (the "
        "target loads the RDB as a replica of strongroom: whole backup, empty target)",
    )
    replicate_host: str | None = Field(
        default=None,
        description="replicate: the runner address the target connects to (default: the "
        "local address of the route to the target)",
    )
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    sample_size: int = Field(default=20, ge=0, le=10_000)
    keep_previous: bool = Field(
        default=True, description="file mode: keep the replaced data file next to it"
    )
    scratch_dir: str | None = Field(default=None, description="parent folder for scratch data")
    dry_run: bool = False


def check_versions(
    manifest: Manifest, target_version: str, *, local: bool, payloads: bool = True
) -> dict[str, Any]:
    rdb_version = int(manifest.details.get("rdb_version") or 0)
    target_max = max_rdb_version(target_version)
    facts: dict[str, Any] = {
        "rdb_version": rdb_version,
        "target_version": target_version,
        "target_max_rdb_version": target_max,
    }
    if rdb_version > target_max:
        raise RdbVersionTooNew(
            f"backup {manifest.backup_id} holds RDB version {rdb_version} (written by "
            f"{first_release(rdb_version)} or later, source Redis "
            f"{manifest.details.get('redis_version')}); the target runs Redis {target_version}, "
            f"which loads RDB versions up to {target_max}. Nothing was changed: restore into "
            "a Redis at least as new as the source"
        )
    if local:
        local_version = local_redis_version()
        local_max = max_rdb_version(local_version)
        facts["scratch_version"] = local_version
        if rdb_version > local_max:
            raise RdbVersionTooNew(
                f"backup {manifest.backup_id} holds RDB version {rdb_version}; this runner's "
                f"redis-server {local_version} loads up to {local_max}, so it cannot stage "
                "the backup. Nothing was changed: use a runner image with a newer redis-server"
            )
        if payloads and local_max > target_max:
            raise RdbVersionTooNew(
                f"this runner's redis-server {local_version} writes RDB {local_max} values "
                f"that the target (Redis {target_version}, RDB <= {target_max}) cannot "
                "RESTORE. Nothing was changed: use a runner with a redis-server no newer than "
                "the target, or mode=file"
            )
    return facts


def restore_scope(
    req: RedisRestoreRequest, conn: RedisConnection, backup_ks: dict[int, int]
) -> list[int]:
    for db in req.dbs:
        if not 0 <= db <= MAX_DB:
            raise InvalidInput(f"db index {db} out of range 0..{MAX_DB}")
        if db not in backup_ks:
            raise NotFound(
                f"db {db} holds no keys in the backup; it has: "
                f"{', '.join(map(str, sorted(backup_ks))) or '(no keys at all)'}"
            )
    if req.dbs:
        return sorted(set(req.dbs))
    if conn.dbs:
        return [db for db in conn.dbs if db in backup_ks]
    return sorted(backup_ks)


def target_dbs_exist(conn: RedisConnection, dbs: list[int]) -> None:
    for db in dbs:
        client = conn.client(db)
        try:
            client.ping()
        except redis.ResponseError as exc:
            if "out of range" in str(exc) or "invalid DB" in str(exc):
                raise InvalidInput(
                    f"the target has no database {db} (its 'databases' setting is lower)"
                ) from None
            with redis_errors(f"selecting db {db} on the target"):
                raise
        except redis.RedisError:
            with redis_errors(f"selecting db {db} on the target"):
                raise
        finally:
            client.close()


def check_replicate(
    req: RedisRestoreRequest, manifest: Manifest, dbs: list[int], backup_ks: dict[int, int]
) -> None:
    """copy_method=replicate loads the whole RDB: refuse what it cannot honour."""
    if manifest.kind != "rdb":
        raise InvalidInput(
            f"backup {manifest.backup_id} is a logical export; copy_method=replicate needs an "
            "RDB backup: use copy_method=pipeline"
        )
    if req.key_pattern is not None or dbs != sorted(backup_ks):
        raise InvalidInput(
            "copy_method=replicate loads the whole backup (every database): key_pattern, dbs "
            "and a target block limited to some dbs need copy_method=pipeline"
        )
