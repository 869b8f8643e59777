"""``strongroom backup clickhouse`` and ``strongroom restore clickhouse``.

``strongroom.cli.app`` calls ``register(backup_app, restore_app)``; the commands run the
``backup-clickhouse`` / ``restore-clickhouse`` flows, like the PostgreSQL ones.
"""

from __future__ import annotations

from typing import Any

import typer


def register(backup_app: typer.Typer, restore_app: typer.Typer) -> None:
    """Add the ``clickhouse`` commands to the ``backup`` and ``restore`` groups."""
    from strongroom.cli.common import JsonOpt, KeyOpt, RepoOpt, _emit, _handled, _progress

    @backup_app.command("clickhouse")
    def backup_clickhouse_cmd(
        target: str = typer.Argument(..., help="ClickHouseTarget block name."),
        repository: str = RepoOpt,
        key: str = KeyOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Back up TARGET: schema per database, data per table and partition (Native, HTTP)."""
        with _handled(as_json):
            from flows.clickhouse import backup_clickhouse_flow

            with _progress(not as_json):
                manifest = backup_clickhouse_flow(
                    target=target, repository=repository, encryption_key=key
                )
            _emit(as_json, manifest, lambda: _print_backup(manifest))

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
        with _handled(as_json):
            from flows.clickhouse import restore_clickhouse_flow

            with _progress(not as_json):
                report = restore_clickhouse_flow(
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
                    allow_engines=allow_engine,
                    repository=repository,
                    encryption_key=key,
                )
            _emit(as_json, report, lambda: _print_restore(report))


def _print_backup(m: dict[str, Any]) -> None:
    from rich.table import Table

    from flows.common import human_size
    from strongroom.catalog import artifact_totals
    from strongroom.cli.common import out

    out.print(
        f"[bold]{m['backup_id']}[/bold] clickhouse/{m['target']} "
        f"(ClickHouse {m.get('server', {}).get('version', '?')})"
    )
    table = Table("database", "table", "engine", "rows", "partitions", "artifacts")
    for db in m["details"]["databases"]:
        for t in db["tables"]:
            table.add_row(
                db["name"],
                t["name"],
                t["engine"],
                "" if t["rows"] is None else str(t["rows"]),
                str(len(t["partitions"])),
                str(len(t["artifacts"])),
            )
    out.print(table)
    raw, stored = artifact_totals(m)
    out.print(f"data {human_size(raw)}, stored {human_size(stored)}")


def _print_restore(r: dict[str, Any]) -> None:
    from rich.table import Table

    from flows.common import human_size
    from strongroom.cli.common import out

    title = "plan (dry run)" if r.get("dry_run") else "restored"
    into = ", ".join(f"{s} -> {t}" for s, t in r["databases"].items())
    out.print(
        f"[bold]{title}[/bold]: backup {r['backup_id']} ({r['mode']}) {into} "
        f"on {r['target_server']}, {human_size(r['raw_size'])}"
    )
    if r.get("blocked"):
        out.print(f"[yellow]blocked:[/yellow] {r['blocked']}", highlight=False)
    table = Table("object", "action", "partitions", "rows", "blocked")
    for a in r["actions"]:
        table.add_row(
            a["target"], a["action"], ", ".join(a["partitions"]), str(a["rows"]), a["blocked"] or ""
        )
    out.print(table)
    checks = r.get("checks") or []
    if checks:
        ok = all(c["ok"] for c in checks)
        out.print(f"fingerprints checked: {len(checks)}, all match: {'yes' if ok else 'NO'}")
