"""``strongroom backup redis`` and ``strongroom restore redis``: added to the CLI by ``register``.

Both run the Prefect flows (``backup-redis``, ``restore-redis``), like the
PostgreSQL commands, with the same ``--json`` output and exit codes.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import typer


def register(backup_app: typer.Typer, restore_app: typer.Typer) -> None:
    """Add the ``redis`` commands to the ``backup`` and ``restore`` command groups."""
    from strongroom.cli.common import JsonOpt, _emit, _handled, _progress, out

    repo_opt = typer.Option("default", "--repository", "-r", help="BackupRepository block name.")
    key_opt = typer.Option("default", "--key", "-k", help="EncryptionKey block name.")

    @backup_app.command("redis")
    def backup_redis_cmd(
        target: str = typer.Argument(..., help="RedisTarget block name."),
        method: str | None = typer.Option(
            None,
            "--method",
            help="auto (default: SYNC, then BGSAVE+file, then logical), sync, bgsave, logical.",
        ),
        repository: str = repo_opt,
        key: str = key_opt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Snapshot a Redis server (RDB over the replication protocol, or a recorded fallback)."""
        with _handled(as_json):
            from flows.redis import backup_redis_flow
            from strongroom.errors import InvalidInput

            if method not in (None, "auto", "sync", "bgsave", "logical"):
                raise InvalidInput(f"unknown --method {method!r}: auto, sync, bgsave or logical")
            with _progress(not as_json):
                manifest = backup_redis_flow(
                    target=target,
                    repository=repository,
                    encryption_key=key,
                    method=cast(Literal["auto", "sync", "bgsave", "logical"] | None, method),
                )
            _emit(as_json, manifest, lambda: _print_backup(out, manifest))

    @restore_app.command("redis")
    def restore_redis_cmd(
        target: str = typer.Argument(..., help="RedisTarget block to restore into."),
        backup_id: str = typer.Option("latest", "--backup-id", "-b"),
        source_target: str | None = typer.Option(None, help="Target the backup was taken from."),
        mode: str = typer.Option(
            "live", "--mode", help="live (scratch server + MIGRATE) or file (restart the server)."
        ),
        flush_existing: bool = typer.Option(
            False, "--flush-existing", help="Allow removing keys the target holds in scope."
        ),
        key_pattern: str | None = typer.Option(
            None, "--key-pattern", "-p", help="Restore keys matching this Redis glob (live)."
        ),
        db: list[int] = typer.Option([], "--db", help="Database to restore (repeatable, live)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, change nothing."),
        copy_method: str = typer.Option(
            "auto", "--copy-method", help="live copy: auto/pipeline (DUMP/RESTORE) or migrate."
        ),
        repository: str = repo_opt,
        key: str = key_opt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Restore a Redis backup: live into a running server, or as its data file."""
        with _handled(as_json):
            from flows.redis import restore_redis_flow
            from strongroom.errors import InvalidInput

            if mode not in ("live", "file"):
                raise InvalidInput(f"unknown --mode {mode!r}: live or file")
            if copy_method not in ("auto", "pipeline", "migrate"):
                raise InvalidInput(f"unknown --copy-method {copy_method!r}: pipeline or migrate")
            with _progress(not as_json):
                report = restore_redis_flow(
                    target=target,
                    backup_id=backup_id,
                    source_target=source_target,
                    mode=cast(Literal["live", "file"], mode),
                    flush_existing=flush_existing,
                    key_pattern=key_pattern,
                    dbs=db,
                    dry_run=dry_run,
                    copy_method=cast(Literal["auto", "pipeline", "migrate"], copy_method),
                    repository=repository,
                    encryption_key=key,
                )
            _emit(as_json, report, lambda: _print_restore(out, report))


def _print_backup(out: Any, m: dict[str, Any]) -> None:
    from rich.table import Table

    from flows.common import human_size

    d = m["details"]
    out.print(f"[bold]{m['backup_id']}[/bold] redis/{m['target']} ({m['kind']})")
    out.print(
        f"  Redis {d.get('redis_version')}, RDB {d.get('rdb_version')}, method "
        f"[bold]{d['method']}[/bold]"
        + (
            f" after {', '.join(a['method'] + ' ' + a['outcome'] for a in d['attempts'])}"
            if d.get("attempts")
            else ""
        )
    )
    for attempt in d.get("attempts", []):
        out.print(
            f"  [yellow]{attempt['method']} {attempt['outcome']}:[/yellow] {attempt['reason']}"
        )
    table = Table("db", "keys", "expires")
    for dbn, v in sorted(d.get("keyspace", {}).items(), key=lambda kv: int(kv[0])):
        table.add_row(dbn, str(v.get("keys")), str(v.get("expires", "")))
    out.print(table)
    a = m["artifacts"][0]
    out.print(
        f"  {a['name']}: {human_size(a['raw_size'])} -> stored {human_size(a['stored_size'])}"
    )


def _print_restore(out: Any, r: dict[str, Any]) -> None:
    from rich.table import Table

    from flows.common import human_size

    title = "plan (dry run)" if r.get("dry_run") else "restored"
    out.print(
        f"[bold]{title}[/bold]: {r['source_target']} {r['backup_id']} -> {r['target_server']} "
        f"(mode {r['mode']}, {r['kind']}, {human_size(r['raw_size'])})"
    )
    if r.get("key_pattern"):
        out.print(f"  keys matching {r['key_pattern']!r} in dbs {r['dbs']}")
    if r.get("blocked"):
        out.print(f"[yellow]blocked:[/yellow] {r['blocked']}")
    if r.get("copy"):
        c = r["copy"]
        out.print(f"  copied {c['keys']} keys by {c['method']} in {c['seconds']} s")
    checks = r.get("key_checks") or []
    if checks:
        table = Table("db", "manifest", "loaded", "restored", "ok")
        for c in checks:
            table.add_row(
                str(c["db"]),
                str(c["manifest"]),
                str(c["loaded"]),
                str(c["restored"]),
                "yes" if c["ok"] else "NO",
            )
        out.print(table)
        sample = r.get("sample", {})
        out.print(f"  sampled values equal: {sample.get('ok')} ({sample.get('checked')} keys)")
    if r.get("previous_data_file"):
        out.print(f"  previous data file kept at {r['previous_data_file']}")
