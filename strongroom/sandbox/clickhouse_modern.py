"""A throwaway ClickHouse 26.x server, from the chdb-core wheel on PyPI.

Why it exists: users run ClickHouse 23.x-26.x, but the only clickhouse-server this
machine's package sources carry is Debian's 18.16 (2018). chdb-core 26.9.0 ships a
whole ClickHouse 26.9 whose clickhouse-local can listen on TCP and HTTP, so the
engine is tested against a modern server too (issue 17). Recipe and limits are in
shared/FIELD-NOTES.md ("ClickHouse 26.x from PyPI"):

- a child Python process imports chdb (which changes the working directory), goes
  to the folder holding ``config.xml`` (ports, ``listen_host``, a ``backups`` disk
  for native BACKUP, a one-shard cluster ``sr_local`` for Distributed tables), then runs
  one blocking query that opens the listeners and
  sleeps; the ports stay open while it runs. It is stopped by its PID (SIGTERM,
  then SIGKILL).
- chdb pulls numpy, pandas and pyarrow: they are only ever imported in that child,
  never in the test process.
- one passwordless ``default`` user, no access management (CREATE USER fails), no
  Keeper (no Replicated tables), no TLS. chdb's own ``default`` database has the
  engine ``Overlay``: tests use databases of their own.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self
from xml.sax.saxutils import escape

from strongroom.sandbox._process import (
    listens_on,
    make_temp_dir,
    spawn,
    start_retrying_ports,
    stop_process,
)
from strongroom.sandbox.clickhouse import HTTPQueries
from strongroom.sandbox.ports import free_port

CHDB_PACKAGE = "chdb"
CHDB_DIST = "chdb-core==26.9.0"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
BACKUPS_DISK = "backups"
# one shard, the server itself: what a ``Distributed`` table needs to be created
CLUSTER = "sr_local"

# Runs in the child: argv[1] is the config folder, argv[2] the data folder. The query
# blocks for ~30 years; SIGTERM ends the process.
_CHILD = """
import os, sys
import chdb
from chdb import _chdb
os.chdir(sys.argv[1])
_chdb.query(
    "SYSTEM START LISTEN TCP; SYSTEM START LISTEN HTTP; "
    "SELECT sleepEachRow(1) FROM numbers(1000000000) SETTINGS max_block_size = 1 FORMAT Null",
    "TabSeparated",
    path=sys.argv[2],
)
"""


class ChdbMissing(RuntimeError):
    """chdb-core is not installed in this environment."""


def chdb_installed() -> bool:
    """True when the chdb package can be imported (checked without importing it)."""
    return importlib.util.find_spec(CHDB_PACKAGE) is not None


class ModernClickHouseServer(HTTPQueries):
    """ClickHouse 26.x (chdb-core's clickhouse-local) with all state under a temp dir.

    Same interface as ``ClickHouseServer``: ``host``, ``user``, ``http_port``,
    ``tcp_port``, ``base_dir``, ``start()``/``stop()``, a context manager,
    ``query``/``query_bytes``; ``backups_path`` is the folder of the ``backups`` disk
    (``BACKUP ... TO Disk('backups', 'name')``).
    """

    label = "ch26"
    version_prefix = "26."
    has_users = False

    def __init__(self, base_dir: Path | None = None) -> None:
        self.base_dir = base_dir if base_dir is not None else make_temp_dir("clickhouse26")
        self.path = self.base_dir / "data"
        self.config_dir = self.base_dir / "config"
        self.config_path = self.config_dir / "config.xml"
        self.backups_path = self.base_dir / "backups"
        self.stdout_path = self.base_dir / "clickhouse26.log"
        self.http_port = 0
        self.tcp_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None

    def __repr__(self) -> str:
        return (
            f"ModernClickHouseServer(host={self.host!r}, http_port={self.http_port}, "
            f"tcp_port={self.tcp_port}, base_dir={self.base_dir})"
        )

    @property
    def logs(self) -> list[Path]:
        return [self.stdout_path]

    def _write_config(self) -> None:
        for folder in (self.path, self.config_dir, self.backups_path):
            folder.mkdir(parents=True, exist_ok=True)
        backups = escape(f"{self.backups_path}/")
        self.config_path.write_text(
            f"""<?xml version="1.0"?>
<clickhouse>
    <listen_host>{self.host}</listen_host>
    <tcp_port>{self.tcp_port}</tcp_port>
    <http_port>{self.http_port}</http_port>
    <storage_configuration>
        <disks>
            <{BACKUPS_DISK}><type>local</type><path>{backups}</path></{BACKUPS_DISK}>
        </disks>
    </storage_configuration>
    <remote_servers>
        <{CLUSTER}><shard><replica>
            <host>{self.host}</host><port>{self.tcp_port}</port>
        </replica></shard></{CLUSTER}>
    </remote_servers>
    <backups>
        <allowed_disk>{BACKUPS_DISK}</allowed_disk>
        <allowed_path>{backups}</allowed_path>
    </backups>
</clickhouse>
"""
        )

    def start(self) -> Self:
        if not chdb_installed():
            raise ChdbMissing(
                f"the ClickHouse 26.x test server needs {CHDB_DIST} (dev dependency group): "
                "run `uv sync --frozen` (make test does)"
            )
        started = time.monotonic()
        start_retrying_ports(
            "clickhouse 26 (chdb)", self._launch, self._ready, self.stop, START_TIMEOUT_S
        )
        self.start_seconds = round(time.monotonic() - started, 2)
        return self

    def _launch(self) -> tuple[subprocess.Popen[bytes], list[Path]]:
        self.http_port, self.tcp_port = free_port(), free_port()
        self._write_config()
        self.stdout_path.write_text("")
        self.proc = spawn(
            [sys.executable, "-c", _CHILD, self.config_dir, self.path],
            log_path=self.stdout_path,
            cwd=self.base_dir,
        )
        return self.proc, self.logs

    def _ready(self) -> bool:
        assert self.proc is not None
        if not listens_on(self.proc.pid, [self.http_port, self.tcp_port]):
            return False
        return self.ping()

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process (None once it is gone)."""
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        stop_process(self.proc, [(signal.SIGTERM, STOP_TIMEOUT_S)])
        self.proc = None
