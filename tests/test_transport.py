"""Plaintext to a non-loopback host is refused when the connection model is built, before
any connection; 192.0.2.1 (TEST-NET-1) is an address literal, so nothing is resolved or sent."""

from __future__ import annotations

import pytest

from blocks.clickhouse import ClickHouseTarget
from blocks.redis import RedisTarget
from blocks.targets import PostgresTarget
from strongroom.config import PostgresConnection
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.redis.conn import RedisConnection
from strongroom.errors import InvalidInput
from strongroom.transport import classify, is_local

REMOTE = "192.0.2.1"


def test_loopback_and_sockets_are_local() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "/var/run/postgresql"):
        assert is_local(host)
    for host in (REMOTE, "db.example.com", "10.0.0.1"):
        assert not is_local(host)


def test_postgres_default_sslmode_depends_on_host() -> None:
    assert PostgresConnection(name="a").sslmode == "prefer"
    assert PostgresConnection(name="a", host="/tmp").sslmode == "prefer"
    assert PostgresConnection(name="a", host=REMOTE).sslmode == "require"
    assert PostgresTarget(host=REMOTE).to_connection("a").sslmode == "require"
    assert PostgresTarget().to_connection("a").sslmode == "prefer"


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
def test_postgres_plaintext_to_remote_refused(mode: str) -> None:
    with pytest.raises(InvalidInput, match="allow_plaintext"):
        PostgresConnection(name="a", host=REMOTE, sslmode=mode)
    with pytest.raises(InvalidInput, match=f"sslmode={mode}"):
        PostgresTarget(host=REMOTE, sslmode=mode).to_connection("a")
    ok = PostgresConnection(name="a", host=REMOTE, sslmode=mode, allow_plaintext=True)
    assert ok.libpq_env()["PGSSLMODE"] == mode


def test_postgres_unknown_sslmode_refused() -> None:
    with pytest.raises(InvalidInput, match="sslmode"):
        PostgresConnection(name="a", sslmode="bogus")


def test_clickhouse_plaintext_to_remote_refused() -> None:
    with pytest.raises(InvalidInput, match="secure=false"):
        ClickHouseConnection(name="a", host=REMOTE)
    with pytest.raises(InvalidInput, match="allow_plaintext"):
        ClickHouseTarget(host=REMOTE).to_connection("a")
    assert ClickHouseConnection(name="a", host=REMOTE, secure=True).secure
    assert ClickHouseTarget(host=REMOTE, allow_plaintext=True).to_connection("a").allow_plaintext


def test_redis_plaintext_to_remote_refused() -> None:
    with pytest.raises(InvalidInput, match="tls=false"):
        RedisConnection(name="a", host=REMOTE)
    with pytest.raises(InvalidInput, match="allow_plaintext"):
        RedisTarget(host=REMOTE).to_connection("a")
    assert RedisConnection(name="a", host=REMOTE, tls=True).tls
    assert RedisConnection(name="a", host=REMOTE, allow_plaintext=True).allow_plaintext


def test_classify() -> None:
    assert classify(host=REMOTE, encrypted=True, verified=True) == "verified"
    assert classify(host=REMOTE, encrypted=True, verified=False) == "encrypted"
    assert classify(host="127.0.0.1", encrypted=False, verified=False) == "local"
    assert classify(host=REMOTE, encrypted=False, verified=False) == "plaintext-by-opt-out"
