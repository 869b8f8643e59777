"""A throwaway PostgreSQL 15 cluster on 127.0.0.1 with password (SCRAM) auth over TCP."""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from strongroom.sandbox._process import (
    PORT_ATTEMPTS,
    ServerStartError,
    listens_on,
    make_temp_dir,
    remove_dir,
    spawn,
    stop_process,
    wait_until,
)
from strongroom.sandbox.ports import free_port

PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
PG_OS_USER = "postgres"
_CONF_FILE = "strongroom_test.conf"


def _as_postgres_user() -> list[str]:
    """Prefix for commands that must not run as root (initdb, postgres)."""
    return ["runuser", "-u", PG_OS_USER, "--"] if os.geteuid() == 0 else []


def chown_to_postgres(path: Path, mode: int = 0o700, *, recursive: bool = False) -> None:
    """Make ``path`` (created as a directory if missing) owned by the postgres OS user,
    e.g. an archive directory for archive_command, or (``recursive``) a restored data dir."""
    if not path.exists():
        path.mkdir(parents=True)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        if recursive:
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    path.chmod(mode)


def clean_libpq_env() -> dict[str, str]:
    """os.environ without PG* variables (a stray PGPASSWORD/PGSERVICE/... must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _quote_conf(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PsqlError(RuntimeError):
    pass


class PostgresServer:
    """initdb + postgres (run as the ``postgres`` OS user), stopped by the PID we started.

    Unix-socket connections are trusted (used by :meth:`psql`); TCP on 127.0.0.1 requires
    ``password`` (scram-sha-256) for ``superuser``.
    """

    host = "127.0.0.1"
    superuser = "postgres"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        archive_command: str | None = None,
        settings: Mapping[str, str | int] | None = None,
        password: str | None = None,
        bin_dir: Path = PG_BIN_DIR,
        auth_local: str = "trust",
    ) -> None:
        """``base_dir`` may hold an existing ``data`` dir (e.g. a restored backup, owned by
        postgres: see :func:`chown_to_postgres`); then initdb is skipped, pass its
        ``password``. ``settings`` are extra postgresql.conf settings (they win)."""
        self._owns_dir = base_dir is None
        self.base_dir = base_dir if base_dir is not None else make_temp_dir("pg")
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir
        self.log_path = self.base_dir / "postgres.log"
        self.bin_dir = bin_dir
        self._fixed_port = port
        self.port = port if port is not None else 0
        self.archive_command = archive_command
        self.extra_settings = dict(settings or {})
        self.password = password if password is not None else secrets.token_urlsafe(24)
        # initdb --auth-local: a hardened cluster's local rule (psql then goes over TCP
        # with the password, as a client of such a cluster would)
        self.auth_local = auth_local
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:  # no password in reprs / assertion messages
        return f"PostgresServer(host={self.host!r}, port={self.port}, data_dir={self.data_dir})"

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self
        chown_to_postgres(self.base_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(PORT_ATTEMPTS):
            self.port = self._fixed_port or free_port()
            self._write_settings()
            self.log_path.write_text("")
            self.proc = spawn(
                [self.bin_dir / "postgres", "-D", self.data_dir],
                log_path=self.log_path,
                cwd=self.base_dir,
                env=clean_libpq_env(),
                death_signal=signal.SIGINT,  # fast shutdown if pytest dies
                user=PG_OS_USER if os.geteuid() == 0 else None,
            )
            try:
                wait_until("postgres", self._ready, self.proc, [self.log_path], timeout=60)
                return self
            except ServerStartError as exc:
                stop_process(self.proc, [(signal.SIGQUIT, 5.0)])
                self.proc = None
                if not exc.port_conflict or self._fixed_port or attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        # SIGINT = fast shutdown (disconnect clients, checkpoint), then immediate, then KILL.
        stop_process(self.proc, [(signal.SIGINT, 20.0), (signal.SIGQUIT, 5.0)])
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir:
            remove_dir(self.base_dir)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.cleanup()
        else:
            self.stop()  # keep the directory (logs) when something failed

    def _initdb(self) -> None:
        pwfile = self.base_dir / "pwfile"
        try:
            pwfile.touch(mode=0o600)
            pwfile.write_text(self.password + "\n")
            chown_to_postgres(pwfile, 0o600)
            result = subprocess.run(
                [
                    *_as_postgres_user(),
                    self.bin_dir / "initdb",
                    "-D",
                    self.data_dir,
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    f"--auth-local={self.auth_local}",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ],
                cwd=self.base_dir,
                env=clean_libpq_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServerStartError(
                "postgres initdb",
                f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}",
                [],
            )

    def _write_settings(self) -> None:
        settings: dict[str, str | int] = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "wal_level": "replica",
            "max_wal_senders": 5,
            "fsync": "off",
            "synchronous_commit": "off",
            "archive_mode": "on" if self.archive_command is not None else "off",
        }
        if self.archive_command is not None:
            settings["archive_command"] = self.archive_command
        settings.update(self.extra_settings)
        lines = [
            f"{key} = {value if isinstance(value, int) else _quote_conf(value)}"
            for key, value in settings.items()
        ]
        (self.data_dir / _CONF_FILE).write_text("\n".join(lines) + "\n")
        main_conf = self.data_dir / "postgresql.conf"
        include = f"include_if_exists = '{_CONF_FILE}'"
        if include not in main_conf.read_text():
            with main_conf.open("a") as f:
                f.write(f"\n{include}\n")

    def _ready(self) -> bool:
        assert self.proc is not None
        if not listens_on(self.proc.pid, [self.port]):
            return False
        # Via our private Unix socket: a foreign server cannot answer for us.
        probe = [str(self.bin_dir / "pg_isready"), "-q", "-t", "2", "-h", str(self.socket_dir)]
        probe += ["-p", str(self.port)]
        return subprocess.run(probe, env=clean_libpq_env(), timeout=5).returncode == 0

    # helpers ------------------------------------------------------------------------------
    def dsn(self, db: str = "postgres") -> str:
        """libpq conninfo over TCP with the password (for psycopg, pg_dump -d ...)."""
        return (
            f"host={self.host} port={self.port} user={self.superuser} "
            f"password={self.password} dbname={db}"
        )

    def libpq_env(self, db: str = "postgres") -> dict[str, str]:
        """Environment for libpq tools (pg_dump, pg_basebackup...) connecting over TCP."""
        env = clean_libpq_env()
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.superuser,
            PGPASSWORD=self.password,
            PGDATABASE=db,
        )
        return env

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL (several statements allowed) over the Unix socket; return unaligned,
        tuples-only output without the trailing newline. Raises PsqlError on any error."""
        result = subprocess.run(
            [
                self.bin_dir / "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir) if self.auth_local == "trust" else self.host,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                db,
                "-f",
                "-",
            ],
            input=sql,
            env={**clean_libpq_env(), "PGPASSWORD": self.password},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise PsqlError(f"psql failed ({result.returncode}) on {db!r}: {result.stderr}")
        return result.stdout.removesuffix("\n")

    def create_database(self, name: str) -> None:
        self.psql(f"CREATE DATABASE {quote_ident(name)}")

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
