"""A scratch ``redis-server`` started by a restore: loads a backup so it can be checked and
copied server to server, then is stopped by its PID and its directory removed.

It listens on 127.0.0.1 only, on a free port, with a random password kept in a
0600 config file (never argv), no persistence (``save ""``, no AOF) and enough
databases for the backup. Readiness waits out ``LOADING`` for as long as the
size of the file needs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from pydantic import SecretStr

from strongroom.engines.redis.conn import RedisConnection
from strongroom.errors import IntegrityError, ServiceUnavailable, ToolFailed
from strongroom.redact import register
from strongroom.sandbox._process import listens_on, log_tail, spawn, stop_process
from strongroom.sandbox.ports import free_port

RDB_NAME = "dump.rdb"
SCRATCH_PREFIX = "strongroom-scratch-redis-"
OWNER_FILE = "owner"


def _owner_tag() -> str:
    return f"{os.getpid()} {socket.gethostname()}"


def _owner_gone(folder: Path) -> bool:
    """True when the folder's owner was a process on this host that no longer runs."""
    try:
        pid_text, host = (folder / OWNER_FILE).read_text().split(maxsplit=1)
        pid = int(pid_text)
    except (OSError, ValueError):
        return False  # no owner record (or unreadable): not ours to judge
    if host.strip() != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_scratch(parent: str | None = None) -> list[str]:
    """Remove scratch folders left by killed restores (they hold a decrypted backup).

    A folder is removed only when its owner record names a process on this host that
    has exited; the scratch server itself died with its parent (parent-death signal).
    """
    root = Path(parent or tempfile.gettempdir())
    removed: list[str] = []
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        if folder.is_dir() and _owner_gone(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise ToolFailed(
            "redis-server is not installed on this runner: live restores and pre-flight "
            "loads need it (apt-get install redis-server)"
        )
    return found


def local_redis_version() -> str:
    out = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return "0.0.0"


class ScratchRedis:
    """One throwaway redis-server; use as a context manager."""

    def __init__(
        self, *, databases: int = 16, parent: str | None = None, rdb_checksum: bool = True
    ) -> None:
        self.stale_removed = remove_stale_scratch(parent)
        self.base = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
        self.base.chmod(0o700)
        (self.base / OWNER_FILE).write_text(_owner_tag())
        self.dir = self.base / "data"
        self.dir.mkdir(mode=0o700)
        self.rdb_path = self.dir / RDB_NAME
        self.log_path = self.base / "redis.log"
        self.conf_path = self.base / "redis.conf"
        self.password = secrets.token_urlsafe(24)
        register(self.password)
        self.databases = max(16, databases)
        # no: skip the CRC64 on load (~0.7 CPU-s per GB) where a SHA-256 proves the bytes
        self.rdb_checksum = rdb_checksum
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def connection(self) -> RedisConnection:
        return RedisConnection(
            name="scratch",
            host="127.0.0.1",
            port=self.port,
            password=SecretStr(self.password),
            command_timeout=600,
        )

    def start(self, timeout: float = 60.0) -> Self:
        """Start (loading ``rdb_path`` if it exists) and wait until loading has finished."""
        self.launch()
        return self.wait_loaded(timeout)

    def launch(self) -> None:
        """Start the server without waiting (it loads ``rdb_path`` meanwhile)."""
        self.port = free_port()
        self.conf_path.touch(mode=0o600)
        self.conf_path.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    f'requirepass "{self.password}"',
                    f'dir "{self.dir}"',
                    f"dbfilename {RDB_NAME}",
                    'logfile ""',
                    "daemonize no",
                    'save ""',
                    "appendonly no",
                    f"databases {self.databases}",
                    "maxmemory 0",
                    f"rdbchecksum {'yes' if self.rdb_checksum else 'no'}",
                    "sanitize-dump-payload no",
                ]
            )
            + "\n"
        )
        self.log_path.write_text("")
        self.proc = spawn(
            [redis_server_binary(), str(self.conf_path)], log_path=self.log_path, cwd=self.base
        )

    def wait_loaded(self, timeout: float = 60.0) -> Self:
        """Wait until the launched server has loaded its data; a port taken by another
        process between the probe and the bind is retried (twice) on a new port."""
        for attempt in range(3):
            if attempt:
                self.launch()
            try:
                self._wait(timeout)
                return self
            except ServiceUnavailable:
                text = self.log_text()
                self.stop()
                if "Address already in use" in text and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")

    def check_alive(self) -> None:
        """Raise IntegrityError if the launched server has exited (it could not load)."""
        code = self.proc.poll() if self.proc is not None else None
        if code is not None:
            tail = log_tail(self.log_path, 8)
            raise IntegrityError(
                f"the scratch redis-server could not load the backup (exit {code}): "
                f"{' | '.join(tail.splitlines()[-4:])}"
            )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait(self, timeout: float) -> None:
        import redis

        deadline = time.monotonic() + timeout
        client = self.connection().client(timeout=5)
        try:
            while True:
                assert self.proc is not None
                code = self.proc.poll()
                if code is not None:
                    tail = log_tail(self.log_path, 8)
                    if "Address already in use" in tail:
                        raise ServiceUnavailable("scratch redis-server: port taken")
                    raise IntegrityError(
                        f"the scratch redis-server could not load the backup (exit {code}): "
                        f"{' | '.join(tail.splitlines()[-4:])}"
                    )
                if listens_on(self.proc.pid, [self.port]):
                    try:
                        if client.ping():
                            return
                    except redis.exceptions.BusyLoadingError:
                        pass
                    except redis.RedisError:
                        pass
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(
                        f"the scratch redis-server did not finish loading in {timeout:.0f} s"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.proc, [(signal.SIGTERM, 20.0)])
        self.proc = None

    def cleanup(self) -> None:
        # it persists nothing (save "", no AOF): SIGKILL spares the shutdown's wait for
        # freeing the dataset (0.3 s per GB)
        stop_process(self.proc, [(signal.SIGKILL, 20.0)])
        self.proc = None
        if os.environ.get("STRONGROOM_KEEP_SCRATCH", "") in ("", "0"):
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.cleanup()
