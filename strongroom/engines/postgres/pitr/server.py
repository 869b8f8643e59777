"""Running a restored cluster: OS user, pg_ctl, psql over its socket, waiting for recovery.

PostgreSQL refuses to run as root, so when strongroom runs as root the restored
data directory is handed to the cluster's OS user (``postgres`` by default) and
every server tool runs through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from strongroom.engines.postgres.backup import pg_tool
from strongroom.errors import InvalidInput, StrongroomError, ToolFailed
from strongroom.redact import scrub

DEFAULT_OS_USER = "postgres"


def resolve_os_user(data_dir: Path, requested: str | None) -> str | None:
    """The OS user the restored cluster runs as; None means "whoever we are" (not root)."""
    if requested:
        try:
            pwd.getpwnam(requested)
        except KeyError:
            raise InvalidInput(f"OS user {requested!r} does not exist") from None
        return requested
    if os.geteuid() != 0:
        return None
    if data_dir.exists():
        owner = pwd.getpwuid(data_dir.stat().st_uid).pw_name
        if owner != "root":
            return owner
    try:
        pwd.getpwnam(DEFAULT_OS_USER)
    except KeyError:
        raise InvalidInput(
            "running as root: give os_user, the account the restored PostgreSQL runs as"
        ) from None
    return DEFAULT_OS_USER


def as_user(user: str | None) -> list[str]:
    if user is None or os.geteuid() != 0 or user == "root":
        return []
    return ["runuser", "-u", user, "--"]


def _env(password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password
    return env


@dataclass
class RestoredServer:
    """A restored data directory and how to start and reach it."""

    data_dir: Path
    port: int
    socket_dir: Path
    log_path: Path
    os_user: str | None
    db_user: str = "postgres"
    password: str | None = None

    def start(self, timeout_s: float) -> None:
        """``pg_ctl start`` without waiting: archive recovery can take long; ``wait``
        follows it."""
        argv = [
            *as_user(self.os_user),
            pg_tool("pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            f"-p {self.port} -k {self.socket_dir}",
            "-W",
            "start",
        ]
        result = subprocess.run(
            argv, capture_output=True, text=True, env=_env(None), timeout=timeout_s, check=False
        )
        if result.returncode != 0:
            raise ToolFailed(
                f"pg_ctl start failed ({result.returncode}): "
                f"{scrub(result.stderr.strip() or result.stdout.strip())}\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            [
                *as_user(self.os_user),
                pg_tool("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "stop",
            ],
            capture_output=True,
            env=_env(None),
            timeout=90,
            check=False,
        )

    def reload(self) -> None:
        """``pg_ctl reload``: the server re-reads pg_hba.conf (strongroom's rule gone)."""
        subprocess.run(
            [*as_user(self.os_user), pg_tool("pg_ctl"), "-D", str(self.data_dir), "reload"],
            capture_output=True,
            env=_env(None),
            timeout=60,
            check=False,
        )

    def running(self) -> bool:
        result = subprocess.run(
            [*as_user(self.os_user), pg_tool("pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            env=_env(None),
            timeout=30,
            check=False,
        )
        return result.returncode == 0

    def psql(self, sql: str, database: str = "postgres", timeout_s: float = 300) -> str:
        argv = [
            *as_user(self.os_user),
            pg_tool("psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            self.db_user,
            "-d",
            database,
            "-c",
            sql,
        ]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=_env(self.password),
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise ToolFailed(f"psql on the restored server failed: {scrub(result.stderr.strip())}")
        return result.stdout.rstrip("\n")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return scrub("\n".join(text[-lines:]))

    def log_lines(self, needle: str) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [scrub(line) for line in text if needle in line]

    def wait_recovery(self, action: str, timeout_s: float) -> dict[str, object]:
        """Wait until recovery reached its end (promote), paused at the target (pause) or
        shut the server down (shutdown), following the server log (polling with
        connections would fill the log with "starting up" errors). Raises with the
        log's reason when the server stops instead."""
        deadline = time.monotonic() + timeout_s
        grace = time.monotonic() + 15.0  # pg_ctl -W returns before postmaster.pid exists
        seen = False
        done = {
            "promote": "database system is ready to accept connections",
            "pause": "recovery has paused",
            "shutdown": "database system is shut down",
        }[action]
        while time.monotonic() < deadline:
            reached = bool(self.log_lines(done))
            if action == "shutdown" and reached:
                if self.log_lines("recovery stopping"):
                    return {"state": "shut down at the target"}
                break
            if reached and action == "promote":
                if self.psql("SELECT pg_is_in_recovery()", timeout_s=30) == "f":
                    return {"state": "promoted"}
            elif reached and self.psql("SELECT pg_get_wal_replay_pause_state()") == "paused":
                return {"state": "paused at the target"}
            alive = self.running()
            if not alive and (seen or time.monotonic() >= grace):
                break
            seen = seen or alive
            time.sleep(0.1)
        if time.monotonic() >= deadline:
            raise StrongroomError(
                f"recovery did not finish within {timeout_s:.0f} s; server log:\n{self.log_tail()}"
            )
        noise = ("database system is starting up", "not yet accepting connections")
        reasons = [
            line
            for line in self.log_lines("FATAL") + self.log_lines("strongroom-wal:")
            if not any(n in line for n in noise)
        ]
        reason = "\n".join(dict.fromkeys(reasons[-6:])) or self.log_tail()
        raise StrongroomError(f"the restored server stopped during recovery:\n{reason}")
