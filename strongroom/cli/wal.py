"""``strongroom-wal``: the WAL hot path PostgreSQL calls once per 16 MiB segment.

    archive_command = 'strongroom-wal push %p'
    restore_command = 'strongroom-wal fetch %f %p'

(``strongroom wal-config`` prints a faster archive_command that lets the shell
answer for files the background pusher already stored: see docs/pitr.md.)

Usage::

    strongroom-wal push  [--config PATH] [--sync] WAL_PATH      (archive_command, %p)
    strongroom-wal fetch [--config PATH] WAL_NAME DEST_PATH     (restore_command, %f %p)
    strongroom-wal verify [--config PATH]      (read back and check every archived file)

``wal-push`` / ``wal-fetch`` are accepted as aliases. The configuration file is
``--config PATH``, else ``$STRONGROOM_CONFIG``, else ``/etc/strongroom/wal.toml``
(see strongroom/engines/postgres/wal/config.py and docs/pitr.md).

Exit codes: push: 0 only when the file is durably archived, else non-zero
(2 invalid input, 3 not found, 4 integrity, 6 storage unreachable, 9 the
archive holds a different file under this name). fetch: 0 restored, 1 not in
the archive, 200 fatal (corrupt file, gap in the archive, storage unreachable,
bad configuration): PostgreSQL stops recovery instead of ending it early.
verify (needs the identity file): 0 every archived file checks out, 4 some do not
(each named on stderr), 2 bad configuration, 6 storage unreachable.

Deliberately standard library only at start-up (no Prefect, typer, pydantic,
boto3): a cached file is answered in a few milliseconds of Python.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from strongroom.engines.postgres.wal.config import WalConfig

USAGE = __doc__ or ""
_VALUED = {"--config": "config", "-c": "config", "--pg-wal": "pg-wal"}


def _parse(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    opts: dict[str, str | bool] = {}
    args: list[str] = []
    items = iter(argv)
    for item in items:
        if item in _VALUED:
            value = next(items, None)
            if value is None:
                raise ValueError(f"{item} needs a value")
            opts[_VALUED[item]] = value
        elif item.startswith("--config="):
            opts["config"] = item.split("=", 1)[1]
        elif item in ("--sync", "--async"):
            opts["mode"] = item[2:]
        elif item in ("-h", "--help"):
            opts["help"] = True
        elif item.startswith("-") and item != "-":
            raise ValueError(f"unknown option {item}")
        else:
            args.append(item)
    return opts, args


def _fail(code: int, message: str) -> int:
    if message:
        sys.stderr.write(f"strongroom-wal: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    import os
    import time

    from strongroom.fast_exit import freeze_heap

    started = time.time()
    code = _main(argv)
    freeze_heap()
    trace = os.environ.get("STRONGROOM_WAL_TRACE")
    if trace:  # timing of every call, for benchmarks and debugging
        with open(trace, "a") as f:
            words = argv if argv is not None else sys.argv[1:]
            what = f"{words[0]} {words[-1]}" if words else "-"
            f.write(f"{started:.4f} {time.time():.4f} {what} -> {code}\n")
    return code


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    command = {"wal-push": "push", "wal-fetch": "fetch"}.get(command, command)
    fatal = 200 if command in ("fetch", "fetch-worker") else 2
    try:
        opts, args = _parse(rest)
    except ValueError as exc:
        return _fail(fatal, f"{exc}\n{USAGE}")
    if opts.get("help"):
        sys.stdout.write(USAGE)
        return 0

    import os

    from strongroom.engines.postgres.wal.config import WalConfigError, load_wal_config

    # the parsed configuration is cached in the spool under pg_wal (derived from %p)
    where = {"push": 0, "fetch": 1}.get(command)
    pg_wal = None
    if where is not None and len(args) > where:
        pg_wal = os.path.dirname(os.path.abspath(args[where]))
    elif "pg-wal" in opts:
        pg_wal = str(opts["pg-wal"])
    try:
        cfg = load_wal_config(
            str(opts["config"]) if "config" in opts else None,
            cache_dir=os.path.join(pg_wal, "strongroom") if pg_wal else None,
        )
    except WalConfigError as exc:
        return _fail(fatal, str(exc))

    from strongroom.engines.postgres.wal import fast as pg_wal_fast

    if command == "push" and len(args) == 1 and pg_wal_fast.push_fast(cfg, args[0]):
        return 0
    if command == "fetch" and len(args) == 2 and pg_wal_fast.fetch_fast(cfg, args[0], args[1]):
        return 0

    from pathlib import Path

    try:
        if command == "push":
            if len(args) != 1:
                return _fail(2, "usage: strongroom-wal push [--config PATH] [--sync] WAL_PATH")
            from strongroom.engines.postgres.wal.push import wal_push

            mode = opts.get("mode")
            code, message = wal_push(cfg, args[0], mode=str(mode) if mode else None)
            return _fail(code, message)
        if command == "fetch":
            if len(args) != 2:
                return _fail(200, "usage: strongroom-wal fetch [--config PATH] WAL_NAME DEST")
            from strongroom.engines.postgres.wal.fetch import wal_fetch

            code, message = wal_fetch(cfg, args[0], args[1])
            return _fail(code, message if code != 1 else "")
        if command == "verify":
            return _verify(cfg)
        if command == "push-worker":
            from strongroom.engines.postgres.wal.push import run_pusher

            return run_pusher(cfg, Path(str(opts["pg-wal"])))
        if command == "fetch-worker":
            from strongroom.engines.postgres.wal.fetch import run_fetcher

            return run_fetcher(cfg, Path(str(opts["pg-wal"])))
    except KeyError as exc:
        return _fail(fatal, f"missing option --{exc.args[0]}")
    except WalConfigError as exc:
        return _fail(fatal, str(exc))
    except Exception as exc:  # never a traceback with secrets into PostgreSQL's log
        from strongroom.redact import scrub

        return _fail(fatal if command != "push" else 1, scrub(f"{type(exc).__name__}: {exc}"))
    return _fail(2, f"unknown command {command!r}\n{USAGE}")


def _verify(cfg: WalConfig) -> int:
    from strongroom.engines.postgres.wal.verify import verify_archive
    from strongroom.errors import StrongroomError
    from strongroom.redact import register, scrub
    from strongroom.repository import open_repository

    try:
        repo_config = cfg.repository_config()
        identities = [
            i.get_secret_value() for i in cfg.encryption_config(need_identity=True).identities
        ]
        register(*repo_config.secrets(), *identities)
        report = verify_archive(
            open_repository(repo_config),
            cfg.target,
            identities,
            segment_size=cfg.segment_size,
            system_identifier=cfg.system_identifier,
        )
    except StrongroomError as exc:
        return _fail(exc.exit_code, scrub(str(exc)))
    for failure in report["failed"]:
        sys.stderr.write(f"strongroom-wal: {failure['error']}\n")
    bad = len(report["failed"])
    sys.stdout.write(f"{cfg.target}: {report['checked']} WAL file(s) checked, {bad} failed\n")
    return 0 if report["ok"] else 4


if __name__ == "__main__":
    sys.exit(main())
