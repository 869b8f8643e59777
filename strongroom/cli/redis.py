"""``strongroom backup redis`` and ``strongroom restore redis``: added to the CLI by ``register``.

Both run the Prefect flows (``backup-redis``, ``restore-redis``), like the
PostgreSQL commands, with the same ``--json`` output and exit codes.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import typer

from strongroom.errors import InvalidInput


def _one_of(option: str, value: str | None, allowed: tuple[str | None, ...]) -> Any:
    if value not in allowed:
        names = ", ".join(a for a in allowed if a)
        raise InvalidInput(f"unknown {option} {value!r}: expected one of {names}")
    return value


def register(backup_app: typer.Typer, restore_app: typer.Typer) -> None:
    """Add the ``redis`` commands to the ``backup`` and ``restore`` command groups."""
    from strongroom.cli.common import JsonOpt, KeyOpt, RepoOpt, run_flow, show_backup, show_restore
    from strongroom.cli.preflight import flow_blocks

    @backup_app.command("redis")
    def backup_redis_cmd(
        target: str = typer.Argument(..., help="RedisTarget block name."),
        method: str | None = typer.Option(
            None,
            "--method",
            help="auto (default: SYNC, then BGSAVE+file, then logical), sync, bgsave, logical.",
        ),
        from_masters: bool = typer.Option(
            False, "--from-masters", help="Cluster: snapshot the masters, not replicas."
        ),
        repository: str = RepoOpt,
        key: str = KeyOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Snapshot a Redis server or every shard of a Redis Cluster (RDB over replication)."""
        from flows.redis import backup_redis_flow

        run_flow(
            as_json,
            lambda: backup_redis_flow(
                target=target,
                repository=repository,
                encryption_key=key,
                method=cast(
                    Literal["auto", "sync", "bgsave", "logical"] | None,
                    _one_of("--method", method, (None, "auto", "sync", "bgsave", "logical")),
                ),
                from_masters=from_masters or None,
            ),
            show_backup("redis", repository),
            needs=flow_blocks("redis", [target], repository, key),
        )

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
            "auto",
            "--copy-method",
            help="live copy: auto/pipeline (DUMP/RESTORE), migrate, or replicate (the target "
            "loads the RDB as a replica: whole backup, empty target).",
        ),
        replicate_host: str | None = typer.Option(
            None,
            "--replicate-host",
            help="replicate: the runner address the target connects to (default: the route's).",
        ),
        repository: str = RepoOpt,
        key: str = KeyOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Restore a Redis backup: live into a running server, or as its data file."""
        from flows.redis import restore_redis_flow

        run_flow(
            as_json,
            lambda: restore_redis_flow(
                target=target,
                backup_id=backup_id,
                source_target=source_target,
                mode=_one_of("--mode", mode, ("live", "file")),
                flush_existing=flush_existing,
                key_pattern=key_pattern,
                dbs=db,
                dry_run=dry_run,
                copy_method=_one_of(
                    "--copy-method", copy_method, ("auto", "pipeline", "migrate", "replicate")
                ),
                replicate_host=replicate_host,
                repository=repository,
                encryption_key=key,
            ),
            show_restore("redis"),
            needs=flow_blocks("redis", [target], repository, key),
        )
