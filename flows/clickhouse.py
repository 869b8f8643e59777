"""Prefect flows for ClickHouse backup and restore (orchestration only).

The flows declare their parameters; the work is ``flows.engine_runs`` on the
``clickhouse`` engine (``strongroom.engines.clickhouse.engine``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.audit import AUDITED
from flows.common import secure_logging
from flows.engine_runs import run_backup, run_restore
from strongroom.engines.clickhouse.restore import ChRestoreRequest


@flow(name="backup-clickhouse", **AUDITED)
def backup_clickhouse_flow(
    target: str,
    repository: str = "default",
    encryption_key: str = "default",
    labels: dict[str, str] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Back up every configured database of ClickHouse ``target`` (schema and data):
    only changed partitions unless ``full`` (or the target block's ``full_every``)."""
    secure_logging()
    return run_backup("clickhouse", target, repository, encryption_key, labels, full=full)


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
    jobs: int | None = None,
    recheck: bool = False,
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
        jobs=jobs,
        recheck=recheck,
        allow_engines=allow_engines or [],
    )
    return run_restore("clickhouse", target, repository, encryption_key, req)
