"""SIGKILL during a PostgreSQL restore: the target is never left half-restored."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest
from strongroom.errors import StrongroomError
from strongroom.repository.local import LocalRepository
from strongroom.sandbox.postgres import PostgresServer
from tests.faults._support import (
    child_env,
    databases,
    fingerprint,
    kill_when,
    start_child,
)
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config

pytestmark = pytest.mark.slow

# The killed restores read the artifact at this pace (~3+ s for the ~25 MB dump), so the kill
# reliably lands while COPY runs; restore_stream's 1 MiB hold-back means psql cannot reach
# COMMIT before the whole artifact was read anyway.
READ_BPS = 8 * 1024 * 1024

# The live target: same tables as the backup, different content.
TARGET_CONTENT = """
CREATE TABLE big (id int PRIMARY KEY, payload text);
INSERT INTO big SELECT g, 'live ' || g FROM generate_series(1, 1000) g;
CREATE TABLE small (id int PRIMARY KEY, val text);
INSERT INTO small SELECT g, 'live ' || g FROM generate_series(1, 10) g;
"""


@pytest.fixture(scope="module")
def big_backup(
    big_source: PgDatabase,
    tmp_path_factory: pytest.TempPathFactory,
    age_key: EncryptionConfig,
) -> tuple[LocalRepository, RepositoryConfig, Manifest]:
    root = tmp_path_factory.mktemp("killrestore") / "repo"
    repo, config = make_local_repo(root), signed_config(kind="local", path=str(root))
    conn = _conn(big_source.server, "bigsrc", big_source.name)
    return repo, config, backup_postgres(conn, repo, config, age_key)


def _conn(server: PostgresServer, name: str, database: str) -> PostgresConnection:
    from pydantic import SecretStr

    return PostgresConnection(
        name=name,
        host=server.host,
        port=server.port,
        user=server.superuser,
        password=SecretStr(server.password),
        databases=[database],
    )


@pytest.fixture
def live_target(pg_server: PostgresServer) -> Iterator[str]:
    name = f"faults_live_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    pg_server.psql(TARGET_CONTENT, db=name)
    try:
        yield name
    finally:
        pg_server.drop_database(name)


def _active(server: PostgresServer, db: str, query_prefix: str) -> bool:
    out = server.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
        f"'{db}' AND query ILIKE '{query_prefix}%' AND state = 'active'"
    )
    return out.strip() not in ("", "0")


def _wait_backends_gone(server: PostgresServer, db: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'")
        if out.strip() == "0":
            return
        time.sleep(0.1)
    raise AssertionError(f"backends of {db} did not go away after the kill")


def test_kill_whole_restore_leaves_target_and_marks_scratch(
    pg_server: PostgresServer,
    big_backup: tuple[LocalRepository, RepositoryConfig, Manifest],
    live_target: str,
    age_key: EncryptionConfig,
) -> None:
    _repo, config, manifest = big_backup
    before = fingerprint(pg_server, live_target)
    dbs_before = databases(pg_server)
    conn = _conn(pg_server, "bigsrc", live_target)
    req = PgRestoreRequest(
        backup_id=manifest.backup_id, target_database=live_target, drop_existing=True
    )
    env = child_env(conn, config, age_key, op="restore", request=req)
    env["SR_READ_BPS"] = str(READ_BPS)
    proc = start_child(env)

    def copying_into_scratch() -> bool:
        new = [d for d in databases(pg_server) - dbs_before if d.startswith("sr_restore_")]
        return bool(new) and _active(pg_server, new[0], "COPY")

    kill_when(proc, copying_into_scratch, settle=0.2)
    leftovers = sorted(databases(pg_server) - dbs_before)
    try:
        # the target is exactly as it was: the swap never happened
        assert fingerprint(pg_server, live_target) == before
        # what is left is one clearly named scratch database (documented in guarantees.md)
        assert len(leftovers) == 1 and leftovers[0].startswith("sr_restore_"), leftovers
        # ... and the restore succeeds when run again (sanity, not a fault)
    finally:
        for name in leftovers:
            _wait_backends_gone(pg_server, name)
            pg_server.drop_database(name)


def test_kill_selective_restore_leaves_tables_unchanged(
    pg_server: PostgresServer,
    big_backup: tuple[LocalRepository, RepositoryConfig, Manifest],
    live_target: str,
    age_key: EncryptionConfig,
) -> None:
    _repo, config, manifest = big_backup
    before = fingerprint(pg_server, live_target)
    dbs_before = databases(pg_server)
    conn = _conn(pg_server, "bigsrc", live_target)
    req = PgRestoreRequest(
        backup_id=manifest.backup_id,
        target_database=live_target,
        tables=["public.big"],
        drop_existing=True,
    )
    env = child_env(conn, config, age_key, op="restore", request=req)
    env["SR_READ_BPS"] = str(READ_BPS)
    kill_when(start_child(env), lambda: _active(pg_server, live_target, "COPY"), settle=0.2)
    _wait_backends_gone(pg_server, live_target)
    assert fingerprint(pg_server, live_target) == before
    assert databases(pg_server) == dbs_before


def test_restore_after_kill_succeeds(
    pg_server: PostgresServer,
    big_source: PgDatabase,
    big_backup: tuple[LocalRepository, RepositoryConfig, Manifest],
    live_target: str,
    age_key: EncryptionConfig,
) -> None:
    """After a killed restore (previous tests), a fresh one completes and matches the source."""
    from tests.faults._support import run_child

    _repo, config, manifest = big_backup
    conn = _conn(pg_server, "bigsrc", live_target)
    req = PgRestoreRequest(
        backup_id=manifest.backup_id, target_database=live_target, drop_existing=True
    )
    assert run_child(child_env(conn, config, age_key, op="restore", request=req))["rows_ok"]
    assert fingerprint(pg_server, live_target) == fingerprint(pg_server, big_source.name)


def test_swap_failure_never_leaves_the_target_missing(
    pg_server: PostgresServer,
    big_source: PgDatabase,
    big_backup: tuple[LocalRepository, RepositoryConfig, Manifest],
    live_target: str,
    age_key: EncryptionConfig,
) -> None:
    """A session connected to the scratch database (a monitoring agent, an operator's psql)
    makes the final rename fail. The restore must then fail with the target still in place
    and unchanged, not renamed away to sr_old_*."""
    import threading

    import psycopg

    from strongroom.engines.postgres.restore import restore_postgres

    _repo, _config, manifest = big_backup
    before = fingerprint(pg_server, live_target)
    dbs_before = databases(pg_server)
    conn = _conn(pg_server, "bigsrc", live_target)
    req = PgRestoreRequest(
        backup_id=manifest.backup_id, target_database=live_target, drop_existing=True
    )
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["report"] = restore_postgres(conn, _repo, age_key, req)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    scratch: list[str] = []
    while not scratch:
        assert worker.is_alive() and time.monotonic() < deadline, outcome
        scratch = [d for d in databases(pg_server) - dbs_before if d.startswith("sr_restore_")]
        time.sleep(0.01)
    bystander = psycopg.connect(pg_server.dsn(scratch[0]), autocommit=True)
    try:
        worker.join(timeout=120)
        assert not worker.is_alive()
    finally:
        bystander.close()
    leftovers = sorted(databases(pg_server) - dbs_before)
    try:
        assert live_target in databases(pg_server), (
            f"the restore failed half-way through the swap: {live_target!r} is gone, "
            f"new databases: {leftovers}, error: {outcome.get('error')!r}"
        )
        if "error" in outcome:
            assert isinstance(outcome["error"], StrongroomError), repr(outcome["error"])
            assert fingerprint(pg_server, live_target) == before
        else:
            assert fingerprint(pg_server, live_target) == fingerprint(pg_server, big_source.name)
    finally:
        for name in leftovers:
            _wait_backends_gone(pg_server, name)
            pg_server.drop_database(name)
