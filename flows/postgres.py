"""Prefect flows for PostgreSQL logical backup and restore (orchestration only)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from blocks import PostgresTarget
from flows.audit import AUDITED
from flows.common import (
    TRANSIENT_TASK,
    human_size,
    publish,
    secure_logging,
)
from flows.engine_runs import open_backup, open_restore
from strongroom import progress
from strongroom.catalog import artifact_totals
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.repository import Repository


@task(**TRANSIENT_TASK)
def dump_databases(
    conn: PostgresConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    labels: dict[str, str],
) -> dict[str, Any]:
    manifest = backup_postgres(
        conn, repo, repo_config, enc, labels=labels, progress=progress.current()
    )
    return manifest.model_dump(mode="json")


@flow(name="backup-postgresql", **AUDITED)
def backup_postgresql(
    target: str,
    repository: str = "default",
    encryption_key: str = "default",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Dump every configured database of ``target`` into the repository."""
    secure_logging()
    run = open_backup(PostgresTarget, "postgresql", target, repository, encryption_key)
    log = get_run_logger()
    log.info("backing up PostgreSQL target %s into %s", target, run.repo.describe())
    with run.locked():
        manifest = dump_databases(run.conn, run.repo, run.repo_config, run.enc, labels or {})
    rows = [
        {
            "database": db["name"],
            "tables": len(db["tables"]),
            "rows": sum(t["rows"] or 0 for t in db["tables"]),
            "size": human_size(db["size_bytes"]),
        }
        for db in manifest["details"]["databases"]
    ]
    raw, stored = artifact_totals(manifest)
    publish(
        f"PostgreSQL backup {manifest['backup_id']}",
        f"backup-postgresql-{target}",
        [
            f"- target: `{target}` ({manifest['server']['version']})",
            f"- repository: `{run.repo.describe()}`",
            f"- artifacts: {len(manifest['artifacts'])}, dump {human_size(raw)}, "
            f"stored {human_size(stored)}",
            f"- finished: {manifest['finished_at']}",
        ],
        rows,
    )
    log.info("backup %s complete: %s stored", manifest["backup_id"], human_size(stored))
    return manifest


@task(**TRANSIENT_TASK)
def run_restore(
    conn: PostgresConnection, repo: Repository, enc: EncryptionConfig, req: PgRestoreRequest
) -> dict[str, Any]:
    return restore_postgres(conn, repo, enc, req, progress=None)


@flow(name="restore-postgresql", **AUDITED)
def restore_postgresql(
    target: str,
    backup_id: str = "latest",
    source_target: str | None = None,
    database: str | None = None,
    target_database: str | None = None,
    tables: list[str] | None = None,
    schemas: list[str] | None = None,
    schema_only: bool = False,
    data_only: bool = False,
    drop_existing: bool = False,
    dry_run: bool = False,
    no_owner: bool = False,
    jobs: int = 1,
    repository: str = "default",
    encryption_key: str = "default",
) -> dict[str, Any]:
    """Restore a logical backup into ``target`` (see PgRestoreRequest for the options)."""
    secure_logging()
    req = PgRestoreRequest(
        backup_id=backup_id,
        source_target=source_target,
        database=database,
        target_database=target_database,
        tables=tables or [],
        schemas=schemas or [],
        schema_only=schema_only,
        data_only=data_only,
        drop_existing=drop_existing,
        dry_run=dry_run,
        no_owner=no_owner,
        jobs=jobs,
    )
    run = open_restore(PostgresTarget, "postgresql", target, repository, encryption_key)
    log = get_run_logger()
    with run.locked():
        report = run_restore(run.conn, run.repo, run.enc, req)
    checks = report.get("row_checks", [])
    verb = "would restore" if report.get("dry_run") else "restored"
    publish(
        f"PostgreSQL restore {'plan' if report.get('dry_run') else ''} {report['backup_id']}",
        f"restore-postgresql-{target}",
        [
            f"- {verb} `{report['source_database']}` from backup `{report['backup_id']}`",
            f"- into `{report['target_database']}` on `{report['target_server']}` "
            f"({report['mode']})",
            f"- size: {human_size(report['raw_size'])}",
            f"- row counts match the manifest: {report.get('rows_ok', 'n/a')}",
        ]
        + ([f"- blocked: {report['blocked']}"] if report.get("blocked") else []),
        checks or [{"table": t} for t in report["tables"]],
    )
    log.info("%s %s into %s", verb, report["backup_id"], report["target_database"])
    return report
