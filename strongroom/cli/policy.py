"""CLI commands for retention, pins, restore drills and deep verification.

``register(app)`` adds them to the ``strongroom`` Typer app:

    strongroom retention apply [--dry-run]      what goes and why (which rule keeps the rest)
    strongroom pin BACKUP_ID [--reason ...]     keep forever
    strongroom unpin BACKUP_ID
    strongroom pins                             list pinned backups
    strongroom drill TARGET [--engine ...]      restore drill (flow restore-drill)
    strongroom drills                           list drill records
    strongroom deep-verify                      flow deep-verify
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from strongroom.cli.common import (
    JsonOpt,
    KeyOpt,
    RepoOpt,
    _emit,
    _handled,
    _open_repo,
    _read_repo,
    err,
    out,
    preflight,
)
from strongroom.cli.preflight import flow_blocks

retention_app = typer.Typer(help="Retention policies.", no_args_is_help=True)

PolicyOpt = typer.Option("default", "--policy", "-p", help="RetentionPolicyBlock name.")
EngineOpt = typer.Option(None, "--engine", "-e", help="postgresql, clickhouse or redis.")
TargetOpt = typer.Option(None, "--target", "-t", help="Target name.")


def _size(n: float) -> str:
    from flows.common import human_size

    return human_size(n)


def _print_retention(report: dict[str, Any]) -> None:
    dry = report["dry_run"]
    for key, text in report["policies"].items():
        out.print(f"[bold]{key}[/bold]: {text}")
    table = Table("backup id", "target", "kind", "action", "why")
    for b in report["backups"]:
        action = b["action"]
        style = {
            "deleted": "red",
            "would-delete": "yellow",
            "locked": "magenta",
            "error": "bold red",
        }.get(action, "green")
        why = b["detail"] if action in ("locked", "error", "deleted") else b["reason"]
        if action == "would-delete":
            why = "no rule keeps it"
        table.add_row(
            b["backup_id"],
            f"{b['engine']}/{b['target']}",
            b["kind"],
            f"[{style}]{action}[/{style}]",
            why,
        )
    out.print(table)
    s = report["summary"]
    verb = "would delete" if dry else "deleted"
    gone = s["would_delete"] if dry else s["deleted"]
    out.print(
        f"{s['backups']} backups: kept {s['kept']}, {verb} {gone}, locked {s['locked']}"
        + ("" if dry else f", freed {_size(s['bytes_freed'])}")
    )
    for o in report["orphans"]:
        out.print(
            f"orphan {o['prefix']} ({o['objects']} objects, {_size(o['bytes'])}): {o['action']}"
        )
    for w in report["wal"]:
        n = w["would_delete"] if dry else w["deleted"]
        out.print(
            f"WAL {w['target']}: {verb} {n} segment(s) before {w['oldest_needed'] or '-'}"
            + (f" ({w['note']})" if w["note"] else "")
        )
    for d in report["dangling"]:
        err.print(f"[red]manifest with missing data:[/red] {d}")
    for e in report["errors"]:
        err.print(f"[red]error:[/red] {e}")
    if dry:
        out.print("[yellow]dry run: nothing was changed[/yellow]")


@retention_app.command("apply")
def retention_apply_cmd(
    policy: str = PolicyOpt,
    engine: str | None = EngineOpt,
    target: str | None = TargetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would go and why."),
    orphan_grace_hours: float | None = typer.Option(
        None, help="Leave data without a manifest younger than this (default: policy's)."
    ),
    no_orphans: bool = typer.Option(False, "--no-orphans", help="Skip the orphan pass."),
    no_wal: bool = typer.Option(False, "--no-wal", help="Leave the PITR WAL archive alone."),
    repository: str = RepoOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Apply a retention policy (flow apply-retention); never deletes locked objects."""
    with _handled(as_json):
        preflight(flow_blocks(repository=repository, policy=policy))
        from flows.retention import apply_retention

        report = apply_retention(
            policy=policy,
            repository=repository,
            engine=engine,
            target=target,
            dry_run=dry_run,
            orphan_grace_hours=orphan_grace_hours,
            clean_orphans=not no_orphans,
            prune_wal=not no_wal,
        )
        _emit(as_json, report, lambda: _print_retention(report))


def pin_cmd(
    backup_id: str = typer.Argument(..., help="Backup id (or 'latest' with --target)."),
    engine: str | None = EngineOpt,
    target: str | None = TargetOpt,
    reason: str = typer.Option("", "--reason", help="Why it is kept (shown in reports)."),
    repository: str = RepoOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Pin a backup: retention keeps it until it is unpinned."""
    with _handled(as_json):
        from strongroom.policy.pins import pin

        record = pin(_open_repo(repository), backup_id, engine=engine, target=target, reason=reason)
        _emit(
            as_json,
            record,
            lambda: out.print(
                f"pinned {record['backup_id']} ({record['engine']}/{record['target']})"
            ),
        )


def unpin_cmd(
    backup_id: str = typer.Argument(...),
    engine: str | None = EngineOpt,
    target: str | None = TargetOpt,
    repository: str = RepoOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Remove a pin; the backup is subject to the retention policy again."""
    with _handled(as_json):
        from strongroom.policy.pins import unpin

        record = unpin(_open_repo(repository), backup_id, engine=engine, target=target)
        _emit(as_json, record, lambda: out.print(f"unpinned {record['backup_id']}"))


def pins_cmd(
    engine: str | None = EngineOpt,
    target: str | None = TargetOpt,
    repository: str = RepoOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List pinned backups."""
    with _handled(as_json):
        from strongroom.policy.pins import list_pins

        rows = list_pins(_read_repo(repository), engine, target)

        def human() -> None:
            table = Table("backup id", "target", "pinned at", "by", "reason")
            for r in rows:
                table.add_row(
                    r["backup_id"],
                    f"{r['engine']}/{r['target']}",
                    str(r.get("pinned_at", ""))[:19],
                    str(r.get("pinned_by", "")),
                    str(r.get("reason", "")),
                )
            out.print(table)
            for r in rows:
                if not r["trusted"]:
                    err.print(f"[yellow]{r['untrusted']} (it still protects the backup)[/yellow]")

        _emit(as_json, rows, human)


def drill_cmd(
    target: str = typer.Argument(..., help="Target block name."),
    engine: str = typer.Option("postgresql", "--engine", "-e"),
    backup_id: str = typer.Option("latest", "--backup-id", "-b"),
    scratch: str | None = typer.Option(
        None, "--scratch", help="Target block of a scratch server to restore into."
    ),
    sandbox: bool = typer.Option(
        False, "--sandbox", help="Start a throwaway server for the drill."
    ),
    compare_live: str = typer.Option(
        "off", "--compare-live", help="off, report (record drift) or strict (fail on drift)."
    ),
    rto_minutes: float | None = typer.Option(None, help="RTO objective (default: target's)."),
    rpo_hours: float | None = typer.Option(None, help="RPO objective (default: target's)."),
    policy: str | None = typer.Option(None, "--policy", help="Policy block for defaults."),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Restore drill: restore into a scratch target, compare, measure RTO/RPO, clean up."""
    with _handled(as_json):
        preflight(flow_blocks(engine, [target, scratch], repository, key, policy))
        from flows.drill import restore_drill, summarize
        from strongroom.drills import DrillFailed

        try:
            record = restore_drill(
                target=target,
                engine=engine,
                backup_id=backup_id,
                repository=repository,
                encryption_key=key,
                scratch_target=scratch,
                sandbox=sandbox,
                compare_live=compare_live,
                rto_minutes=rto_minutes,
                rpo_hours=rpo_hours,
                policy=policy,
            )
        except DrillFailed as exc:
            if not as_json:
                title, lines, _ = summarize(exc.record)
                err.print(f"[red]{title}[/red]")
                for line in lines:
                    err.print(line, markup=False, highlight=False)
            raise

        def human() -> None:
            title, lines, _ = summarize(record)
            out.print(f"[green]{title}[/green]")
            for line in lines:
                out.print(line, markup=False, highlight=False)

        _emit(as_json, record, human)


def drills_cmd(
    engine: str | None = EngineOpt,
    target: str | None = TargetOpt,
    repository: str = RepoOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List restore drill records, oldest first."""
    with _handled(as_json):
        from strongroom.drills import list_drills

        rows = list_drills(_read_repo(repository), engine, target)
        _emit(as_json, rows, lambda: print_drills(rows))


def print_drills(rows: list[dict[str, Any]]) -> None:
    """The human table for drill rows (``list_drills`` output); for ``list --drills`` too."""
    table = Table("drill id", "target", "backup id", "result", "RTO s (obj)", "RPO s (obj)")

    def pair(value: Any, objective: Any) -> str:
        shown = "-" if value is None else f"{float(value):,.1f}"
        return shown + ("" if objective is None else f" ({float(objective):,.0f})")

    for r in rows:
        table.add_row(
            str(r["drill_id"]),
            f"{r['engine']}/{r['target']}",
            str(r["backup_id"] or "-"),
            "[green]passed[/green]" if r["ok"] else "[red]FAILED[/red]",
            pair(r["rto_s"], r["rto_objective_s"]),
            pair(r["rpo_s"], r["rpo_objective_s"]),
        )
    out.print(table)


def deep_verify_cmd(
    engine: str | None = EngineOpt,
    target: str | None = TargetOpt,
    policy: str | None = typer.Option(None, "--policy", help="Policy block for sampling."),
    sample_fraction: float | None = typer.Option(None, help="Share of the rest to re-read."),
    max_backups: int | None = typer.Option(None, help="At most this many backups."),
    max_gib: float | None = typer.Option(None, help="At most this much stored data."),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Deep verify (flow deep-verify): re-read sampled backups, store evidence records."""
    with _handled(as_json):
        preflight(flow_blocks(repository=repository, key=key, policy=policy))
        from flows.deep_verify import deep_verify_flow

        report = deep_verify_flow(
            repository=repository,
            encryption_key=key,
            engine=engine,
            target=target,
            policy=policy,
            sample_fraction=sample_fraction,
            max_backups=max_backups,
            max_gib=max_gib,
        )

        def human() -> None:
            table = Table("backup id", "target", "why", "result", "secs")
            for r in report["results"]:
                table.add_row(
                    r["backup_id"],
                    f"{r['engine']}/{r['target']}",
                    r["reason"],
                    "[green]ok[/green]" if r["ok"] else f"[red]FAILED[/red] {r['error']}",
                    str(r["seconds"]),
                )
            out.print(table)
            out.print(f"verified {report['verified']} of {report['backups_in_scope']} backups")

        _emit(as_json, report, human)


def register(app: typer.Typer) -> None:
    """Add the retention, pin, drill and deep-verify commands to ``app``."""
    app.add_typer(retention_app, name="retention")
    app.command("pin")(pin_cmd)
    app.command("unpin")(unpin_cmd)
    app.command("pins")(pins_cmd)
    app.command("drill")(drill_cmd)
    app.command("drills")(drills_cmd)
    app.command("deep-verify")(deep_verify_cmd)
