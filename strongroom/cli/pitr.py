"""PostgreSQL PITR commands, added to the ``strongroom`` CLI by ``register``:

    strongroom backup postgresql-base TARGET
    strongroom backup postgresql-files TARGET --type full|diff|incr [--checksum] [--jobs N]
    strongroom restore postgresql-pitr TARGET --data-dir DIR [--time T | --lsn L |
        --xid X | --name N | --immediate] [--start --port P] [--verify-query SQL]
    strongroom wal-check TARGET [--json]
    strongroom create-restore-point TARGET NAME
    strongroom wal-config TARGET --config /etc/strongroom/wal.toml
    strongroom wal-push %p / strongroom wal-fetch %f %p   (same as strongroom-wal)

Commands that change things run the Prefect flows; ``wal-check`` reads the
repository directly. ``wal-push``/``wal-fetch`` hand over to ``strongroom-wal``,
which is what ``archive_command``/``restore_command`` should call (it starts
without importing Prefect).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import typer

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def register(app: typer.Typer, backup_app: typer.Typer, restore_app: typer.Typer) -> None:
    """Add the PITR commands to the CLI."""
    from strongroom.cli.common import (
        JsonOpt,
        RepoUrlOpt,
        TrustOpt,
        _emit,
        _handled,
        _progress,
        out,
        preflight,
    )
    from strongroom.cli.preflight import flow_blocks

    repo_opt = typer.Option("default", "--repository", "-r", help="BackupRepository block name.")
    key_opt = typer.Option("default", "--key", "-k", help="EncryptionKey block name.")

    @backup_app.command("postgresql-base")
    def backup_base_cmd(
        target: str = typer.Argument(..., help="PostgresTarget block name."),
        manifest_checksums: str = typer.Option(
            "SHA256", help="pg_basebackup manifest checksums (SHA256, CRC32C, NONE...)."
        ),
        wal_timeout: float = typer.Option(
            300.0, help="Seconds to wait for the backup's WAL to reach the archive."
        ),
        wal_config: str | None = typer.Option(
            None,
            "--write-wal-config",
            help="First write strongroom-wal's config file here, from this process (for "
            "every run: the target block's wal_config_path).",
        ),
        owner: str | None = typer.Option(
            "postgres", "--owner", help="chown the --write-wal-config file to (when root)."
        ),
        repository: str = repo_opt,
        key: str = key_opt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Physical base backup for PITR (pg_basebackup tar, streamed and encrypted)."""
        with _handled(as_json):
            preflight(flow_blocks("postgresql", [target], repository, key))
            from flows.pitr import base_backup_postgresql, write_wal_config_from_blocks

            if wal_config:  # the caller's own rights: the flow takes no path or owner
                write_wal_config_from_blocks(
                    target, wal_config, repository=repository, encryption_key=key, owner=owner
                )
            with _progress(not as_json):
                manifest = base_backup_postgresql(
                    target=target,
                    repository=repository,
                    encryption_key=key,
                    manifest_checksums=manifest_checksums,
                    wal_timeout_s=wal_timeout,
                )
            d = manifest["details"]
            _emit(
                as_json,
                manifest,
                lambda: out.print(
                    f"[bold]{manifest['backup_id']}[/bold] base backup of {target}: "
                    f"timeline {d['timeline']}, WAL {d['start_lsn']} .. {d['stop_lsn']} "
                    f"({d['start_wal']}), {len(d['archived_wal'])} WAL file(s) archived"
                ),
            )

    @backup_app.command("postgresql-files")
    def backup_files_cmd(
        target: str = typer.Argument(
            ...,
            help="PostgresTarget block name (data_directory set; for a standby also "
            "primary_host/primary_port).",
        ),
        backup_type: str = typer.Option("incr", "--type", help="full, diff or incr."),
        checksum: bool = typer.Option(False, help="Compare unchanged-looking files by SHA-256."),
        jobs: int = typer.Option(2, "--jobs", "-j", min=1, max=64, help="Files copied at once."),
        wal_timeout: float = typer.Option(
            300.0, help="Seconds to wait for the backup's WAL to reach the archive."
        ),
        repository: str = repo_opt,
        key: str = key_opt,
        as_json: bool = JsonOpt,
    ) -> None:
        """File-level physical backup (full / differential / incremental) of the data
        directory, for a runner that can read it."""
        with _handled(as_json):
            preflight(flow_blocks("postgresql", [target], repository, key))
            from flows.pitr import files_backup_postgresql
            from strongroom.engines.postgres.pitr.files.chain import BACKUP_TYPES, BackupType

            if backup_type not in BACKUP_TYPES:
                from strongroom.errors import InvalidInput

                raise InvalidInput("--type must be full, diff or incr")
            with _progress(not as_json):
                manifest = files_backup_postgresql(
                    target=target,
                    backup_type=cast(BackupType, backup_type),
                    checksum=checksum,
                    jobs=jobs,
                    repository=repository,
                    encryption_key=key,
                    wal_timeout_s=wal_timeout,
                )
            d = manifest["details"]
            _emit(
                as_json,
                manifest,
                lambda: out.print(
                    f"[bold]{manifest['backup_id']}[/bold] {d['backup_type']} files backup of "
                    f"{target}: {d['files_copied']} file(s) copied, {d['files_referenced']} "
                    f"referenced, WAL {d['start_lsn']} .. {d['stop_lsn']}"
                    + (
                        f"\n[yellow]a {backup_type} backup was asked for, this is a full one: "
                        f"{d['full_reason']}[/yellow]"
                        if backup_type != "full" and d.get("full_reason")
                        else ""
                    )
                ),
            )

    @restore_app.command("postgresql-pitr")
    def restore_pitr_cmd(
        target: str = typer.Argument(..., help="Target whose base backups and WAL to use."),
        data_dir: str = typer.Option(..., "--data-dir", "-D", help="Empty directory."),
        backup_id: str = typer.Option("auto", "--backup-id", "-b", help="'auto' chooses."),
        time: str | None = typer.Option(None, "--time", help="Recover to this time (ISO)."),
        lsn: str | None = typer.Option(None, "--lsn", help="Recover to this LSN."),
        xid: int | None = typer.Option(None, "--xid", help="Recover to this transaction."),
        name: str | None = typer.Option(None, "--name", help="Recover to a restore point."),
        immediate: bool = typer.Option(False, "--immediate", help="Stop at consistency."),
        exclusive: bool = typer.Option(False, "--exclusive", help="Stop just before target."),
        timeline: str = typer.Option("latest", "--timeline", help="latest, current or N."),
        action: str = typer.Option("promote", "--action", help="promote, pause or shutdown."),
        start: bool = typer.Option(False, "--start", help="Start it and wait for the target."),
        port: int | None = typer.Option(None, "--port", help="Port for the restored server."),
        verify_query: str | None = typer.Option(None, "--verify-query", help="SQL to run."),
        verify_db: str = typer.Option("postgres", "--verify-db"),
        expect: str | None = typer.Option(None, "--expect", help="Expected query output."),
        archive_after: str | None = typer.Option(
            None, "--archive-to", help="Archive the new timeline into this target."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan only."),
        delta: bool = typer.Option(
            False, "--delta", help="Files backups: refresh a stale copy of the cluster in -D."
        ),
        jobs: int = typer.Option(2, "--jobs", "-j", min=1, max=64, help="Files written at once."),
        repository: str = repo_opt,
        key: str = key_opt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Point-in-time recovery into an empty data directory (--delta: onto a stale copy
        of the same cluster, fetching only what differs)."""
        with _handled(as_json):
            preflight(flow_blocks(repository=repository, key=key))
            from flows.pitr import pitr_restore_postgresql
            from strongroom.engines.postgres.pitr.plan import MAX_XID
            from strongroom.errors import InvalidInput

            chosen = [
                k
                for k, v in (
                    ("time", time),
                    ("lsn", lsn),
                    ("xid", xid),
                    ("name", name),
                    ("immediate", immediate or None),
                )
                if v is not None
            ]
            if len(chosen) > 1:
                raise InvalidInput(f"give one recovery target, not {', '.join(chosen)}")
            if action not in ("promote", "pause", "shutdown"):
                raise InvalidInput("--action must be promote, pause or shutdown")
            if xid is not None and not 0 <= xid <= MAX_XID:
                # refused before a flow run exists: Prefect's API cannot even list a run
                # whose parameters hold an integer beyond 64 bits
                raise InvalidInput(f"--xid must be a transaction id from 0 to {MAX_XID}")
            moment = None
            if time is not None:
                try:
                    moment = dt.datetime.fromisoformat(time.replace("Z", "+00:00"))
                except ValueError:
                    raise InvalidInput(f"--time {time!r} is not an ISO time") from None
            params: dict[str, Any] = {
                "target": target,
                "data_dir": data_dir,
                "backup_id": backup_id,
                "recovery_target": chosen[0] if chosen else "latest",
                "target_time": moment,
                "target_lsn": lsn,
                "target_xid": xid,
                "target_name": name,
                "inclusive": not exclusive,
                "target_timeline": timeline,
                "action": action,
                "start": start,
                "port": port,
                "verify_query": verify_query,
                "verify_database": verify_db,
                "verify_expect": expect,
                "archive_after": archive_after,
                "dry_run": dry_run,
                "delta": delta,
                "jobs": jobs,
                "repository": repository,
                "encryption_key": key,
            }
            with _progress(not as_json):
                report = pitr_restore_postgresql(**params)
            _emit(as_json, report, lambda: _print_pitr(out, report))

    @app.command("wal-check")
    def wal_check_cmd(
        target: str = typer.Argument(..., help="Target whose WAL archive to check."),
        repository: str = repo_opt,
        verify_key: str | None = typer.Option(
            None,
            "--verify",
            help="EncryptionKey block: also decrypt and check every archived WAL file.",
        ),
        repository_url: str | None = RepoUrlOpt,
        trust: str | None = TrustOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """WAL continuity per timeline, gaps, and the recoverable window (exit 4 on gaps or,
        with --verify, on a damaged or replaced WAL file)."""
        with _handled(as_json):
            from strongroom.cli.common import _read_repo
            from strongroom.engines.postgres.pitr.basebackup import base_backups_with_findings
            from strongroom.engines.postgres.wal.check import wal_check

            repo = _read_repo(repository, repository_url, trust)
            bases, untrusted = base_backups_with_findings(repo, target)
            report = wal_check(repo, target, bases, untrusted)
            if verify_key:
                from flows.common import load_key
                from strongroom.engines.postgres.wal.verify import verify_archive

                ids = [i.get_secret_value() for i in load_key(verify_key).identities]
                report["verify"] = verify_archive(repo, target, ids)
                if not report["verify"]["ok"]:
                    report["ok"] = False
                    report["problems"].append(
                        "damaged or replaced WAL: "
                        + ", ".join(f["name"] for f in report["verify"]["failed"])
                    )
            _emit(as_json, report, lambda: _print_check(out, report))
            if not report["ok"]:
                raise typer.Exit(4)

    @app.command("create-restore-point")
    def restore_point_cmd(
        target: str = typer.Argument(..., help="PostgresTarget block name."),
        name: str = typer.Argument(..., help="Restore point name."),
        wait: float = typer.Option(120.0, help="Seconds to wait for its WAL to be archived."),
        repository: str = repo_opt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Create a named restore point (pg_create_restore_point) and record it."""
        with _handled(as_json):
            preflight(flow_blocks("postgresql", [target], repository))
            from flows.pitr import create_restore_point_postgresql

            record = create_restore_point_postgresql(
                target=target, name=name, repository=repository, wait_s=wait
            )
            _emit(
                as_json,
                record,
                lambda: out.print(
                    f"restore point [bold]{name}[/bold] at {record['lsn']} "
                    f"(timeline {record['timeline']}, {record['time']})"
                ),
            )

    @app.command("wal-config")
    def wal_config_cmd(
        target: str = typer.Argument(..., help="Target name the WAL is archived under."),
        config: str = typer.Option(
            "/etc/strongroom/wal.toml", "--config", "-c", help="File to write (mode 0600)."
        ),
        identity_file: str | None = typer.Option(
            None, "--identity-file", help="Write the key block's identity here (restore hosts)."
        ),
        owner: str | None = typer.Option("postgres", "--owner", help="chown to (when root)."),
        repository: str = repo_opt,
        key: str = key_opt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Write strongroom-wal's configuration from the blocks and print the
        postgresql.conf lines that use it."""
        with _handled(as_json):
            preflight(flow_blocks(repository=repository, key=key))
            from flows.common import load_key
            from flows.pitr import write_wal_config_from_blocks
            from strongroom.engines.postgres.pitr.restore import default_wal_command
            from strongroom.engines.postgres.wal.config import load_wal_config, write_identity_file
            from strongroom.engines.postgres.wal.fast import archive_command
            from strongroom.errors import InvalidInput

            if identity_file:
                enc = load_key(key)
                if not enc.identities:
                    raise InvalidInput(f"encryption key block {key!r} holds no identity")
                write_identity_file(
                    identity_file, [i.get_secret_value() for i in enc.identities], owner=owner
                )
            path = write_wal_config_from_blocks(
                target,
                config,
                repository=repository,
                encryption_key=key,
                identity_file=identity_file,
                owner=owner,
            )
            command = default_wal_command(owner)
            repo_id = load_wal_config(path).repo_id
            archive = archive_command(command, path, repo_id).replace("'", "''")
            lines = ["archive_mode = on", f"archive_command = '{archive}'"]
            data = {"config": path, "identity_file": identity_file, "postgresql.conf": lines}
            _emit(as_json, data, lambda: out.print("\n".join([f"# wrote {path}", *lines])))

    @app.command("wal-push", context_settings=CONTEXT, add_help_option=False)
    def wal_push_cmd(ctx: typer.Context) -> None:
        """archive_command: strongroom wal-push [--config PATH] %p (see strongroom-wal)."""
        from strongroom.cli.wal import main

        raise typer.Exit(main(["push", *ctx.args]))

    @app.command("wal-fetch", context_settings=CONTEXT, add_help_option=False)
    def wal_fetch_cmd(ctx: typer.Context) -> None:
        """restore_command: strongroom wal-fetch [--config PATH] %f %p (see strongroom-wal)."""
        from strongroom.cli.wal import main

        raise typer.Exit(main(["fetch", *ctx.args]))


def _print_pitr(out: Any, r: dict[str, Any]) -> None:
    plan = r["plan"]
    verb = "plan (dry run)" if r.get("dry_run") else "restored"
    out.print(
        f"[bold]{verb}[/bold]: {r['target']} -> {r['data_dir']} from base backup "
        f"{plan['backup']['backup_id']} along timeline {plan['timeline']}"
    )
    for key, value in plan["recovery_settings"].items():
        out.print(f"  {key} = {value}")
    for note in plan.get("notes", []):
        out.print(f"  [yellow]note:[/yellow] {note}")
    recovery = r.get("recovery")
    if recovery:
        out.print(
            f"server {recovery['state']} in {recovery['seconds']} s (timeline "
            f"{recovery.get('timeline', '?')}, LSN {recovery.get('replay_lsn', '?')})"
        )
        if recovery.get("verify"):
            out.print(f"verify: {recovery['verify']['output']}")
    elif not r.get("dry_run"):
        files = r.get("files", {})
        out.print(f"start it: pg_ctl -D {r['data_dir']} start")
        out.print(f"(restore_command reads {files.get('wal_config')})")


def _print_check(out: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    mark = "[green]ok[/green]" if report["ok"] else "[red]PROBLEMS[/red]"
    out.print(f"WAL archive of [bold]{report['target']}[/bold]: {mark}")
    for problem in report["problems"]:
        out.print(f"  [red]-[/red] {problem}")
    from rich.markup import escape

    for item in report.get("untrusted", []):
        text = escape(f"{item['key']}: {item['error']}")
        out.print(f"  [red]not trusted, ignored:[/red] {text}")
    table = Table("timeline", "parent", "segments", "first", "last", "gaps")
    for t in report["timelines"]:
        table.add_row(
            str(t["timeline"]),
            str(t["parent"] or "-"),
            str(t["segments"]),
            t["first"] or "-",
            t["last"] or "-",
            ", ".join(f"{g['from']}..{g['to']}" for g in t["gaps"]) or "-",
        )
    out.print(table)
    window = report.get("window")
    if window:
        out.print(
            f"recoverable on timeline {window['timeline']}: {window['earliest']['time']} "
            f"(LSN {window['earliest']['lsn']}) to {window['latest']['time']} "
            f"(LSN {window['latest']['lsn']})"
        )
