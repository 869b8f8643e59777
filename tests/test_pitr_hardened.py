"""PITR on hardened clusters: local rules that want a password (scram-sha-256, md5) or
the OS user (peer), as ``initdb --auth-local=...`` writes them.

Followed as docs/pitr.md tells an operator: the WAL configuration and the printed
archive_command, a base backup, more load, then a restore to a time T with ``--start``
(with and without a verification query). strongroom admits its own connections on its
private socket with a temporary rule; afterwards the restored ``pg_hba.conf`` is the
original byte for byte and the rule no longer admits anyone.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyrage import x25519

from strongroom.engines.postgres.backup import pg_tool
from strongroom.engines.postgres.pitr.basebackup import base_backup_postgres
from strongroom.engines.postgres.pitr.plan import PitrRequest
from strongroom.engines.postgres.pitr.restore import pitr_restore
from strongroom.engines.postgres.pitr.server import RestoredServer
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.sandbox.postgres import chown_to_postgres
from tests.fixtures.ports import free_port
from tests.test_pitr import Cluster, _cluster

AUTH = ["scram-sha-256", "md5", "peer"]


@pytest.fixture(scope="module", params=AUTH)
def hardened(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, dt.datetime]]:
    """One small cluster per local auth method, with a base backup, rows before the
    time T it returns and rows after it (archived)."""
    root = make_temp_dir("pitr-auth")
    c = _cluster(root, "hard", x25519.Identity.generate(), auth_local=request.param)
    try:
        hba = (c.server.data_dir / "pg_hba.conf").read_text()
        assert (
            f"local   all             all                                     {request.param}"
            in hba
        )
        c.sql("CREATE TABLE t_at (x int); INSERT INTO t_at VALUES (1), (2)")
        base_backup_postgres(c.conn, c.repo, c.repo_config, c.enc)
        c.sql("INSERT INTO t_at VALUES (3)")
        time.sleep(0.3)
        at = dt.datetime.now(dt.UTC)
        time.sleep(0.3)
        c.sql("INSERT INTO t_at VALUES (4)")
        c.switch_and_wait()
        yield c, at
    finally:
        c.server.stop()
    remove_dir(root)


def _restore(c: Cluster, at: dt.datetime, where: Path, **kw: Any) -> dict[str, Any]:
    chown_to_postgres(where, 0o755)
    req = PitrRequest(
        target=c.target,
        data_dir=str(where / "data"),
        recovery_target="time",
        target_time=at,
        start=True,
        port=free_port(),
        wait_timeout_s=120,
        **kw,
    )
    return pitr_restore(c.repo, c.repo_config, c.enc, req)


def _socket_admits(socket_dir: str, port: int) -> subprocess.CompletedProcess[str]:
    """A password-less socket connection as root (not the cluster's OS user)."""
    return subprocess.run(
        [
            pg_tool("psql"),
            "-X",
            "-w",
            "-h",
            socket_dir,
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "SELECT 1",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify_query"])
def test_pitr_start_on_a_hardened_cluster(
    hardened: tuple[Cluster, dt.datetime], verify: bool
) -> None:
    c, at = hardened
    original = (c.server.data_dir / "pg_hba.conf").read_bytes()
    where = make_temp_dir("pitr-auth-restore")
    report: dict[str, Any] = {}
    try:
        extra = (
            {
                "verify_query": "SELECT string_agg(x::text, ',' ORDER BY x) FROM t_at",
                "verify_expect": "1,2,3",
            }
            if verify
            else {}
        )
        report = _restore(c, at, where, **extra)
        rec = report["recovery"]
        assert rec["state"] == "promoted" and rec["hba_rule_removed"] is True
        if verify:
            assert rec["verify"]["ok"] is True
        assert (where / "data" / "pg_hba.conf").read_bytes() == original
        # the rule is gone from the running server too (reloaded): no password, no entry
        refused = _socket_admits(rec["socket_dir"], rec["port"])
        assert refused.returncode != 0, refused.stdout
        # the data at T, read as a client of the hardened cluster would (TCP, password)
        out = subprocess.run(
            [
                pg_tool("psql"),
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                str(rec["port"]),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                "SELECT string_agg(x::text, ',' ORDER BY x) FROM t_at",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": "/usr/bin:/bin", "PGPASSWORD": c.server.password},
            timeout=60,
        )
        assert out.stdout.strip() == "1,2,3"
    finally:
        if report:
            RestoredServer(
                where / "data", report["recovery"]["port"], where, where, "postgres"
            ).stop("immediate")
        remove_dir(where)


# {dir}: the test's own folder. Exit 1: pg_stat_archiver counts the failures. Exit 126 and
# 127: the archiver exits FATAL before counting, the postmaster restarts it every 10 s; the
# watch sees the .ready file waiting and the archiver process gone (superuser or
# pg_monitor), or only no progress (a role with neither).
FAILING = {
    "fails_with_secret": ("sh -c 'echo AWS_SECRET_ACCESS_KEY=hunter2-not-real >&2; exit 1' %p", ""),
    "false": ("false %p", ""),
    "exit126_not_executable": ("{dir}/not-executable %p", "superuser"),
    "exit127_not_found_server_log": (
        "/nonexistent/strongroom-wal --password=hunter2-not-real push %p",
        "logging_collector",
    ),
    "exit127_not_found_without_pg_monitor": ("/nonexistent/strongroom-wal push %p", "plain_role"),
}


@pytest.mark.parametrize("case", list(FAILING), ids=list(FAILING))
def test_failing_archive_command_fails_the_base_backup_fast(case: str) -> None:
    """The base backup reads pg_stat_archiver (and the archiver's process and
    archive_status) while it waits for its WAL: a failing archive_command ends it within
    30 s with a ToolFailed (not retried as transient) naming the command, its secrets
    redacted, and the best error available; nothing is published."""
    from pydantic import SecretStr

    from strongroom.catalog import Catalog
    from strongroom.config import EncryptionConfig, PostgresConnection
    from strongroom.errors import ServiceUnavailable, ToolFailed
    from strongroom.sandbox.postgres import PostgresServer
    from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config

    template, mode = FAILING[case]
    root = make_temp_dir("pitr-badarch")
    chown_to_postgres(root, 0o755)
    command = template.replace("{dir}", str(root))
    (root / "not-executable").write_text("#!/bin/sh\nexit 0\n")
    (root / "not-executable").chmod(0o644)  # readable by postgres, not executable: exit 126
    key = x25519.Identity.generate()
    settings = {"logging_collector": "on"} if mode == "logging_collector" else {}
    server = PostgresServer(root / "src", archive_command=command, settings=settings)
    try:
        server.start()
        user, password = "postgres", server.password
        if mode == "plain_role":  # what a base backup needs, without superuser or pg_monitor
            user, password = "strongroom_bk", "bk-" + server.password
            server.psql(
                f"CREATE ROLE {user} LOGIN REPLICATION PASSWORD '{password}';"
                f" GRANT EXECUTE ON FUNCTION pg_control_system() TO {user};"
                f" GRANT EXECUTE ON FUNCTION pg_control_checkpoint() TO {user};"
            )
        repo = make_local_repo(root / "repo")
        config = signed_config(kind="local", path=str(root / "repo"))
        enc = EncryptionConfig(recipients=[str(key.to_public())])
        conn = PostgresConnection(
            name="badarch",
            host=server.host,
            port=server.port,
            user=user,
            password=SecretStr(password),
        )
        started = time.monotonic()
        with pytest.raises(ToolFailed) as caught:
            base_backup_postgres(conn, repo, config, enc, wal_timeout_s=600)
        took = time.monotonic() - started
        message = str(caught.value)
        print(f"{case}: base backup refused after {took:.1f} s: {message}")
        assert not isinstance(caught.value, ServiceUnavailable)
        assert took < 30
        assert "archive_command" in message and "pg_stat_archiver" in message
        assert command.split()[0] in message
        assert "hunter2" not in message
        if mode in ("superuser", "logging_collector"):
            assert "archiver process is" in message and ".ready" not in message
            assert "waits to be archived" in message
        if mode == "plain_role":
            assert "pg_monitor" in message
        if mode == "logging_collector":
            assert "failed with exit code 127" in message and "not found" in message
        assert Catalog(repo).list() == []
    finally:
        server.stop()
    remove_dir(root)


def test_pitr_flow_takes_no_socket_folder_or_os_user() -> None:
    """A root worker must not chown what a flow parameter names (issue 15, item 6)."""
    import inspect

    from flows.pitr import pitr_restore_postgresql

    params = inspect.signature(pitr_restore_postgresql.fn).parameters
    assert "socket_dir" not in params and "os_user" not in params


def test_wal_config_path_and_owner_come_from_the_target_block() -> None:
    """A flow parameter must not make a root worker write the repository secret to any
    path and chown it to any user (issue 15, item 6): the base-backup flow takes no
    such parameter; the PostgreSQL target block carries them to the connection the
    flow writes with (tests/test_pitr.py::test_flows_and_cli writes through it)."""
    import inspect

    from blocks import PostgresTarget
    from flows.pitr import base_backup_postgresql
    from strongroom.errors import InvalidInput

    params = inspect.signature(base_backup_postgresql.fn).parameters
    assert not [p for p in params if p.startswith("wal_config") or "owner" in p or "path" in p]
    block = PostgresTarget(wal_config_path="/etc/strongroom/wal.toml", wal_config_owner="pgarch")
    conn = block.to_connection("prod-db")
    assert (conn.wal_config_path, conn.wal_config_owner) == ("/etc/strongroom/wal.toml", "pgarch")
    default = PostgresTarget().to_connection("prod-db")
    assert (default.wal_config_path, default.wal_config_owner) == (None, "postgres")
    with pytest.raises(InvalidInput, match="absolute"):
        PostgresTarget(wal_config_path="etc/wal.toml").to_connection("prod-db")


def test_planted_symlink_at_a_private_name_is_not_followed(tmp_path: Path) -> None:
    """write_new (WAL config, identity file, pg_hba.conf) replaces a symlink planted at
    the final name and never writes through it; its temporary name is random."""
    import os

    from strongroom.engines.postgres.root_fs import write_new

    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    folder = tmp_path / "spool"
    folder.mkdir()
    (folder / "wal.toml").symlink_to(victim)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_new(fd, "wal.toml", b"secret = 1\n")
    finally:
        os.close(fd)
    assert victim.read_text() == "root's file\n"
    assert not (folder / "wal.toml").is_symlink()
    assert (folder / "wal.toml").read_bytes() == b"secret = 1\n"
    assert (folder / "wal.toml").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in folder.iterdir()) == ["wal.toml"]
