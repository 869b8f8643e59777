"""A throwaway streaming standby of a sandbox PostgreSQL 15 primary, for tests of backups
taken from a standby.

``pg_basebackup`` (as the postgres OS user, over the primary's private Unix socket)
copies the primary into the standby's own temp folder and creates a physical
replication slot; the standby then streams from the primary over TCP on 127.0.0.1 with
the superuser's password (``primary_conninfo``), ``hot_standby`` on, no archiving of its
own. It is a :class:`PostgresServer` (same lifecycle: stopped by the PID we started).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import Self

from strongroom.sandbox._process import ServerStartError, make_temp_dir
from strongroom.sandbox.postgres import (
    PostgresServer,
    PsqlError,
    _as_postgres_user,
    chown_to_postgres,
    clean_libpq_env,
)


class StandbyServer(PostgresServer):
    """A hot standby of ``primary`` (which must be running, with ``max_wal_senders``)."""

    def __init__(self, primary: PostgresServer, *, slot: str = "strongroom_standby") -> None:
        self.primary = primary
        self.slot = slot
        super().__init__(
            make_temp_dir("pg-standby"),
            password=primary.password,
            bin_dir=primary.bin_dir,
            settings={
                "hot_standby": "on",
                "primary_conninfo": self.conninfo(primary.port),
                "primary_slot_name": slot,
                "wal_receiver_status_interval": 1,
                "hot_standby_feedback": "on",
            },
        )
        self._owns_dir = True

    def __repr__(self) -> str:
        return f"StandbyServer(port={self.port}, primary port={self.primary.port})"

    def conninfo(self, port: int) -> str:
        """``primary_conninfo`` for a primary on ``port`` of 127.0.0.1."""
        return (
            f"host={self.primary.host} port={port} user={self.primary.superuser} "
            f"password={self.primary.password} application_name=strongroom_standby "
            "connect_timeout=2"
        )

    def start(self) -> Self:
        if not (self.data_dir / "PG_VERSION").exists():
            self._clone()
        super().start()
        self.wait_streaming()
        return self

    def _clone(self) -> None:
        chown_to_postgres(self.base_dir)
        result = subprocess.run(
            [
                *_as_postgres_user(),
                self.bin_dir / "pg_basebackup",
                "-D",
                self.data_dir,
                "-h",
                str(self.primary.socket_dir),
                "-p",
                str(self.primary.port),
                "-U",
                self.primary.superuser,
                "-X",
                "stream",
                "-c",
                "fast",
                "-C",
                "-S",
                self.slot,
                "--no-sync",
            ],
            cwd=self.base_dir,
            env=clean_libpq_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise ServerStartError(
                "pg_basebackup (standby)",
                f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}",
                [],
            )
        (self.data_dir / "standby.signal").touch()
        chown_to_postgres(self.data_dir / "standby.signal", 0o600)

    def receiver_status(self) -> str:
        """``pg_stat_wal_receiver.status`` ('' when no WAL receiver runs)."""
        return self.psql("SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), '')")

    def wait_streaming(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.receiver_status() != "streaming":
            if time.monotonic() > deadline:
                raise ServerStartError(
                    "standby", f"not streaming after {timeout:.0f} s", [self.log_path]
                )
            time.sleep(0.1)

    def wait_replayed(self, lsn: str, timeout: float = 60.0) -> None:
        """Until the standby has replayed the primary's WAL up to ``lsn``."""
        deadline = time.monotonic() + timeout
        query = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        while self.psql(query) != "t":
            if time.monotonic() > deadline:
                raise AssertionError(f"standby did not replay {lsn} in {timeout:.0f} s")
            time.sleep(0.05)

    def catch_up(self) -> None:
        """Until the standby has replayed everything the primary flushed so far."""
        self.wait_replayed(self.primary.psql("SELECT pg_current_wal_flush_lsn()"))

    def point_at(self, port: int) -> None:
        """Re-point ``primary_conninfo`` (reloaded: the WAL receiver restarts), e.g. at a
        port where nothing listens, so the standby stops streaming."""
        self.psql(
            "ALTER SYSTEM SET primary_conninfo = '"
            + self.conninfo(port).replace("'", "''")
            + "'; SELECT pg_reload_conf()"
        )

    def cleanup(self) -> None:
        super().cleanup()
        with contextlib.suppress(PsqlError):  # the primary may be stopped already
            self.primary.psql(
                f"SELECT pg_drop_replication_slot('{self.slot}')"
                f" FROM pg_replication_slots WHERE slot_name = '{self.slot}'"
            )
