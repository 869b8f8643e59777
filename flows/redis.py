"""Prefect flows for Redis backup and restore (orchestration only)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task

from blocks.redis import RedisTarget
from flows.audit import AUDITED
from flows.common import TRANSIENT_TASK, human_size, publish, secure_logging
from flows.engine_runs import open_backup, open_restore
from strongroom import progress
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.conn import BackupMethod, RedisConnection
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.repository import Repository


@task(**TRANSIENT_TASK)
def snapshot_redis(
    conn: RedisConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    labels: dict[str, str],
    method: BackupMethod | None,
) -> dict[str, Any]:
    manifest = backup_redis(
        conn, repo, repo_config, enc, method=method, labels=labels, progress=progress.current()
    )
    return manifest.model_dump(mode="json")


@flow(name="backup-redis", **AUDITED)
def backup_redis_flow(
    target: str,
    repository: str = "default",
    encryption_key: str = "default",
    method: Literal["auto", "sync", "bgsave", "logical"] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Snapshot ``target`` into the repository (replication SYNC, or a recorded fallback)."""
    secure_logging()
    run = open_backup(RedisTarget, "redis", target, repository, encryption_key)
    log = get_run_logger()
    log.info(
        "backing up Redis target %s (%s) into %s", target, run.conn.address, run.repo.describe()
    )
    with run.locked():
        manifest = snapshot_redis(
            run.conn, run.repo, run.repo_config, run.enc, labels or {}, method
        )
    details = manifest["details"]
    for attempt in details.get("attempts", []):
        log.warning("method %s %s: %s", attempt["method"], attempt["outcome"], attempt["reason"])
    artifact = manifest["artifacts"][0]
    rows = [
        {"db": int(db), "keys": v.get("keys"), "expires": v.get("expires", "")}
        for db, v in sorted(details.get("keyspace", {}).items(), key=lambda kv: int(kv[0]))
    ]
    publish(
        f"Redis backup {manifest['backup_id']}",
        f"backup-redis-{target}",
        [
            f"- target: `{target}` (Redis {details.get('redis_version')}, "
            f"used memory {human_size(details.get('used_memory') or 0)})",
            f"- method: **{details['method']}**"
            + (
                " (fallback: "
                + "; ".join(f"{a['method']} {a['outcome']}" for a in details.get("attempts", []))
                + ")"
                if details.get("attempts")
                else ""
            ),
            f"- RDB version: {details.get('rdb_version')}",
            f"- repository: `{run.repo.describe()}`",
            f"- {artifact['name']}: {human_size(artifact['raw_size'])}, "
            f"stored {human_size(artifact['stored_size'])}",
            f"- finished: {manifest['finished_at']}",
        ],
        rows,
    )
    log.info(
        "backup %s complete (%s): %s stored",
        manifest["backup_id"],
        details["method"],
        human_size(artifact["stored_size"]),
    )
    return manifest


@task(**TRANSIENT_TASK)
def run_redis_restore(
    conn: RedisConnection, repo: Repository, enc: EncryptionConfig, req: RedisRestoreRequest
) -> dict[str, Any]:
    return restore_redis(conn, repo, enc, req, progress=None)


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
    copy_method: Literal["auto", "pipeline", "migrate"] = "auto",
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
    )
    run = open_restore(RedisTarget, "redis", target, repository, encryption_key)
    log = get_run_logger()
    with run.locked():
        report = run_redis_restore(run.conn, run.repo, run.enc, req)
    planned = bool(report.get("dry_run"))
    checks = report.get("key_checks", [])
    lines = [
        f"- {'would restore' if planned else 'restored'} backup `{report['backup_id']}` "
        f"of `{report['source_target']}` ({report['kind']}, taken by {report['backup_method']})",
        f"- into `{report['target_server']}` (Redis {report['target_version']}), "
        f"mode **{report['mode']}**",
        f"- databases: {', '.join(map(str, report['dbs'])) or '(none)'}"
        + (f", keys matching `{report['key_pattern']}`" if report.get("key_pattern") else ""),
        f"- size: {human_size(report['raw_size'])}",
    ]
    if report.get("copy"):
        copy = report["copy"]
        lines.append(
            f"- copied {copy['keys']} keys by {copy['method']} ({copy['keys_per_s']} keys/s)"
        )
    if not planned:
        lines.append(
            f"- key counts match the backup: {report.get('keys_ok')}, "
            f"the manifest: {report.get('matches_manifest')}"
        )
        sample = report.get("sample", {})
        lines.append(f"- sampled values equal: {sample.get('ok')} ({sample.get('checked')} keys)")
    if report.get("blocked"):
        lines.append(f"- blocked: {report['blocked']}")
    publish(
        f"Redis restore {'plan ' if planned else ''}{report['backup_id']}",
        f"restore-redis-{target}",
        lines,
        checks or [{"db": db, "manifest_keys": n} for db, n in report["manifest_keys"].items()],
    )
    log.info(
        "%s %s into %s (%s)",
        "planned" if planned else "restored",
        report["backup_id"],
        report["target_server"],
        report["mode"],
    )
    return report
