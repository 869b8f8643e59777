"""One quick check per real service fixture."""

from __future__ import annotations

import subprocess

import pytest

from strongroom.sandbox.clickhouse import ClickHouseServer
from strongroom.sandbox.postgres import PostgresServer
from strongroom.sandbox.redis import RedisCliError, RedisServer
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer


def _psql_tcp(pg: PostgresServer, password: str, sql: str) -> subprocess.CompletedProcess[str]:
    env = pg.libpq_env()
    env["PGPASSWORD"] = password
    return subprocess.run(
        [pg.bin_dir / "psql", "-X", "-At", "-w", "-c", sql],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_postgres_password_over_tcp(pg_server: PostgresServer) -> None:
    ok = _psql_tcp(pg_server, pg_server.password, "SELECT 1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "1"

    bad = _psql_tcp(pg_server, pg_server.password + "x", "SELECT 1")
    assert bad.returncode != 0
    assert "password authentication failed" in bad.stderr

    assert pg_server.password not in repr(pg_server)


def test_postgres_fresh_database(pg_db: PgDatabase) -> None:
    pg_db.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);")
    assert pg_db.psql("SELECT count(*) FROM t") == "2"
    assert pg_db.psql("SELECT current_database()") == pg_db.name


def test_s3_put_get(s3_server: MotoServer, s3_bucket: str) -> None:
    s3 = s3_server.s3()
    s3.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"


def test_s3_locked_bucket(s3_server: MotoServer, s3_locked_bucket: str) -> None:
    s3 = s3_server.s3()
    conf = s3.get_object_lock_configuration(Bucket=s3_locked_bucket)
    assert conf["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled"
    assert s3.get_bucket_versioning(Bucket=s3_locked_bucket)["Status"] == "Enabled"


def test_redis_with_password(redis_server: RedisServer) -> None:
    assert redis_server.cli("PING") == "PONG"
    assert redis_server.cli("SET", "k", "v") == "OK"
    assert redis_server.cli("GET", "k") == "v"
    no_auth = subprocess.run(
        [*redis_server.cli_args(), "PING"], capture_output=True, text=True, timeout=10
    )
    assert "NOAUTH" in no_auth.stdout
    with pytest.raises(RedisCliError):
        redis_server.cli("NOSUCHCOMMAND")


def test_clickhouse_http(clickhouse_server: ClickHouseServer) -> None:
    assert clickhouse_server.query("SELECT 1") == "1"
    assert clickhouse_server.query("SELECT version()").startswith(clickhouse_server.version_prefix)


def test_prefect_flow_run(prefect_api: str) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    @flow
    def smoke_flow(x: int) -> int:
        return x + 1

    state = smoke_flow(41, return_state=True)
    assert state.result() == 42
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == prefect_api.rstrip("/")
        run = client.read_flow_run(flow_run_id)
    assert run.state is not None
    assert run.state.type == StateType.COMPLETED
