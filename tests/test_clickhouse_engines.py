"""Restored ClickHouse DDL is held to an engine allowlist (engines/clickhouse/table_engines.py).

A backup whose CREATE statements use a File table or a view over url() (made here on the real
18.16 server, so the DDL is exactly what SHOW CREATE gives) is refused before anything is
created; naming the engines in allow_engines lets it through and the plan shows them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.plan import ChRestoreRequest
from strongroom.engines.clickhouse.restore import restore_clickhouse
from strongroom.engines.clickhouse.sql import quote_ident, quote_string
from strongroom.engines.clickhouse.table_engines import engines_in, object_engines
from strongroom.errors import IntegrityError, InvalidInput, NotFound
from strongroom.repository import Repository
from strongroom.repository.local import LocalRepository
from strongroom.sandbox.clickhouse import ClickHouseServer
from strongroom.signing import Signer, Trust

Repo = tuple[Repository, RepositoryConfig]


@pytest.mark.parametrize(
    ("stmt", "engines"),
    [
        ("CREATE TABLE d.t (engine String) ENGINE = MergeTree ORDER BY engine", ["MergeTree"]),
        ("CREATE TABLE d.t (a UInt8) ENGINE=ReplicatedSummingMergeTree('/p', 'r') ORDER BY a",
         ["ReplicatedSummingMergeTree"]),
        ("CREATE TABLE d.t (a UInt8) /* ENGINE = MergeTree */ ENGINE = URL('http://x/', CSV)",
         ["URL"]),
        ("CREATE TABLE d.t (a UInt8) -- ENGINE = Log\n ENGINE = `File`(TSV)", ["File"]),
        ("CREATE TABLE d.t (a UInt8) ENGINE MySQL('h:1', 'd', 't', 'u', 'p')", ["MySQL"]),
        ("CREATE TABLE d.t (a UInt8) ENGINE = Log ORDER BY x + engine", ["Log"]),
        ("CREATE TABLE d.`ENGINE = Log` (s String DEFAULT 'ENGINE = Log') ENGINE = Kafka()",
         ["Kafka"]),
        ("CREATE VIEW d.v AS SELECT * FROM remote('10.0.0.1', db.t)", ["View", "remote()"]),
        ("CREATE VIEW d.v AS SELECT * FROM d.t WHERE s = 'url(x)'", ["View"]),
        ("CREATE MATERIALIZED VIEW d.m ENGINE = Memory AS SELECT * FROM URL('http://x', CSV, "
         "'a UInt8')", ["MaterializedView", "Memory", "url()"]),
        ("CREATE TABLE d.t AS file('/etc/passwd', CSV, 'a String')",
         ["<no engine named>", "file()"]),
        ("CREATE DICTIONARY d.x (k UInt64) PRIMARY KEY k SOURCE(HTTP(url 'http://x'))",
         ["Dictionary"]),
    ],
)  # fmt: skip
def test_engines_are_found_on_the_token_stream(stmt: str, engines: list[str]) -> None:
    assert object_engines(stmt) == engines


def test_engine_clause_without_a_name_is_refused() -> None:
    with pytest.raises(InvalidInput, match="without an engine name"):
        engines_in("CREATE TABLE d.t (a UInt8) ENGINE = ")


@pytest.fixture
def hostile_backup(
    clickhouse_server: ClickHouseServer, local_repo: Repo, age_key: EncryptionConfig
) -> Iterator[dict[str, Any]]:
    conn = ClickHouseConnection(
        name="chx",
        host=clickhouse_server.host,
        port=clickhouse_server.tcp_port,
        http_port=clickhouse_server.http_port,
    )
    client = ClickHouseHTTP(conn)
    src, dst = f"srx_{uuid.uuid4().hex[:8]}", f"dsx_{uuid.uuid4().hex[:8]}"
    for stmt in (
        f"CREATE DATABASE {src}",
        f"CREATE TABLE {src}.ok (a UInt8) ENGINE = MergeTree ORDER BY a",
        f"INSERT INTO {src}.ok VALUES (1), (2)",
        f"CREATE TABLE {src}.f (a UInt8) ENGINE = File(TabSeparated)",
        f"CREATE VIEW {src}.leak AS SELECT * FROM url('http://127.0.0.1:9/x', CSV, 'a UInt8')",
    ):
        client.execute(stmt)
    manifest = backup_clickhouse(
        conn.model_copy(update={"databases": [src]}), local_repo[0], local_repo[1], age_key
    )
    yield {"conn": conn, "client": client, "src": src, "dst": dst, "manifest": manifest}
    for db in (src, dst):
        client.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)}")


def _databases(client: ClickHouseHTTP, name: str) -> int:
    rows = client.tuples(f"SELECT count() FROM system.databases WHERE name = {quote_string(name)}")
    return int(rows[0][0])


@pytest.mark.parametrize("dry_run", [False, True])
def test_hostile_engines_are_refused_before_anything_is_created(
    hostile_backup: dict[str, Any], local_repo: Repo, age_key: EncryptionConfig, dry_run: bool
) -> None:
    h = hostile_backup
    req = ChRestoreRequest(source_target="chx", target_database=h["dst"], dry_run=dry_run)
    with pytest.raises(InvalidInput, match=r"File.*url\(\).*--allow-engine") as info:
        restore_clickhouse(h["conn"], local_repo[0], age_key, req)
    assert "Nothing was created" in str(info.value)
    assert _databases(h["client"], h["dst"]) == 0
    # allowing one of the two is not enough
    req = ChRestoreRequest(source_target="chx", target_database=h["dst"], allow_engines=["File"])
    with pytest.raises(InvalidInput, match=r"url\(\)"):
        restore_clickhouse(h["conn"], local_repo[0], age_key, req)
    assert _databases(h["client"], h["dst"]) == 0


def test_named_exceptions_let_the_restore_through_and_show_in_the_plan(
    hostile_backup: dict[str, Any], local_repo: Repo, age_key: EncryptionConfig
) -> None:
    h = hostile_backup
    req = ChRestoreRequest(
        source_target="chx", target_database=h["dst"], allow_engines=["File", "url"]
    )
    plan = restore_clickhouse(
        h["conn"], local_repo[0], age_key, req.model_copy(update={"dry_run": True})
    )
    assert plan["engines"] == {"allowed_exceptions": ["File", "url"], "requested": ["File", "url"]}
    report = restore_clickhouse(h["conn"], local_repo[0], age_key, req)
    assert report["engines"]["allowed_exceptions"] == ["File", "url"]
    assert int(h["client"].execute(f"SELECT count() FROM {h['dst']}.ok")) == 2
    # only the selected objects are judged: the MergeTree table alone needs no exception
    h["client"].execute(f"DROP DATABASE {h['dst']}")
    req = ChRestoreRequest(source_target="chx", target_database=h["dst"], tables=["ok"])
    assert restore_clickhouse(h["conn"], local_repo[0], age_key, req)["engines"] == {
        "allowed_exceptions": [],
        "requested": [],
    }


def test_allow_engines_takes_names_only(
    hostile_backup: dict[str, Any], local_repo: Repo, age_key: EncryptionConfig
) -> None:
    h = hostile_backup
    req = ChRestoreRequest(source_target="chx", allow_engines=["URL('x')"])
    with pytest.raises(InvalidInput, match="not an engine name"):
        restore_clickhouse(h["conn"], local_repo[0], age_key, req)


def test_a_hostile_backup_from_a_second_set_up_is_refused_by_its_signature(
    clickhouse_server: ClickHouseServer, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """The same hostile DDL published by someone holding only bucket write access and the
    public recipient (their own signing key): refused before the DDL is even read."""
    repo, config = local_repo
    assert isinstance(repo, LocalRepository)
    other = Signer.generate()
    intruder = LocalRepository(repo.root, trust=Trust((other.public,), other))
    conn = ClickHouseConnection(
        name="chforged",
        host=clickhouse_server.host,
        port=clickhouse_server.tcp_port,
        http_port=clickhouse_server.http_port,
    )
    client = ClickHouseHTTP(conn)
    src, dst = f"srf_{uuid.uuid4().hex[:8]}", f"dsf_{uuid.uuid4().hex[:8]}"
    try:
        client.execute(f"CREATE DATABASE {src}")
        client.execute(f"CREATE TABLE {src}.f (a UInt8) ENGINE = File(TabSeparated)")
        forged = backup_clickhouse(
            conn.model_copy(update={"databases": [src]}), intruder, config, age_key
        )
        named = ChRestoreRequest(
            source_target="chforged",
            backup_id=forged.backup_id,
            target_database=dst,
            allow_engines=["File"],  # even with the exception named
        )
        with pytest.raises(IntegrityError, match="not signed by a trusted key"):
            restore_clickhouse(conn, repo, age_key, named)
        with pytest.raises(NotFound, match="no backups in clickhouse/chforged"):
            restore_clickhouse(
                conn, repo, age_key, named.model_copy(update={"backup_id": "latest"})
            )
        assert _databases(client, dst) == 0
    finally:
        for db in (src, dst):
            client.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)}")
