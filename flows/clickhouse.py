"""Prefect flows for ClickHouse backup and restore (orchestration only)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from blocks.clickhouse import ClickHouseTarget
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
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.restore import ChRestoreRequest, restore_clickhouse
from strongroom.repository import Repository


@task(**TRANSIENT_TASK)
def dump_clickhouse(
    conn: ClickHouseConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    labels: dict[str, str],
) -> dict[str, Any]:
    manifest = backup_clickhouse(
        conn, repo, repo_config, enc, labels=labels, progress=progress.current()
    )
    return manifest.model_dump(mode="json")


@flow(name="backup-clickhouse", **AUDITED)
def backup_clickhouse_flow(
    target: str,
    repository: str = "default",
    encryption_key: str = "default",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Back up every configured database of ClickHouse ``target`` (schema and data)."""
    secure_logging()
    run = open_backup(ClickHouseTarget, "clickhouse", target, repository, encryption_key)
    log = get_run_logger()
    log.info("backing up ClickHouse target %s into %s", target, run.repo.describe())
    with run.locked():
        manifest = dump_clickhouse(run.conn, run.repo, run.repo_config, run.enc, labels or {})
    sizes: dict[tuple[str, str], int] = {}
    for a in manifest["artifacts"]:
        meta = a.get("meta", {})
        if meta.get("table") is not None:
            key = (meta["database"], meta["table"])
            sizes[key] = sizes.get(key, 0) + a["raw_size"]
    rows = [
        {
            "database": db["name"],
            "table": t["name"],
            "engine": t["engine"],
            "rows": t["rows"] if t["rows"] is not None else "",
            "partitions": len(t["partitions"]),
            "size": human_size(sizes.get((db["name"], t["name"]), 0)),
        }
        for db in manifest["details"]["databases"]
        for t in db["tables"]
    ]
    raw, stored = artifact_totals(manifest)
    publish(
        f"ClickHouse backup {manifest['backup_id']}",
        f"backup-clickhouse-{target}",
        [
            f"- target: `{target}` (ClickHouse {manifest['server']['version']})",
            f"- repository: `{run.repo.describe()}`",
            f"- databases: {len(manifest['details']['databases'])}, tables and views: "
            f"{len(rows)}, artifacts: {len(manifest['artifacts'])}",
            f"- data {human_size(raw)}, stored {human_size(stored)}",
            "- consistency: per table (ClickHouse has no cross-table snapshot)",
            f"- finished: {manifest['finished_at']}",
        ],
        rows,
    )
    log.info("backup %s complete: %s stored", manifest["backup_id"], human_size(stored))
    return manifest


@task(**TRANSIENT_TASK)
def run_clickhouse_restore(
    conn: ClickHouseConnection, repo: Repository, enc: EncryptionConfig, req: ChRestoreRequest
) -> dict[str, Any]:
    return restore_clickhouse(conn, repo, enc, req, progress=progress.current())


@flow(name="restore-clickhouse", **AUDITED)
def restore_clickhouse_flow(
    target: str,
    backup_id: str = "latest",
    source_target: str | None = None,
    databases: list[str] | None = None,
    tables: list[str] | None = None,
    partitions: list[str] | None = None,
    target_database: str | None = None,
    schema_only: bool = False,
    data_only: bool = False,
    drop_existing: bool = False,
    dry_run: bool = False,
    allow_engines: list[str] | None = None,
    repository: str = "default",
    encryption_key: str = "default",
) -> dict[str, Any]:
    """Restore a ClickHouse backup into ``target`` (see ChRestoreRequest for the options)."""
    secure_logging()
    req = ChRestoreRequest(
        backup_id=backup_id,
        source_target=source_target,
        databases=databases or [],
        tables=tables or [],
        partitions=partitions or [],
        target_database=target_database,
        schema_only=schema_only,
        data_only=data_only,
        drop_existing=drop_existing,
        dry_run=dry_run,
        allow_engines=allow_engines or [],
    )
    run = open_restore(ClickHouseTarget, "clickhouse", target, repository, encryption_key)
    log = get_run_logger()
    with run.locked():
        report = run_clickhouse_restore(run.conn, run.repo, run.enc, req)
    dry = bool(report.get("dry_run"))
    verb = "would restore" if dry else "restored"
    into = ", ".join(f"`{s}` -> `{t}`" for s, t in report["databases"].items())
    rows = (
        [
            {
                "table": c["table"],
                "stage": c["stage"],
                "partitions": c["partitions"],
                "expected rows": c["expected_rows"],
                "restored rows": c["actual_rows"],
                "fingerprint ok": c["ok"],
            }
            for c in report.get("checks", [])
        ]
        if not dry
        else [
            {
                "object": a["target"],
                "action": a["action"],
                "rows": a["rows"],
                "size": human_size(a["raw_size"]),
                "blocked": a["blocked"] or "",
            }
            for a in report["actions"]
        ]
    )
    publish(
        f"ClickHouse restore {'plan ' if dry else ''}{report['backup_id']}",
        f"restore-clickhouse-{target}",
        [
            f"- {verb} backup `{report['backup_id']}` of `{report['source_target']}` "
            f"({report['mode']})",
            f"- databases: {into} on `{report['target_server']}`",
            f"- objects: {len(report['tables'])}, rows: {report['rows']}, "
            f"data: {human_size(report['raw_size'])}",
            f"- fingerprints match the manifest: {report.get('fingerprints_ok', 'n/a')}",
        ]
        + ([f"- blocked: {report['blocked']}"] if report.get("blocked") else [])
        + ([f"- left over: {report['leftovers']}"] if report.get("leftovers") else []),
        rows,
    )
    log.info("%s %s into %s", verb, report["backup_id"], into)
    return report
