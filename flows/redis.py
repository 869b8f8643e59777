"""Prefect flows for Redis backup and restore (orchestration only).

The flows declare their parameters; the work is ``flows.engine_runs`` on the
``redis`` engine (``strongroom.engines.redis.engine``).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from flows.audit import AUDITED
from flows.common import secure_logging
from flows.engine_runs import run_backup, run_restore
from strongroom.engines.redis.restore import RedisRestoreRequest


@flow(name="backup-redis", **AUDITED)
def backup_redis_flow(
    target: str,
    repository: str = "default",
    encryption_key: str = "default",
    method: Literal["auto", "sync", "bgsave", "logical"] | None = None,
    labels: dict[str, str] | None = None,
    from_masters: bool | None = None,
) -> dict[str, Any]:
    """Snapshot ``target`` into the repository (replication SYNC, or a recorded fallback);
    a cluster target: every shard, from replicas unless ``from_masters``."""
    secure_logging()
    return run_backup(
        "redis",
        target,
        repository,
        encryption_key,
        labels,
        method=method,
        from_masters=from_masters,
    )


@flow(name="restore-redis", **AUDITED)
def restore_redis_flow(
    target: str,
    backup_id: str = "latest",
    source_target: str | None = None,
    mode: Literal["live", "file"] = "live",
    flush_existing: bool = False,
    key_pattern: str | None = None,
    dbs: list[int] | None = None,
    dry_run: bool = False,
    copy_method: Literal["auto", "pipeline", "migrate", "replicate"] = "auto",
    replicate_host: str | None = None,
    repository: str = "default",
    encryption_key: str = "default",
) -> dict[str, Any]:
    """Restore a Redis backup into ``target`` (see RedisRestoreRequest for the options)."""
    secure_logging()
    req = RedisRestoreRequest(
        backup_id=backup_id,
        source_target=source_target,
        mode=mode,
        flush_existing=flush_existing,
        key_pattern=key_pattern,
        dbs=dbs or [],
        dry_run=dry_run,
        copy_method=copy_method,
        replicate_host=replicate_host,
    )
    return run_restore("redis", target, repository, encryption_key, req)
