"""``strongroom wal-receive TARGET``: the streaming WAL receiver (pg_receivewal on a slot).

Reads the same WAL configuration file as ``strongroom-wal`` (repository, recipients,
target) and connects with libpq's environment (PGHOST, PGPORT, PGUSER, PGPASSWORD,
or PGSERVICE): see strongroom/engines/postgres/wal/receive.py and docs/pitr.md.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("wal-receive")
    def wal_receive_cmd(
        target: str = typer.Argument(..., help="Target the WAL is archived under."),
        config: str | None = typer.Option(
            None, "--config", "-c", help="strongroom-wal configuration (else the default path)."
        ),
        directory: str = typer.Option(
            ..., "--directory", "-D", help="Local spool pg_receivewal writes into."
        ),
        slot: str = typer.Option(
            "strongroom_wal_receive", "--slot", help="Physical slot (created or adopted)."
        ),
        synchronous: bool = typer.Option(
            False,
            "--synchronous",
            help="Flush every write and report it: name 'strongroom_wal_receive' in "
            "synchronous_standby_names.",
        ),
        poll: float = typer.Option(0.2, "--poll", help="Seconds between spool scans."),
        partial_interval: float = typer.Option(
            10.0,
            "--partial-interval",
            help="Seconds between pushes of the segment being received (.partial); 0: only "
            "when stopping.",
        ),
        listen: str | None = typer.Option(
            None,
            "--listen",
            help="HOST:PORT for /metrics, /status, /healthz and /readyz (e.g. 0.0.0.0:9188 "
            "in a pod); off when not given.",
        ),
        status_interval: float = typer.Option(
            5.0, "--status-interval", help="Seconds between the server status queries (lag)."
        ),
        push_partial: bool = typer.Option(
            False,
            "--push-partial",
            help="Push the spool's completed segments and its .partial once, then exit "
            "(no streaming).",
        ),
    ) -> None:
        """Stream WAL with pg_receivewal and push every completed segment into the
        repository (exit 9 when the archive holds a different segment)."""
        from pathlib import Path

        from strongroom.engines.postgres.wal.config import WalConfigError, load_wal_config
        from strongroom.engines.postgres.wal.receive import Receiver
        from strongroom.errors import StrongroomError
        from strongroom.redact import scrub

        try:
            cfg = load_wal_config(config)
            if cfg.target != target:
                typer.echo(
                    f"strongroom wal-receive: {cfg.path} archives target {cfg.target!r}, "
                    f"not {target!r}",
                    err=True,
                )
                raise typer.Exit(2)
            receiver = Receiver(
                cfg,
                Path(directory),
                slot=slot,
                synchronous=synchronous,
                partial_interval_s=partial_interval,
            )
            if push_partial:
                receiver.pushed_dir.mkdir(parents=True, exist_ok=True)
                receiver.push_completed()
                outcome = receiver.push_partial()
                typer.echo(f"partial: {outcome or 'none in the spool'}")
                raise typer.Exit(0)
            code = _run(receiver, target, slot, poll, listen, status_interval)
        except WalConfigError as exc:
            typer.echo(f"strongroom wal-receive: {exc}", err=True)
            raise typer.Exit(2) from None
        except StrongroomError as exc:
            typer.echo(f"strongroom wal-receive: {scrub(str(exc))}", err=True)
            raise typer.Exit(exc.exit_code) from None
        raise typer.Exit(code)


def _run(
    receiver: object, target: str, slot: str, poll: float, listen: str | None, interval: float
) -> int:
    """Run the receiver, with its monitor and HTTP endpoints when ``listen`` is given."""
    from strongroom.engines.postgres.wal.receive import Receiver
    from strongroom.engines.postgres.wal.receive_status import Monitor, serve
    from strongroom.errors import InvalidInput

    assert isinstance(receiver, Receiver)
    if listen is None:
        return receiver.run(poll_s=poll)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or interval <= 0:
        raise InvalidInput(f"--listen wants HOST:PORT and --status-interval > 0, not {listen!r}")
    monitor = Monitor(receiver.env, slot, receiver.view, interval_s=interval)
    try:
        server = serve(monitor, target, host.strip("[]"), int(port))
    except OSError as exc:
        raise InvalidInput(f"--listen {listen}: {exc.strerror or exc}") from None
    monitor.start()
    try:
        return receiver.run(poll_s=poll, monitor=monitor)
    finally:
        monitor.stop()
        server.shutdown()
