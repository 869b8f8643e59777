"""Prefect flows for PostgreSQL logical backup and restore (orchestration only).

The flows declare their parameters; the work is ``flows.engine_runs`` on the
``postgresql`` engine (``strongroom.engines.postgres.engine``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.audit import AUDITED
from flows.common import secure_logging
from flows.engine_runs import json_parameters, run_backup, run_restore


@json_parameters
@flow(name="backup-postgresql", **AUDITED)
def backup_postgresql(
    target: str,
    repository: str = "default",
    encryption_key: str = "default",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Dump every configured database of ``target`` into the repository."""
    secure_logging()
    return run_backup("postgresql", target, repository, encryption_key, labels)


@json_parameters
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
    jobs: int | None = None,
    repository: str = "default",
    encryption_key: str = "default",
) -> dict[str, Any]:
    """Restore a logical backup into ``target`` (see PgRestoreRequest for the options)."""
    from strongroom.engines.postgres.restore import PgRestoreRequest

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
        **({"jobs": jobs} if jobs is not None else {}),
    )
    return run_restore("postgresql", target, repository, encryption_key, req)
