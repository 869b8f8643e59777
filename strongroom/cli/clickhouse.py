"""``strongroom backup clickhouse`` and ``strongroom restore clickhouse``.

``strongroom.cli.app`` calls ``register(backup_app, restore_app)``; the commands run the
``backup-clickhouse`` / ``restore-clickhouse`` flows, like the PostgreSQL ones.
"""

from __future__ import annotations

import typer


def register(backup_app: typer.Typer, restore_app: typer.Typer) -> None:
    """Add the ``clickhouse`` commands to the ``backup`` and ``restore`` groups."""
    from strongroom.cli.common import JsonOpt, KeyOpt, RepoOpt, run_flow, show_backup, show_restore
    from strongroom.cli.preflight import flow_blocks

    @backup_app.command("clickhouse")
    def backup_clickhouse_cmd(
        target: str = typer.Argument(..., help="ClickHouseTarget block name."),
        repository: str = RepoOpt,
        key: str = KeyOpt,
        full: bool = typer.Option(
            False, "--full", help="Export every partition (default: only changed ones)."
        ),
        as_json: bool = JsonOpt,
    ) -> None:
        """Back up TARGET: schema per database, data per table and partition (Native, HTTP);
        partitions unchanged since the latest backup are referenced, not exported again."""
        from flows.clickhouse import backup_clickhouse_flow

        run_flow(
            as_json,
            lambda: backup_clickhouse_flow(
                target=target, repository=repository, encryption_key=key, full=full
            ),
            show_backup("clickhouse", repository),
            needs=flow_blocks("clickhouse", [target], repository, key),
        )

    @restore_app.command("clickhouse")
    def restore_clickhouse_cmd(
        target: str = typer.Argument(..., help="ClickHouseTarget block to restore into."),
        backup_id: str = typer.Option("latest", "--backup-id", "-b"),
        source_target: str | None = typer.Option(None, help="Target the backup was taken from."),
        database: list[str] = typer.Option(
            [], "--database", "-d", help="Database of the backup (repeatable; default all)."
        ),
        table: list[str] = typer.Option(
            [], "--table", "-t", help="Glob on db.table or table (repeatable)."
        ),
        partition: list[str] = typer.Option(
            [], "--partition", "-p", help="Partition id of the selected tables (repeatable)."
        ),
        target_database: str | None = typer.Option(
            None, "--into", help="Restore the selected database under this name."
        ),
        schema_only: bool = typer.Option(False, "--schema-only"),
        data_only: bool = typer.Option(False, "--data-only"),
        drop_existing: bool = typer.Option(
            False, "--drop-existing", help="Allow replacing tables that hold rows."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, change nothing."),
        jobs: int | None = typer.Option(
            None,
            "--jobs",
            "-j",
            min=1,
            max=64,
            help="Tables/partitions loaded at once (default: from the cores).",
        ),
        recheck: bool = typer.Option(
            False,
            "--recheck",
            help="Fingerprint the final tables again after the swap (a second full scan).",
        ),
        allow_engine: list[str] = typer.Option(
            [],
            "--allow-engine",
            help="Let the backup's DDL use this engine or table function outside the default "
            "allowlist (MergeTree/Log families, Memory, Null, views): e.g. URL, Distributed, "
            "remote (repeatable; shown in the plan).",
        ),
        repository: str = RepoOpt,
        key: str = KeyOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Restore a ClickHouse backup: everything, databases, tables or partitions."""
        from flows.clickhouse import restore_clickhouse_flow

        run_flow(
            as_json,
            lambda: restore_clickhouse_flow(
                target=target,
                backup_id=backup_id,
                source_target=source_target,
                databases=database,
                tables=table,
                partitions=partition,
                target_database=target_database,
                schema_only=schema_only,
                data_only=data_only,
                drop_existing=drop_existing,
                dry_run=dry_run,
                jobs=jobs,
                recheck=recheck,
                allow_engines=allow_engine,
                repository=repository,
                encryption_key=key,
            ),
            show_restore("clickhouse"),
            needs=flow_blocks("clickhouse", [target], repository, key),
        )
