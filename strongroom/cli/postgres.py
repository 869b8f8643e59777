"""``strongroom backup postgresql`` and ``strongroom restore postgresql`` (logical dumps).

``strongroom.cli.app`` calls ``register(backup_app, restore_app)``; the commands run the
Prefect flows in ``flows.postgres`` so every run is recorded.
"""

from __future__ import annotations

import os
from typing import Any

import typer

from strongroom.cli.common import (
    JsonOpt,
    KeyOpt,
    RepoOpt,
    _emit,
    _handled,
    preflight,
    run_flow,
    show_backup,
    show_restore,
)
from strongroom.cli.preflight import flow_blocks

TARGET_SLUG = "strongroom-postgres-target"


def register(backup_app: typer.Typer, restore_app: typer.Typer) -> None:
    backup_app.command("postgresql")(backup_postgresql_cmd)
    restore_app.command("postgresql")(restore_postgresql_cmd)


def backup_postgresql_cmd(
    target: str = typer.Argument(..., help="PostgresTarget block name."),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Dump every configured database of TARGET (pg_dump -Fc, streamed and encrypted)."""
    from flows.postgres import backup_postgresql

    run_flow(
        as_json,
        lambda: backup_postgresql(target=target, repository=repository, encryption_key=key),
        show_backup("postgresql", repository),
        needs=flow_blocks("postgresql", [target], repository, key),
    )


def restore_postgresql_cmd(
    target: str = typer.Argument(..., help="PostgresTarget block to restore into."),
    backup_id: str = typer.Option("latest", "--backup-id", "-b"),
    source_target: str | None = typer.Option(None, help="Target the backup was taken from."),
    database: str | None = typer.Option(None, help="Database in the backup."),
    target_database: str | None = typer.Option(None, "--into", help="Restore under this name."),
    table: list[str] = typer.Option(
        [],
        "--table",
        "-t",
        help=(
            "schema.table (repeatable). A partitioned table brings all its partitions "
            "(any depth); a single partition is restored as a standalone table. Types "
            "and extensions the table needs are not restored (as pg_restore -t)."
        ),
    ),
    schema: list[str] = typer.Option([], "--schema", "-n", help="Schema (repeatable)."),
    schema_only: bool = typer.Option(False, "--schema-only"),
    data_only: bool = typer.Option(False, "--data-only"),
    drop_existing: bool = typer.Option(False, "--drop-existing", help="Allow replacing data."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, change nothing."),
    no_owner: bool = typer.Option(False, "--no-owner"),
    jobs: int | None = typer.Option(
        None,
        "--jobs",
        "-j",
        min=1,
        max=64,
        help="Parallel loads of a whole-database restore (default: the cores, at most 8).",
    ),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Restore a PostgreSQL logical backup (whole database, tables or schemas).

    With --dry-run only the plan is made (nothing changes, no flow run: the target and
    repository blocks are read straight from the Prefect API)."""
    request = {
        "backup_id": backup_id,
        "source_target": source_target,
        "database": database,
        "target_database": target_database,
        "tables": table,
        "schemas": schema,
        "schema_only": schema_only,
        "data_only": data_only,
        "drop_existing": drop_existing,
        "no_owner": no_owner,
        **({"jobs": jobs} if jobs is not None else {}),
    }
    if dry_run and os.environ.get("PREFECT_API_URL"):
        with _handled(as_json):
            preflight(flow_blocks("postgresql", [target], repository))
            plan = _plan_only(target, repository, request)
        _emit(as_json, plan, lambda: show_restore("postgresql")(plan))
        return
    from flows.postgres import restore_postgresql

    run_flow(
        as_json,
        lambda: restore_postgresql(
            target=target,
            backup_id=backup_id,
            source_target=source_target,
            database=database,
            target_database=target_database,
            tables=table,
            schemas=schema,
            schema_only=schema_only,
            data_only=data_only,
            drop_existing=drop_existing,
            dry_run=dry_run,
            no_owner=no_owner,
            jobs=jobs,
            repository=repository,
            encryption_key=key,
        ),
        show_restore("postgresql"),
        needs=flow_blocks("postgresql", [target], repository, key),
    )


def _plan_only(target: str, repository: str, request: dict[str, Any]) -> dict[str, Any]:
    """The restore plan as a read command: the blocks over one HTTP GET each, the
    manifest (signature checked) and the target database's state; nothing is written."""
    from blocks.target_config import postgres_connection
    from strongroom.cli.repo_source import fetch_block_data, open_read_repository
    from strongroom.engines.postgres.restore import PgRestoreRequest, plan_restore
    from strongroom.redact import register

    api_url = os.environ["PREFECT_API_URL"].rstrip("/")
    conn = postgres_connection(target, fetch_block_data(TARGET_SLUG, target, api_url))
    register(*conn.secrets())
    repo = open_read_repository(repository)
    return plan_restore(conn, repo, PgRestoreRequest(**request, dry_run=True))
