"""Database faults during a backup: the dump's connection is killed, the server is
unreachable or restarted, a statement timeout fires, the spool or repository disk is full."""

from __future__ import annotations

import contextlib
import errno
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.errors import ServiceUnavailable, StorageFull, StrongroomError
from strongroom.repository.local import LocalRepository
from strongroom.sandbox.ports import free_port
from strongroom.sandbox.postgres import PostgresServer
from strongroom.verify import verify_backup
from tests.faults._support import BIG_POPULATE
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import make_local_repo, pg_connection, signed_config


@pytest.mark.slow
def test_dump_connection_terminated_mid_stream_leaves_nothing(
    big_source: PgDatabase,
    big_conn: PostgresConnection,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """pg_terminate_backend on pg_dump's COPY: a clear failure, no manifest, no data, no temp."""
    repo, config = local_repo
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["manifest"] = backup_postgres(big_conn, repo, config, age_key)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    terminated = "0"
    deadline = time.monotonic() + 60
    while terminated.strip() in ("", "0"):
        assert worker.is_alive(), f"the backup ended before the fault: {outcome}"
        assert time.monotonic() < deadline, "pg_dump's COPY was never seen"
        terminated = big_source.server.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{big_source.name}' AND query ILIKE 'COPY%' AND state = 'active'"
        )
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert "manifest" not in outcome, "a backup whose dump was cut reported success"
    error = outcome["error"]
    assert isinstance(error, StrongroomError) and str(error), repr(error)
    assert Catalog(repo).list() == []
    # an in-process failure cleans up after itself: no artifacts, no temp files
    assert list(repo.list("data/")) == []
    assert not list(repo.root.rglob(".*.tmp-*"))


def test_unreachable_server_fails_fast_and_clearly(
    big_conn: PostgresConnection,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    repo, config = local_repo
    dead = big_conn.model_copy(update={"port": free_port(), "connect_timeout": 2})
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        backup_postgres(dead, repo, config, age_key)
    assert time.monotonic() - started < 30
    assert str(dead.port) in str(caught.value) or "127.0.0.1" in str(caught.value)
    assert not list(repo.list(""))


def _in_thread(run: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["manifest"] = run()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    return worker, outcome


def _copy_active(server: PostgresServer, database: str) -> bool:
    return server.psql(
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND query ILIKE 'COPY%' AND state = 'active'"
    ).strip() not in ("", "0")


def _assert_nothing_left(repo: LocalRepository) -> None:
    assert Catalog(repo).list() == []
    assert list(repo.list("data/")) == []
    assert not list(repo.root.rglob(".*.tmp-*"))


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test alone (it is restarted), on a fixed port, with the big table."""
    server = PostgresServer(port=free_port()).start()
    try:
        server.create_database("src")
        server.psql(BIG_POPULATE, db="src")
        yield server
    finally:
        server.stop()
        server.cleanup()


@pytest.mark.slow
def test_server_restart_mid_dump_fails_clearly_then_recovers(
    own_server: PostgresServer,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """Fast shutdown + start on the same port while pg_dump's COPY streams: the backup
    raises ServiceUnavailable, leaves nothing, and the next backup succeeds and verifies."""
    repo, config = local_repo
    conn = PostgresConnection(
        name="restarted",
        host=own_server.host,
        port=own_server.port,
        password=SecretStr(own_server.password),
        databases=["src"],
        connect_timeout=5,
    )
    port = own_server.port
    worker, outcome = _in_thread(lambda: backup_postgres(conn, repo, config, age_key))
    deadline = time.monotonic() + 60
    while not _copy_active(own_server, "src"):
        assert worker.is_alive(), f"the backup ended before the restart: {outcome}"
        assert time.monotonic() < deadline, "pg_dump's COPY was never seen"
        time.sleep(0.005)
    own_server.stop()  # SIGINT: fast shutdown, clients are disconnected
    own_server.start()
    assert own_server.port == port
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert "manifest" not in outcome, "a backup cut by a server restart reported success"
    error = outcome["error"]
    assert isinstance(error, ServiceUnavailable), repr(error)
    assert "src" in str(error) and own_server.password not in str(error)
    _assert_nothing_left(repo)
    manifest = backup_postgres(conn, repo, config, age_key)
    assert verify_backup(repo, manifest, age_key)["ok"]
    assert [m.backup_id for m in Catalog(repo).list()] == [manifest.backup_id]


@pytest.fixture
def timeout_role(pg_db: PgDatabase) -> Iterator[tuple[str, str]]:
    """A login role whose sessions get ``statement_timeout`` from the role itself."""
    role, password = f"sr_timeout_{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    pg_db.server.psql(
        f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}';"
        f"ALTER ROLE {role} SET statement_timeout = '1500ms'"
    )
    try:
        yield role, password
    finally:
        pg_db.server.psql(f"DROP ROLE IF EXISTS {role}")


def test_statement_timeout_fails_clearly_and_leaves_nothing(
    pg_db: PgDatabase,
    timeout_role: tuple[str, str],
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """A statement_timeout set on the backup's role cancels a statement that waits on a
    lock (here pg_dumpall --globals-only, blocked by a session holding a catalog lock):
    the error names the timeout, and there is no manifest and no object.

    pg_dump itself sets statement_timeout = 0 (and lock_timeout = 0) on its sessions, so a
    role or database timeout never cancels the dump's COPY."""
    pg_db.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    repo, config = local_repo
    role, password = timeout_role
    conn = pg_connection(pg_db).model_copy(update={"user": role, "password": SecretStr(password)})
    with psycopg.connect(pg_db.server.dsn()) as holder:
        holder.execute("LOCK TABLE pg_catalog.pg_tablespace IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StrongroomError) as caught:
            backup_postgres(conn, repo, config, age_key)
        holder.rollback()
    assert "statement timeout" in str(caught.value), str(caught.value)
    assert password not in str(caught.value)
    _assert_nothing_left(repo)
    # without the blocking lock the same role backs up normally
    manifest = backup_postgres(conn, repo, config, age_key)
    assert verify_backup(repo, manifest, age_key)["ok"]


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """An 8 MiB tmpfs (root only): writes beyond it fail with ENOSPC."""
    mount = Path(tempfile.mkdtemp(prefix="sr-tiny-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0777", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _names_enospc(error: BaseException) -> bool:
    text = str(error)
    return (
        "No space left on device" in text
        or "ENOSPC" in text
        or (isinstance(error, OSError) and error.errno == errno.ENOSPC)
    )


@pytest.mark.slow
def test_full_repository_disk_fails_clearly_and_keeps_earlier_backups(
    pg_db: PgDatabase,
    big_conn: PostgresConnection,
    tiny_disk: Path,
    age_key: EncryptionConfig,
) -> None:
    """A local repository on a full disk: the big backup fails naming ENOSPC, leaves no
    manifest, no data and no temp file; the earlier small backup still verifies."""
    pg_db.psql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
    repo = make_local_repo(tiny_disk / "repo")
    config = signed_config(kind="local", path=str(repo.root))
    earlier = backup_postgres(pg_connection(pg_db, "small"), repo, config, age_key)
    before = _files(repo.root)
    with pytest.raises(Exception) as caught:
        backup_postgres(big_conn, repo, config, age_key)
    assert _names_enospc(caught.value), repr(caught.value)
    # the same files, byte for byte (empty folders of the failed run may stay)
    assert _files(repo.root) == before
    assert not list(repo.root.rglob(".*.tmp-*"))
    assert [m.backup_id for m in Catalog(repo).list()] == [earlier.backup_id]
    assert verify_backup(repo, Catalog(repo).resolve(earlier.backup_id), age_key)["ok"]


@pytest.mark.slow
def test_full_repository_disk_error_is_a_strongroom_error(
    big_conn: PostgresConnection,
    tiny_disk: Path,
    age_key: EncryptionConfig,
) -> None:
    repo = make_local_repo(tiny_disk / "repo")
    config = signed_config(kind="local", path=str(repo.root))
    with pytest.raises(Exception) as caught:
        backup_postgres(big_conn, repo, config, age_key)
    assert _names_enospc(caught.value), repr(caught.value)
    assert isinstance(caught.value, StorageFull), repr(caught.value)
    assert caught.value.exit_code == 11


@pytest.mark.slow
def test_full_spool_disk_fails_clearly_and_leaves_nothing(
    big_conn: PostgresConnection,
    tiny_disk: Path,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """A directory-format dump spooled onto a full disk: pg_dump's ENOSPC is named, the
    spool is removed, and the repository holds nothing."""
    repo, config = local_repo
    conn = big_conn.model_copy(
        update={"dump_format": "directory", "jobs": 2, "spool_dir": str(tiny_disk)}
    )
    with pytest.raises(Exception) as caught:
        backup_postgres(conn, repo, config, age_key)
    assert isinstance(caught.value, StrongroomError), repr(caught.value)
    assert _names_enospc(caught.value), repr(caught.value)
    _assert_nothing_left(repo)
    assert list(tiny_disk.iterdir()) == []
