"""The ``strongroom`` command: backups, restores, listing and verification from a shell.

Commands that change things run the Prefect flows (so every run is recorded in
Prefect); read-only commands use the engine directly. ``--json`` prints one
JSON document on stdout for scripts. Exit codes: 0 ok, 1 unexpected error,
2 invalid input, 3 not found (also a missing block, checked before any flow run),
4 integrity failure, 5 target not empty, 6 service unavailable (also: no Prefect API
configured), 7 access denied, 8 tool failed, 9 conflict,
10 a compliance control failed, 11 no space left (repository or spool).
"""

from __future__ import annotations

import typer

from strongroom.cli import (
    audit,
    blocks_cmd,
    catalog,
    clickhouse,
    copy,
    doctor,
    ops,
    pitr,
    policy,
    postgres,
    redis,
    signing,
    wal_receive,
)

app = typer.Typer(help=__doc__, no_args_is_help=True)
backup_app = typer.Typer(help="Back up a target.", no_args_is_help=True)
restore_app = typer.Typer(help="Restore a backup into a target.", no_args_is_help=True)
blocks_app = typer.Typer(help="Prefect block types.", no_args_is_help=True)
app.add_typer(backup_app, name="backup")
app.add_typer(restore_app, name="restore")
app.add_typer(blocks_app, name="blocks")

postgres.register(backup_app, restore_app)
catalog.register(app, blocks_app)
clickhouse.register(backup_app, restore_app)
redis.register(backup_app, restore_app)
pitr.register(app, backup_app, restore_app)
policy.register(app)
audit.register(app)
ops.register(app)
signing.register(app)
doctor.register(app)
wal_receive.register(app)
blocks_cmd.register(app)
copy.register(app)


def main() -> None:
    import os
    import sys

    from strongroom.fast_exit import exit_now, freeze_heap

    if os.environ.get("STRONGROOM_FAST_EXIT", "1") == "0":
        try:
            app()
        finally:
            freeze_heap()
        return
    code: int = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    exit_now(code)


if __name__ == "__main__":
    main()
