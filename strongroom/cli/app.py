"""The ``strongroom`` command: backups, restores, listing and verification from a shell.

Commands that change things run the Prefect flows (so every run is recorded in
Prefect); read-only commands use the engine directly. ``--json`` prints one
JSON document on stdout for scripts. Exit codes: 0 ok, 1 unexpected error,
2 invalid input, 3 not found, 4 integrity failure, 5 target not empty,
6 service unavailable, 7 access denied, 8 tool failed, 9 conflict,
10 a compliance control failed, 11 no space left (repository or spool).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from strongroom.cli.common import (  # shared with the command modules
    JsonOpt,
    KeyOpt,
    RepoOpt,
    _emit,
    _handled,
    _open_repo,
    _progress,
    err,
    out,
)

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
backup_app = typer.Typer(help="Back up a target.", no_args_is_help=True)
restore_app = typer.Typer(help="Restore a backup into a target.", no_args_is_help=True)
blocks_app = typer.Typer(help="Prefect block types.", no_args_is_help=True)
app.add_typer(backup_app, name="backup")
app.add_typer(restore_app, name="restore")
app.add_typer(blocks_app, name="blocks")

__all__ = [
    "JsonOpt",
    "KeyOpt",
    "RepoOpt",
    "_emit",
    "_handled",
    "_open_repo",
    "_progress",
    "app",
    "backup_app",
    "err",
    "main",
    "out",
    "restore_app",
]


@backup_app.command("postgresql")
def backup_postgresql_cmd(
    target: str = typer.Argument(..., help="PostgresTarget block name."),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Dump every configured database of TARGET (pg_dump -Fc, streamed and encrypted)."""
    with _handled(as_json):
        from flows.postgres import backup_postgresql

        with _progress(not as_json):
            manifest = backup_postgresql(target=target, repository=repository, encryption_key=key)
        _emit(as_json, manifest, lambda: _print_manifest(manifest))


@restore_app.command("postgresql")
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
    jobs: int = typer.Option(1, "--jobs", "-j", help="pg_restore jobs (directory dumps)."),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Restore a PostgreSQL logical backup (whole database, tables or schemas)."""
    with _handled(as_json):
        from flows.postgres import restore_postgresql

        with _progress(not as_json):
            report = restore_postgresql(
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
            )
        _emit(as_json, report, lambda: _print_restore(report))


@app.command("list")
def list_cmd(
    engine: str | None = typer.Option(None, help="postgresql, clickhouse or redis."),
    target: str | None = typer.Option(None),
    repository: str = RepoOpt,
    drills: bool = typer.Option(False, "--drills", help="List restore drill records instead."),
    as_json: bool = JsonOpt,
) -> None:
    """List backups (or, with --drills, restore drill records), oldest first."""
    with _handled(as_json):
        from strongroom.catalog import Catalog

        if drills:
            from strongroom.cli.policy import print_drills
            from strongroom.drills import list_drills

            drill_rows = list_drills(_open_repo(repository), engine, target)
            _emit(as_json, drill_rows, lambda: print_drills(drill_rows))
            return

        manifests = Catalog(_open_repo(repository)).list(engine, target)
        rows = [m.summary() for m in manifests]

        def human() -> None:
            table = Table("backup id", "engine", "target", "finished", "dump", "stored", "secs")
            for r in rows:
                table.add_row(
                    r["backup_id"],
                    r["engine"],
                    r["target"],
                    r["finished_at"][:19],
                    _size(r["raw_size"]),
                    _size(r["stored_size"]),
                    str(r["duration_s"]),
                )
            out.print(table)

        _emit(as_json, rows, human)


@app.command("show")
def show_cmd(
    backup_id: str = typer.Argument("latest"),
    engine: str | None = typer.Option(None),
    target: str | None = typer.Option(None),
    repository: str = RepoOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show one backup's manifest."""
    with _handled(as_json):
        from strongroom.catalog import Catalog

        manifest = Catalog(_open_repo(repository)).resolve(backup_id, engine, target)
        data = manifest.model_dump(mode="json")
        _emit(as_json, data, lambda: _print_manifest(data))


@app.command("verify")
def verify_cmd(
    backup_id: str = typer.Argument("latest"),
    engine: str | None = typer.Option(None),
    target: str | None = typer.Option(None),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-read a backup: checksums, decryption, decompression, dump structure."""
    with _handled(as_json):
        from flows.verify import verify_backup_flow

        with _progress(not as_json):
            report = verify_backup_flow(
                backup_id=backup_id,
                engine=engine,
                target=target,
                repository=repository,
                encryption_key=key,
            )

        def human() -> None:
            for item in report["artifacts"]:
                mark = "[green]ok[/green]" if item["ok"] else "[red]FAILED[/red]"
                out.print(f"{mark} {item['artifact']} {item.get('structure', '')}")
            out.print(f"backup {report['backup_id']}: verified in {report['duration_s']} s")
            for warning in report.get("warnings", []):
                out.print(f"[yellow]warning:[/yellow] {warning}")

        _emit(as_json, report, human)


@app.command("keygen")
def keygen_cmd(as_json: bool = JsonOpt) -> None:
    """Generate an age X25519 key pair (identity is secret: store it in an EncryptionKey block)."""
    from pyrage import x25519

    identity = x25519.Identity.generate()
    data = {"recipient": str(identity.to_public()), "identity": str(identity)}
    _emit(
        as_json,
        data,
        lambda: out.print(f"# public (recipient): {data['recipient']}\n{data['identity']}"),
    )


@blocks_app.command("register")
def blocks_register_cmd(as_json: bool = JsonOpt) -> None:
    """Register strongroom's block types with the Prefect API."""
    with _handled(as_json):
        from blocks import register_all

        slugs = register_all()
        _emit(as_json, slugs, lambda: out.print("registered: " + ", ".join(slugs)))


def _size(n: int) -> str:
    from flows.common import human_size

    return human_size(n)


def _print_manifest(m: dict[str, Any]) -> None:
    out.print(f"[bold]{m['backup_id']}[/bold] {m['engine']}/{m['target']} ({m['kind']})")
    out.print(f"  finished {m['finished_at']}  server {m.get('server', {}).get('version', '?')}")
    table = Table("artifact", "content", "dump", "stored", "sha256 (stored)")
    for a in m["artifacts"]:
        table.add_row(
            a["name"],
            a["content"],
            _size(a["raw_size"]),
            _size(a["stored_size"]),
            a["stored_sha256"][:16],
        )
    out.print(table)


def _print_restore(r: dict[str, Any]) -> None:
    title = "plan (dry run)" if r.get("dry_run") else "restored"
    out.print(
        f"[bold]{title}[/bold]: {r['source_database']} from {r['backup_id']} -> "
        f"{r['target_database']} on {r['target_server']} ({r['mode']}, {_size(r['raw_size'])})"
    )
    if r.get("blocked"):
        out.print(f"[yellow]blocked:[/yellow] {r['blocked']}")
    for note in r.get("notes") or []:
        out.print(f"note: {note}", markup=False)
    checks = r.get("row_checks") or []
    if checks:
        table = Table("table", "expected rows", "restored rows", "ok")
        for c in checks:
            table.add_row(
                c["table"], str(c["expected"]), str(c["actual"]), "yes" if c["ok"] else "NO"
            )
        out.print(table)
    elif r.get("tables"):
        out.print("tables: " + ", ".join(r["tables"]))


def _register_plugins() -> None:
    """Commands that live in their own modules (one per engine or concern)."""
    from strongroom import (
        cli_audit,
        cli_clickhouse,
        cli_ops,
        cli_pitr,
        cli_policy,
        cli_redis,
        cli_signing,
    )

    cli_clickhouse.register(backup_app, restore_app)
    cli_redis.register(backup_app, restore_app)
    cli_pitr.register(app, backup_app, restore_app)
    cli_policy.register(app)
    cli_audit.register(app)
    cli_ops.register(app)
    cli_signing.register(app)


if __name__ != "__main__":  # as __main__, the plugins would import a second copy of us
    _register_plugins()


def main() -> None:
    from strongroom.fast_exit import freeze_heap

    try:
        app()
    finally:
        freeze_heap()


if __name__ == "__main__":
    from strongroom.cli.app import main as _main

    _main()
