"""CLI commands for compliance and monitoring, added to ``strongroom`` by ``register(app)``:

* ``strongroom audit``: run the compliance-audit flow (report JSON + HTML, events);
  exit 10 when a control fails.
* ``strongroom audit verify``: walk the hash-chained audit trail; exit 4 on tampering.
* ``strongroom audit log``: the newest audit events.
* ``strongroom metrics``: serve Prometheus metrics on 127.0.0.1:PORT.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from strongroom.cli.preflight import flow_blocks

audit_app = typer.Typer(
    help="Compliance audit (controls, HTML report) and the tamper-evident audit trail.",
    invoke_without_command=True,
)

_JSON = typer.Option(False, "--json", help="Print one JSON document for scripts.")
_REPO = typer.Option("default", "--repository", "-r", help="BackupRepository block name.")


def _cli() -> Any:
    from strongroom.cli import common as cli

    return cli


def _open_repo(repository: str) -> Any:
    """The repository for a read command (no Prefect import: strongroom.cli.repo_source)."""
    from strongroom.cli.repo_source import open_read_repository

    return open_read_repository(repository)


def _dump(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@audit_app.callback()
def audit_cmd(
    ctx: typer.Context,
    repository: str = _REPO,
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="Local copy of the report (default ./strongroom-reports)."
    ),
    retention_file: Path | None = typer.Option(
        None, "--retention", help="JSON file with the default retention policy fields."
    ),
    no_discover: bool = typer.Option(
        False, "--no-discover", help="Do not read target blocks (RPO/RTO) from Prefect."
    ),
    as_json: bool = _JSON,
) -> None:
    """Evaluate every compliance control and write the JSON + HTML report (exit 10 on a
    failed control). Subcommands: verify, log."""
    if ctx.invoked_subcommand is not None:
        return
    cli = _cli()
    with cli._handled(as_json):
        cli.preflight(flow_blocks(repository=repository))
        from flows.audit import compliance_audit
        from strongroom.compliance.model import ControlsFailed

        retention = json.loads(retention_file.read_text()) if retention_file else None
        failed: ControlsFailed | None = None
        try:
            result = compliance_audit(
                repository=repository,
                output_dir=str(output_dir) if output_dir else None,
                retention=retention,
                discover=not no_discover,
            )
        except ControlsFailed as exc:
            failed = exc
            result = exc.summary
        if as_json:
            _dump(result)
        else:
            _print_audit(cli, result)
        if failed is not None:
            raise typer.Exit(failed.exit_code)


def _print_audit(cli: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    colour = {"pass": "green", "warn": "yellow", "fail": "red"}
    table = Table("control", "result", "title", "summary")
    for c in result.get("controls", []):
        st = c["status"]
        table.add_row(
            c["id"], f"[{colour[st]}]{st.upper()}[/{colour[st]}]", c["title"], c["summary"]
        )
    cli.out.print(table)
    s = result.get("summary", {})
    cli.out.print(
        f"{s.get('pass', 0)} pass, {s.get('warn', 0)} warn, {s.get('fail', 0)} fail; "
        f"report: {result.get('paths', {}).get('html', '?')}",
        highlight=False,
    )


def _parse_anchor(text: str) -> tuple[int, str]:
    from strongroom.errors import InvalidInput

    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidInput(f"invalid anchor {text[:80]!r}: expected SEQ:SHA256 (64 hex digits)")
    return int(seq), digest


@audit_app.command("verify")
def audit_verify_cmd(
    repository: str = _REPO,
    anchor: list[str] = typer.Option(
        [], "--anchor", help="SEQ:SHA256 recorded elsewhere (repeatable): detects an edited tail."
    ),
    as_json: bool = _JSON,
) -> None:
    """Walk the audit trail: a removed, reordered or edited event exits 4."""
    cli = _cli()
    with cli._handled(as_json):
        from strongroom.audit import verify_chain

        anchors = dict(_parse_anchor(a) for a in anchor)
        report = verify_chain(_open_repo(repository), anchors=anchors)
        data = report.as_dict()
        if as_json:
            _dump(data)
        else:
            for p in report.problems:
                cli.err.print(f"[red]{p.kind}[/red] event {p.seq}: {p.detail}", highlight=False)
            mark = "[green]intact[/green]" if report.ok else "[red]TAMPERED[/red]"
            cli.out.print(
                f"audit trail {mark}: {report.events} events, head {report.head_seq} "
                f"{report.head_sha256}",
                highlight=False,
            )
        if not report.ok:
            from strongroom.errors import IntegrityError

            raise typer.Exit(IntegrityError.exit_code)


@audit_app.command("log")
def audit_log_cmd(
    repository: str = _REPO,
    limit: int = typer.Option(20, "--limit", "-n", help="Newest N events."),
    as_json: bool = _JSON,
) -> None:
    """Show the newest audit events (who, what, target, backup, result)."""
    cli = _cli()
    with cli._handled(as_json):
        from rich.table import Table

        from strongroom.audit import read_events

        events = read_events(_open_repo(repository))[-limit:]
        rows = [e.model_dump(mode="json") for e in events]

        def human() -> None:
            table = Table("seq", "when", "who", "action", "target", "backup", "result")
            for e in events:
                who = (
                    e.actor.get("deployment_name")
                    or e.actor.get("flow_run_name")
                    or (f"{e.actor.get('user', '?')}@{e.actor.get('host', '?')}")
                )
                table.add_row(
                    str(e.seq),
                    e.occurred_at.isoformat(timespec="seconds"),
                    str(who),
                    e.action,
                    f"{e.engine}/{e.target}" if e.target else "",
                    e.backup_id or "",
                    e.result,
                )
            cli.out.print(table)

        cli._emit(as_json, rows, human)


def metrics_cmd(
    repository: str = _REPO,
    port: int = typer.Option(9187, "--port", "-p", help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    cache_seconds: float = typer.Option(30.0, "--cache", help="Seconds between repository reads."),
) -> None:
    """Serve Prometheus metrics (backups, WAL lag, drills, controls) over HTTP."""
    cli = _cli()
    with cli._handled(False):
        from strongroom.metrics import serve

        repo = _open_repo(repository)
        server, _thread = serve(repo, port=port, host=host, cache_seconds=cache_seconds)
        cli.err.print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()


def register(app: typer.Typer) -> None:
    """Add ``audit`` (with ``verify``, ``log``) and ``metrics`` to the ``strongroom`` app."""
    app.add_typer(audit_app, name="audit")
    app.command("metrics")(metrics_cmd)
