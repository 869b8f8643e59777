"""``strongroom copy``: copy backups, WAL and evidence to a second repository.

Runs the ``copy-backups`` flow (so every copy is a recorded Prefect run, audited in
the source repository). Exit codes as for every command: 4 when something was refused
(a signature, a checksum, a hostile key), 6 when a storage could not be reached.
"""

from __future__ import annotations

from typing import Any

import typer

from strongroom.cli.common import JsonOpt, err, out, run_flow, size
from strongroom.cli.preflight import POLICY_SLUG, flow_blocks


def register(app: typer.Typer) -> None:
    app.command("copy")(copy_cmd)


def copy_cmd(
    source: str = typer.Option("default", "--from", help="BackupRepository block to copy from."),
    destination: str = typer.Option(..., "--to", help="BackupRepository block to copy to."),
    backup: list[str] = typer.Option(
        [], "--backup", "-b", help="Only this backup (and those it builds on); repeatable."
    ),
    since: str | None = typer.Option(
        None, "--since", help="Only backups finished since an ISO time or an age (36h, 7d)."
    ),
    engine: str | None = typer.Option(None, help="postgresql, clickhouse or redis."),
    target: str | None = typer.Option(None),
    wal: bool = typer.Option(True, "--wal/--no-wal", help="Copy the PostgreSQL WAL archive."),
    evidence: bool = typer.Option(
        True, "--evidence/--no-evidence", help="Copy audit, drill and verification records."
    ),
    jobs: int = typer.Option(4, min=1, max=64, help="Objects copied in parallel."),
    destination_policy: str | None = typer.Option(
        None, help="RetentionPolicy block for the destination's object locks."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Copy backups (signed manifests and artifacts), WAL and evidence from one repository
    to another, verifying signatures and checksums on the way; idempotent and resumable."""

    def call() -> dict[str, Any]:
        from flows.copy import copy_backups

        result: dict[str, Any] = copy_backups(
            repository=source,
            destination=destination,
            backup_ids=backup or None,
            since=since,
            engine=engine,
            target=target,
            wal=wal,
            evidence=evidence,
            jobs=jobs,
            destination_policy=destination_policy,
        )
        return result

    needs = flow_blocks(repository=source) + flow_blocks(repository=destination)
    if destination_policy:
        needs.append((POLICY_SLUG, destination_policy))
    run_flow(as_json, call, _print_copy, needs)


def _print_copy(report: dict[str, Any]) -> None:
    s = report["summary"]
    out.print(f"copied {report['source']} -> {report['destination']}", highlight=False)
    out.print(
        f"backups: {s['backups_copied']} copied, {s['backups_skipped']} already there; "
        f"objects: {s['objects_copied']} copied ({size(s['bytes_copied'])}), "
        f"{s['objects_skipped']} identical",
        highlight=False,
    )
    for error in report.get("errors", []):
        err.print(f"refused: {error}", markup=False, highlight=False)
