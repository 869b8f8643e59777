"""Redis with ``appendonly yes`` (Redis 7 multi-part AOF): backups and file restores.

A file restore into an AOF server must leave it loading the restored data, never its
older AOF: the AOF folder is rebuilt around the restored RDB while the server is down.
The round trip is checked key by key (type, full value, TTL presence) with the gauntlet's
``fingerprint``, and again after a second restart (the server kept appending to its new
AOF and loads it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.config import EncryptionConfig
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.key_copy import wait_ready
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.errors import TargetNotEmpty, ToolFailed
from strongroom.sandbox.gauntlet_redis import fingerprint
from strongroom.sandbox.redis import RedisServer
from tests.test_redis import Repo, populate

DBS = (0, 1, 3)


def start(conn: RedisConnection) -> None:
    subprocess.run(shlex.split(conn.start_command or ""), check=True, timeout=30)


class AofTarget:
    """An AOF redis-server restarted through local commands (as on a VM)."""

    def __init__(self) -> None:
        self.server = RedisServer(extra_config="appendonly yes\nappendfsync always").start()
        self.pidfile = self.server.base_dir / "daemon.pid"

    def conn(self, **extra: Any) -> RedisConnection:
        s = self.server
        fields: dict[str, Any] = {
            "data_path": str(s.dir / "dump.rdb"),
            "stop_command": f"redis-cli -h {s.host} -p {s.port} shutdown",
            "start_command": f"redis-server {s.conf_path} --daemonize yes --pidfile {self.pidfile}",
        }
        fields.update(extra)
        return RedisConnection(
            name="aof", host=s.host, port=s.port, password=SecretStr(s.password), **fields
        )

    def restart(self) -> None:
        conn = self.conn()
        self.server.cli("SHUTDOWN", check=False)
        for _ in range(200):
            if not self._alive():
                break
            time.sleep(0.05)
        start(conn)
        wait_ready(conn, 30)

    def _alive(self) -> bool:
        return self.server.cli("PING", check=False, timeout=2) == "PONG"

    def stop(self) -> None:
        if self.pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(self.pidfile.read_text().strip()), signal.SIGTERM)
        self.server.stop()


@pytest.fixture(scope="module")
def aof() -> Iterator[AofTarget]:
    target = AofTarget()
    yield target
    target.stop()


def _manifest_lines(folder: Path) -> list[str]:
    return (folder / "appendonly.aof.manifest").read_text().splitlines()


def test_aof_file_round_trip(aof: AofTarget, local_repo: Repo, age_key: EncryptionConfig) -> None:
    server = aof.server
    populate(server)
    conn = aof.conn()
    before = fingerprint(conn, DBS)
    assert sum(len(v) for v in before.values()) > 1900
    manifest = backup_redis(conn, local_repo[0], local_repo[1], age_key)
    assert manifest.server["aof_enabled"] is True
    assert manifest.details["method"] == "sync"
    # writes after the backup reach the AOF (an increment, then a rewrite, then another)
    server.cli("SET", "after:1", "x")
    server.cli("DEL", "str:plain")
    server.cli("BGREWRITEAOF")
    time.sleep(0.5)
    server.cli("SET", "after:2", "y")
    aof_dir = server.dir / "appendonlydir"
    old_lines = _manifest_lines(aof_dir)
    assert any("type i" in line for line in old_lines)

    req = RedisRestoreRequest(mode="file")
    with pytest.raises(TargetNotEmpty):
        restore_redis(conn, local_repo[0], age_key, req)
    dry = req.model_copy(update={"dry_run": True, "flush_existing": True})
    plan = restore_redis(conn, local_repo[0], age_key, dry)
    assert plan["aof"]["aof_dir"] == str(aof_dir)
    report = restore_redis(
        conn, local_repo[0], age_key, req.model_copy(update={"flush_existing": True})
    )
    assert report["keys_ok"] and report["matches_manifest"] and report["sample"]["ok"]
    assert server.cli("CONFIG", "GET", "appendonly").splitlines()[1] == "yes"
    assert fingerprint(conn, DBS) == before  # not the older AOF: no after:*, str:plain back
    previous = Path(report["previous_aof_dir"])
    assert _manifest_lines(previous) == old_lines  # the replaced AOF, kept
    lines = _manifest_lines(aof_dir)
    assert lines[0] == "file appendonly.aof.1.base.rdb seq 1 type b"
    # the server appends to its new AOF and loads it after another restart
    server.cli("SET", "written:after-restore", "kept")
    aof.restart()
    after = fingerprint(conn, DBS)
    assert after[0].pop(b"written:after-restore")
    assert after == before


def test_aof_restore_failing_start_puts_the_old_aof_back(
    aof: AofTarget, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    server = aof.server
    conn = aof.conn()
    server.cli("SET", "only:before", "1")
    current = fingerprint(conn, DBS)
    old_lines = _manifest_lines(server.dir / "appendonlydir")
    backup_redis(conn, local_repo[0], local_repo[1], age_key)
    # a start command that fails once the server is down: the rollback restarts the
    # server itself with its previous data and AOF
    broken = aof.conn(start_command="false")
    with pytest.raises(ToolFailed, match="previous AOF folder put back"):
        restore_redis(
            broken,
            local_repo[0],
            age_key,
            RedisRestoreRequest(mode="file", flush_existing=True),
        )
    start(aof.conn())  # the rollback's start also failed
    wait_ready(conn, 30)
    assert _manifest_lines(server.dir / "appendonlydir") == old_lines
    assert fingerprint(conn, DBS) == current
