"""ClickHouse backup, restore and verify against the real servers from the fixture: every
test runs on 18.16 (ch18) and 26.x (ch26) unless marked ONLY_CH18 (users with passwords:
chdb has no access management). Where the versions differ, the test says how."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.catalog import Catalog, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.clickhouse import native_client as chclient
from strongroom.engines.clickhouse import sql as chsql
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.engines.clickhouse.capabilities import capabilities
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.inspection import fingerprint, stored_columns
from strongroom.engines.clickhouse.native import summarize
from strongroom.engines.clickhouse.restore import ChRestoreRequest, restore_clickhouse
from strongroom.errors import (
    AccessDenied,
    Conflict,
    IntegrityError,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    TargetNotEmpty,
)
from strongroom.repository import Repository
from strongroom.sandbox.clickhouse import ClickHouseServer
from strongroom.seal import make_seal
from strongroom.verify import verify_backup
from tests.fixtures.clickhouse import ONLY_CH18
from tests.fixtures.ports import free_port
from tests.fixtures.strongroom_fixtures import TEST_SIGNER, signing_block_fields

Repo = tuple[Repository, RepositoryConfig]

SCHEMA = """
CREATE TABLE {db}.events (
    d Date, ts DateTime, id UInt64, name String, n Nullable(Int32), arr Array(String),
    lc LowCardinality(String), dec Decimal(18, 4), blob String, na Array(Nullable(Int8)),
    nd Nullable(Decimal(9, 2)), u UUID, fs FixedString(3), tup Tuple(UInt8, String)
) ENGINE = MergeTree PARTITION BY toYYYYMM(d) ORDER BY id
;CREATE TABLE {db}.plain (id UInt32, s String) ENGINE = MergeTree ORDER BY id
;CREATE TABLE {db}.rep (id UInt32, v String, ver UInt32)
    ENGINE = ReplacingMergeTree(ver) ORDER BY id
;CREATE TABLE {db}.agg (k UInt8, c UInt64) ENGINE = SummingMergeTree ORDER BY k
;CREATE MATERIALIZED VIEW {db}.mv TO {db}.agg AS SELECT toUInt8(id % 10) AS k, count() AS c
    FROM {db}.events GROUP BY k
;CREATE MATERIALIZED VIEW {db}.mv_inner ENGINE = MergeTree ORDER BY id AS
    SELECT id, name FROM {db}.events WHERE id % 7 = 0
;CREATE VIEW {db}.v AS SELECT id, name FROM {db}.events WHERE n IS NULL
;CREATE TABLE {db}.`odd \\`name\\` ü` (`a b` UInt8, `c\\`d` String, `é` Nullable(Decimal(9, 2)))
    ENGINE = Log
;CREATE TABLE {db}.tiny (x UInt8) ENGINE = TinyLog
;CREATE TABLE {db}.mrg AS {db}.plain ENGINE = Merge({db}, '^plain$')
"""

EVENTS = """
INSERT INTO {db}.events SELECT toDate('2024-01-01') + number % 90,
  toDateTime('2024-01-01 00:00:00') + number * 37, number + {offset},
  concat('name ', toString(number)),
  if(number % 3 = 0, NULL, toInt32(number)), [toString(number), 'x\\ty', ''],
  toString(number % 5), toDecimal64(number / 7, 4),
  concat(unhex('00FF10'), toString(number), '\\n\\'\\\\'), [NULL, toInt8(number % 100)],
  if(number % 4 = 0, NULL, toDecimal32(number / 3, 2)),
  toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0'), 'abc', (toUInt8(number % 200), 'tup')
FROM system.numbers LIMIT {rows}
"""

POPULATE_REST = """
INSERT INTO {db}.plain SELECT number, concat('s', toString(number)) FROM system.numbers LIMIT 500
;INSERT INTO {db}.rep SELECT number % 50, concat('v', toString(number)), number
  FROM system.numbers LIMIT 100
;INSERT INTO {db}.rep SELECT number % 50, concat('w', toString(number)), number + 100
  FROM system.numbers LIMIT 100
;INSERT INTO {db}.`odd \\`name\\` ü` VALUES (1, 'a`b', 1.5), (2, 'tab\\there', NULL)
;INSERT INTO {db}.tiny VALUES (1), (2), (3)
"""

# tables compared row by row after a restore; merge-sensitive ones through FINAL
COMPARED = {
    "events": "SELECT * FROM {t} ORDER BY id",
    "plain": "SELECT * FROM {t} ORDER BY id",
    "rep": "SELECT * FROM {t} FINAL ORDER BY id",
    "agg": "SELECT k, sum(c) FROM {t} GROUP BY k ORDER BY k",
    "mv_inner": "SELECT * FROM {t} ORDER BY id",
    "v": "SELECT * FROM {t} ORDER BY id",
    "odd `name` ü": "SELECT * FROM {t} ORDER BY `a b`",
    "tiny": "SELECT * FROM {t} ORDER BY x",
    "mrg": "SELECT * FROM {t} ORDER BY id",
}


class Server:
    """Test-side access to the fixture server (plain HTTP, independent of the engine)."""

    def __init__(self, server: ClickHouseServer) -> None:
        self.server = server
        self.created: list[str] = []

    def run(self, script: str, **fmt: Any) -> None:
        conn = ClickHouseConnection(name="setup", http_port=self.server.http_port)
        client = ClickHouseHTTP(conn)
        for statement in script.format(**fmt).split("\n;"):
            if statement.strip():
                # 18.16 needs allow_experimental_low_cardinality_type, 26.x refuses it; 26.x
                # merges rep's duplicates inside an INSERT unless optimize_on_insert = 0
                caps = capabilities(client)
                client.execute(statement, settings={**caps.ddl_settings, **caps.insert_settings})

    def q(self, sql: str) -> str:
        return self.server.query(sql)

    def new_db(self, prefix: str = "srt") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.created.append(name)
        return name

    def dump(self, db: str, table: str) -> bytes:
        sql = COMPARED[table].format(t=chsql.qualified(db, table)) + " FORMAT TSV"
        return self.server.query_bytes(sql)

    def tables(self, db: str) -> list[str]:
        text = self.q(
            f"SELECT name FROM system.tables WHERE database = {chsql.quote_string(db)} "
            "ORDER BY name FORMAT TSVRaw"
        )
        return text.splitlines() if text else []

    def inner_name(self, db: str, view: str) -> str:
        """A materialized view's inner table: ``.inner.<view>`` on 18.16 (Ordinary
        databases), ``.inner_id.<the view's UUID>`` on 26.x (Atomic databases)."""
        if self.server.label == "ch18":
            return f".inner.{view}"
        uuid_ = self.q(
            f"SELECT uuid FROM system.tables WHERE database = {chsql.quote_string(db)} "
            f"AND name = {chsql.quote_string(view)}"
        )
        return f".inner_id.{uuid_}"

    def count(self, db: str, table: str, where: str = "") -> int:
        return int(self.q(f"SELECT count() FROM {chsql.qualified(db, table)} {where}"))

    def leftovers(self) -> list[str]:
        text = self.q(
            "SELECT concat(database, '.', name) FROM system.tables "
            "WHERE name LIKE '%\\\\_\\\\_sr\\\\_%' FORMAT TSVRaw"
        )
        return text.splitlines() if text else []


@pytest.fixture
def ch(clickhouse_server: ClickHouseServer) -> Iterator[Server]:
    server = Server(clickhouse_server)
    yield server
    for db in server.created:
        server.q(f"DROP DATABASE IF EXISTS {chsql.quote_ident(db)}")


@pytest.fixture
def source(ch: Server) -> str:
    db = ch.new_db()
    ch.run(f"CREATE DATABASE {db}")
    ch.run(SCHEMA, db=db)
    ch.run(EVENTS, db=db, rows=2000, offset=0)
    ch.run(EVENTS, db=db, rows=1000, offset=10_000)  # a second part per partition
    ch.run(POPULATE_REST, db=db)
    ch.q(f"SYSTEM STOP MERGES {db}.rep")  # keep its duplicates for the raw comparisons
    return db


def conn_for(ch: Server, *databases: str, name: str = "ch1", **extra: Any) -> ClickHouseConnection:
    return ClickHouseConnection(
        name=name,
        host=ch.server.host,
        port=ch.server.tcp_port,
        http_port=ch.server.http_port,
        databases=list(databases),
        **extra,
    )


def backup(ch: Server, db: str, repo: Repo, key: EncryptionConfig, **extra: Any) -> Any:
    return backup_clickhouse(conn_for(ch, db, **extra), repo[0], repo[1], key)


def restore(ch: Server, repo: Repo, key: EncryptionConfig, **kw: Any) -> dict[str, Any]:
    return restore_clickhouse(conn_for(ch), repo[0], key, ChRestoreRequest(**kw))


def assert_same(ch: Server, a: str, b: str, tables: list[str] | None = None) -> None:
    for table in tables or list(COMPARED):
        assert ch.dump(a, table) == ch.dump(b, table), table


# --- the engine's building blocks (no server) --------------------------------------------


def test_sql_quoting_and_rewriting() -> None:
    assert chsql.quote_ident("a`b\\c") == "`a\\`b\\\\c`"
    assert chsql.quote_string("it's \\") == "'it\\'s \\\\'"
    stmt = (
        "CREATE VIEW src.`v w` (x UInt8) AS "
        "SELECT x FROM src.t JOIN `src`.u USING x WHERE s = 'src.t'"
    )
    head = chsql.parse_create(stmt)
    assert (head.kind, head.database, head.name) == ("VIEW", "src", "v w")
    out = chsql.rewrite_create(stmt, database="d`x", name="new", rename_databases={"src": "d`x"})
    assert out.startswith("CREATE VIEW `d\\`x`.`new` (x UInt8)")
    assert "FROM `d\\`x`.t JOIN `d\\`x`.u" in out and "'src.t'" in out  # strings untouched
    assert chsql.references(stmt, "src") >= {("src", "t"), ("src", "u")}
    for bad in ("DROP TABLE x", "CREATE TABLE t (a UInt8", "CREATE TABLE `t (a UInt8)"):
        with pytest.raises(InvalidInput):
            chsql.parse_create(bad)
    args = chsql.hash_args("`c`", "LowCardinality(Nullable(Decimal(9, 2)))")
    assert args == ["isNull(`c`)", "toString(assumeNotNull(`c`))"]
    assert chsql.hash_args("`a`", "Array(String)") == ["`a`"]
    assert chsql.hash_args("`a`", "Array(Nullable(Int8))") == ["toString(`a`)"]
    assert str(chsql.parse_type("Enum8('a,b' = 1, 'c' = 2)")) == "Enum8('a,b' = 1, 'c' = 2)"


def test_capabilities_are_read_once_per_client_and_differ_by_version(ch: Server) -> None:
    """18.16: the LowCardinality switch exists, Ordinary databases (no table UUIDs in
    system.tables), inserts do not merge rows. 26.x: the switch is an unknown setting,
    Atomic databases with UUIDs, optimize_on_insert exists and restores turn it off."""
    from strongroom.engines.clickhouse.capabilities import capabilities, read_capabilities

    client = ClickHouseHTTP(ClickHouseConnection(name="x", http_port=ch.server.http_port))
    caps = capabilities(client)
    assert capabilities(client) is caps  # cached: asked once per client
    assert read_capabilities(client) == caps
    assert caps.version_text.startswith(ch.server.version_prefix)
    modern = ch.server.label == "ch26"
    assert caps.version[0] == (26 if modern else 18)
    assert caps.has_low_cardinality_setting is not modern
    assert caps.ddl_settings == ({} if modern else {"allow_experimental_low_cardinality_type": 1})
    assert caps.table_uuids is modern and caps.target_table_column is modern
    assert caps.insert_settings == ({"optimize_on_insert": 0} if modern else {})
    assert caps.exchange_tables is modern  # EXPLAIN AST EXCHANGE TABLES: syntax error on 18.16
    # what ddl_settings sends is accepted by this server
    client.execute("SELECT 1", settings=caps.ddl_settings)


def test_native_walker_counts_rows_and_rejects_cut_streams(ch: Server) -> None:
    body = ch.server.query_bytes(
        "SELECT number, toString(number) AS s, [number] AS a, toNullable(number) AS n, "
        "toLowCardinality(toString(number % 3)) AS lc FROM system.numbers LIMIT 70000 "
        "FORMAT Native"
    )
    assert summarize(body) == {"blocks": 2, "rows": 70000, "complete": True}
    with pytest.raises(IntegrityError, match="cut short"):
        summarize(body[:-5])
    with pytest.raises(IntegrityError):
        summarize(body + b"Code: 395, e.displayText() = DB::Exception: boom\n")


def test_an_error_in_the_middle_of_an_export_fails_the_stream(ch: Server) -> None:
    """18.16 answers 200 OK, then appends the exception to the body; 26.x writes it after an
    ``__exception__`` marker and cuts the chunked stream: neither must pass."""
    from strongroom.engines.clickhouse.http_client import ClickHouseQueryError

    client = ClickHouseHTTP(ClickHouseConnection(name="x", http_port=ch.server.http_port))
    stream = client.select_stream(
        "SELECT number, throwIf(number = 150000) FROM system.numbers LIMIT 300000 "
        "SETTINGS max_block_size = 10000 FORMAT Native"
    )
    with pytest.raises(ClickHouseQueryError, match="throwIf") as info:
        while stream.read(1 << 16):
            pass
    assert info.value.code == 395 and stream.size > 0
    stream.close()


def test_an_aborted_http_insert_keeps_the_blocks_it_received(ch: Server) -> None:
    """Why restores load into scratch tables: on 18.16 a cut-off INSERT is not rolled back
    (the blocks already parsed stay). 26.x measured keeping none of them here, but nothing
    promises that, so on both versions the table never ends up with the whole insert."""
    db = ch.new_db()
    ch.run(
        f"CREATE DATABASE {db}"
        f"\n;CREATE TABLE {db}.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id"
    )
    data = ch.server.query_bytes(
        "SELECT number AS id, toString(number) AS s FROM system.numbers LIMIT 20000 "
        "SETTINGS max_block_size = 1000 FORMAT Native",
    )
    connection = http.client.HTTPConnection(ch.server.host, ch.server.http_port, timeout=30)
    query = urllib.parse.urlencode(
        {"query": f"INSERT INTO {db}.t FORMAT Native", "min_insert_block_size_rows": 1000}
    )
    connection.putrequest("POST", "/?" + query)
    connection.putheader("Content-Length", str(len(data)))
    connection.endheaders()
    connection.send(data[: len(data) * 4 // 5])
    time.sleep(0.5)
    assert connection.sock is not None
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    if ch.server.label == "ch18":
        deadline = time.monotonic() + 10
        while ch.count(db, "t") == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert 0 < ch.count(db, "t") < 20000
    else:
        time.sleep(1)
        assert ch.count(db, "t") < 20000


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("repo_kind", ["local_repo", "s3_repo"])
def test_round_trip_into_a_renamed_database(
    ch: Server,
    source: str,
    age_key: EncryptionConfig,
    repo_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    repo: Repo = request.getfixturevalue(repo_kind)
    manifest = backup(ch, source, repo, age_key)
    assert manifest.server["version"].startswith(ch.server.version_prefix)
    (db,) = manifest.details["databases"]
    tables = {t["name"]: t for t in db["tables"]}
    assert set(tables) == {*COMPARED, "mv"}  # .inner tables travel with their view
    events = tables["events"]
    assert events["engine"] == "MergeTree" and events["rows"] == 3000
    assert [p["id"] for p in events["partitions"]] == ["202401", "202402", "202403"]
    assert sum(p["rows"] for p in events["partitions"]) == 3000
    assert len(events["fingerprint"]["hash"]) > 5
    assert tables["rep"]["rows"] == 200 and tables["rep"]["engine"] == "ReplacingMergeTree"
    inner = ch.inner_name(source, "mv_inner")  # differs by version, see inner_name
    assert tables["mv_inner"]["data_table"] == inner and tables["mv_inner"]["rows"]
    assert tables["v"]["artifacts"] == [] and "no data" in tables["v"]["note"]
    assert tables["mrg"]["rows"] is None
    order = {t["name"]: t["order"] for t in db["tables"]}
    assert max(order[n] for n, t in tables.items() if t["kind"] == "table") < min(
        order["v"], order["mv"], order["mv_inner"]
    )
    assert [manifest.details["databases"][0]["name"], "agg"] in tables["mv"]["depends_on"]
    assert "dictionaries" in manifest.details
    assert Catalog(repo[0]).resolve("latest", "clickhouse", "ch1").backup_id == manifest.backup_id

    report = verify_backup(repo[0], manifest, age_key)
    assert report["ok"], report
    natives = [a for a in report["artifacts"] if a["artifact"].endswith(".native")]
    assert all(a["structure"]["rows"] is not None for a in natives)  # every type was walked

    into = ch.new_db("dst")
    result = restore(ch, repo, age_key, target_database=into)
    assert result["fingerprints_ok"] and not result["leftovers"]
    assert {c["stage"] for c in result["checks"]} == {"scratch", "final"}
    assert_same(ch, source, into)
    # views and materialized views point into the renamed database
    assert f"FROM {into}.events" in ch.q(f"SHOW CREATE TABLE {into}.v")
    assert f"TO {into}.agg" in ch.q(f"SHOW CREATE TABLE {into}.mv")
    total = "SELECT sum(c) FROM {}.agg"
    ch.run(EVENTS, db=into, rows=10, offset=50_000)  # the restored view still fires
    assert int(ch.q(total.format(into))) == int(ch.q(total.format(source))) + 10
    assert ch.leftovers() == []


def test_identifiers_needing_quotes_round_trip(
    ch: Server, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    src = ch.new_db("sr `q` ü")
    dst = ch.new_db("dst 'x' `é`")
    qs = chsql.quote_ident(src)
    ch.run(
        f"CREATE DATABASE {qs}"
        f"\n;CREATE TABLE {qs}.`t \\`1\\` ü` (`a b` UInt8, `c\\`d` String, `ü` Date) "
        "ENGINE = MergeTree PARTITION BY toYYYYMM(`ü`) ORDER BY `a b`"
        f"\n;CREATE VIEW {qs}.`v;drop` AS SELECT `a b` FROM {qs}.`t \\`1\\` ü`"
        f"\n;INSERT INTO {qs}.`t \\`1\\` ü` VALUES (1, 'x`y', '2024-01-02'), "
        "(2, '\\\\', '2024-02-03')"
    )
    backup_clickhouse(conn_for(ch, src), local_repo[0], local_repo[1], age_key)
    result = restore(ch, local_repo, age_key, target_database=dst)
    assert result["fingerprints_ok"]
    qd = chsql.quote_ident(dst)
    rows = "SELECT * FROM {}.`t \\`1\\` ü` ORDER BY `a b` FORMAT TSV"
    assert ch.q(rows.format(qd)) == ch.q(rows.format(qs)) != ""
    assert ch.q(f"SELECT * FROM {qd}.`v;drop` ORDER BY `a b` FORMAT TSV") == "1\n2"
    # a glob with a quote-needing name and one partition of it
    result = restore(
        ch,
        local_repo,
        age_key,
        target_database=dst,
        tables=["t `1` *"],
        partitions=["202402"],
        drop_existing=True,
    )
    assert [c["partitions"] for c in result["checks"]] == ["202402", "202402"]


# --- selective restores -------------------------------------------------------------------------


def test_one_table_and_one_partition(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    manifest = backup(ch, source, local_repo, age_key)
    into = ch.new_db("sel")
    result = restore(ch, local_repo, age_key, target_database=into, tables=["plain"])
    assert ch.tables(into) == ["plain"]
    assert [c["table"] for c in result["checks"]] == [f"{into}.plain"] * 2
    assert_same(ch, source, into, ["plain"])

    # one partition back into the source: others keep their newer rows
    feb = "WHERE toYYYYMM(d) = 202402"
    before_feb = ch.count(source, "events", feb)
    ch.q(f"ALTER TABLE {source}.events DROP PARTITION 202402")
    ch.run(EVENTS, db=source, rows=1, offset=90_000)  # lands in January
    jan = ch.count(source, "events", "WHERE toYYYYMM(d) = 202401")
    result = restore(ch, local_repo, age_key, tables=[f"{source}.events"], partitions=["202402"])
    assert result["actions"][0]["action"] == "replace partitions"
    assert ch.count(source, "events", feb) == before_feb
    assert ch.count(source, "events", "WHERE toYYYYMM(d) = 202401") == jan
    with pytest.raises(TargetNotEmpty, match="202402"):
        restore(ch, local_repo, age_key, tables=["events"], partitions=["202402"])
    ch.run(EVENTS, db=source, rows=40, offset=95_000)  # some rows land in February
    result = restore(
        ch, local_repo, age_key, tables=["events"], partitions=["202402"], drop_existing=True
    )
    assert result["actions"][0]["replaces"] == ["202402"]
    assert ch.count(source, "events", feb) == before_feb
    with pytest.raises(NotFound, match="202401"):
        restore(ch, local_repo, age_key, tables=["events"], partitions=["209912"])
    assert manifest.backup_id == result["backup_id"]
    assert ch.leftovers() == []


def test_schema_only_then_data_only(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    backup(ch, source, local_repo, age_key)
    into = ch.new_db("sch")
    restore(ch, local_repo, age_key, target_database=into, schema_only=True)
    assert ch.inner_name(into, "mv_inner") in ch.tables(into) and "v" in ch.tables(into)
    assert ch.count(into, "events") == 0 and ch.count(into, "plain") == 0
    result = restore(ch, local_repo, age_key, target_database=into, data_only=True)
    assert result["fingerprints_ok"]
    assert {a["action"] for a in result["actions"]} == {"load", "skip"}
    assert_same(ch, source, into, ["events", "plain", "rep", "odd `name` ü", "mv_inner"])
    with pytest.raises(TargetNotEmpty, match="drop_existing"):
        restore(ch, local_repo, age_key, target_database=into, data_only=True, tables=["plain"])
    ch.q(f"INSERT INTO {into}.plain VALUES (9999, 'extra')")
    restore(
        ch,
        local_repo,
        age_key,
        target_database=into,
        data_only=True,
        tables=["plain"],
        drop_existing=True,
    )
    assert_same(ch, source, into, ["plain"])
    other = ch.new_db("empty")
    ch.run(f"CREATE DATABASE {other}")
    with pytest.raises(NotFound, match="to exist"):
        restore(ch, local_repo, age_key, target_database=other, data_only=True, tables=["plain"])


def test_existing_tables_need_drop_existing_and_are_swapped_whole(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    backup(ch, source, local_repo, age_key)
    ch.q(f"INSERT INTO {source}.plain VALUES (7777, 'after the backup')")
    with pytest.raises(TargetNotEmpty, match="plain holds 501 rows"):
        restore(ch, local_repo, age_key)
    assert ch.count(source, "plain") == 501
    plan = restore(ch, local_repo, age_key, dry_run=True)
    assert plan["dry_run"] and "plain holds 501 rows" in plan["blocked"]
    assert f"{source}.plain" in plan["would_replace"] and plan["raw_size"] > 0
    assert ch.count(source, "plain") == 501
    result = restore(ch, local_repo, age_key, drop_existing=True)
    assert result["fingerprints_ok"] and ch.count(source, "plain") == 500
    assert ch.leftovers() == []

    # a table that exists with a different schema is refused even when it is empty
    into = ch.new_db("diff")
    ch.run(f"CREATE DATABASE {into}\n;CREATE TABLE {into}.plain (id String) ENGINE = Log")
    with pytest.raises(Conflict, match="different"):
        restore(ch, local_repo, age_key, target_database=into, tables=["plain"])
    with pytest.raises(Conflict, match="different schema"):
        restore(ch, local_repo, age_key, target_database=into, tables=["plain"], data_only=True)
    restore(ch, local_repo, age_key, target_database=into, tables=["plain"], drop_existing=True)
    assert_same(ch, source, into, ["plain"])


# --- integrity: nothing half-done ------------------------------------------------------------


def test_a_corrupt_artifact_changes_nothing(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """A data artifact damaged near its end streams ~all its rows to the server before
    the check fails: they must only ever reach a scratch table."""
    repo = local_repo[0]
    ch.run(
        f"CREATE TABLE {source}.big (id UInt64, s String) ENGINE = MergeTree ORDER BY id"
        f"\n;INSERT INTO {source}.big SELECT number, hex(cityHash64(number)) "
        "FROM system.numbers LIMIT 300000"
    )
    manifest = backup(ch, source, local_repo, age_key)
    big = next(a for a in manifest.artifacts if a.meta.get("table") == "big")
    assert big.raw_size > 3 * 1024 * 1024
    path = repo.root / big.key  # type: ignore[attr-defined]
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01
    path.write_bytes(bytes(blob))
    report = verify_backup(repo, manifest, age_key)
    assert [a["artifact"] for a in report["artifacts"] if not a["ok"]] == [big.name]

    ch.q(f"INSERT INTO {source}.big VALUES (1, 'changed')")
    rows = ch.count(source, "big")
    with pytest.raises(IntegrityError, match="big"):
        restore(ch, local_repo, age_key, tables=["big"], drop_existing=True)
    assert ch.count(source, "big") == rows
    into = ch.new_db("bad")
    with pytest.raises(IntegrityError):
        restore(ch, local_repo, age_key, target_database=into)
    assert into not in ch.q("SHOW DATABASES").splitlines()  # created by the run, dropped again
    assert ch.leftovers() == []


def test_a_failure_after_the_swaps_puts_everything_back(
    ch: Server,
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from strongroom.engines.clickhouse import restore as run_module

    backup(ch, source, local_repo, age_key)
    ch.q(f"INSERT INTO {source}.plain VALUES (7777, 'after the backup')")
    names = ["plain", "events", "odd `name` ü", "tiny", "v", "mrg"]
    before = {t: ch.dump(source, t) for t in names}
    tables = ch.tables(source)
    original = run_module._Run.check

    def check(self: Any, act: dict[str, Any], *args: Any, stage: str) -> None:
        if stage == "final" and act["table"] == "tiny":  # the last table swapped in
            raise IntegrityError("simulated: tiny changed under the restore")
        original(self, act, *args, stage=stage)

    monkeypatch.setattr(run_module._Run, "check", check)
    with pytest.raises(IntegrityError, match="simulated"):
        restore(ch, local_repo, age_key, drop_existing=True)
    assert ch.tables(source) == tables
    assert {t: ch.dump(source, t) for t in names} == before
    assert ch.leftovers() == []


def test_a_replacing_restore_swaps_by_exchange_on_26_and_by_rename_on_18(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """26.x (Atomic databases): one ``EXCHANGE TABLES`` per replaced table; 18.16: two
    renames. The data and the fingerprints afterwards are the same either way."""
    manifest = backup(ch, source, local_repo, age_key)
    ch.q(f"INSERT INTO {source}.plain VALUES (7777, 'after the backup')")
    ch.q(f"INSERT INTO {source}.events SELECT * FROM {source}.events LIMIT 5")
    result = restore(ch, local_repo, age_key, drop_existing=True)
    assert result["fingerprints_ok"]
    method = "exchange" if ch.server.label == "ch26" else "rename"
    swaps = result["swaps"]
    for table in ("plain", "events", "rep", "agg", "tiny", "odd `name` ü"):  # mrg: no data
        assert swaps[f"{source}.{table}"] == method, table
    # 26.x: the inner table of mv_inner (Atomic database) is filled partition by partition
    inner = "replace partitions" if ch.server.label == "ch26" else "rename"
    assert swaps[f"{source}.mv_inner"] == inner
    assert ch.count(source, "plain") == 500 and ch.leftovers() == []

    # the same backup into a fresh database (plain renames of new tables) holds the same
    into = ch.new_db("fresh")
    fresh = restore(ch, local_repo, age_key, target_database=into)
    assert fresh["fingerprints_ok"]
    assert set(fresh["swaps"].values()) <= {"rename", "replace partitions"}
    assert_same(ch, source, into)
    entries = {t["name"]: t for t in manifest.details["databases"][0]["tables"]}
    client = ClickHouseHTTP(conn_for(ch))
    for table in ("plain", "events", "tiny"):
        columns = stored_columns(entries[table]["columns"])
        got = [fingerprint(client, db, table, columns, by_partition=False) for db in (source, into)]
        assert got[0] == got[1] and got[0][""]["rows"] == ch.count(into, table) > 0, table
    for table in ("plain", "tiny"):  # unpartitioned: the manifest has the whole-table print
        fp = entries[table]["fingerprint"]
        assert got_print(client, source, table, entries[table]) == {
            "": {"rows": int(fp["rows"]), "hash": str(fp["hash"])}
        }


def got_print(client: ClickHouseHTTP, db: str, table: str, entry: dict[str, Any]) -> Any:
    return fingerprint(client, db, table, stored_columns(entry["columns"]), by_partition=False)


@pytest.mark.parametrize("fail_at", ["swap", "statement"])
def test_a_failure_at_the_swap_leaves_the_old_tables(
    ch: Server,
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
    monkeypatch: pytest.MonkeyPatch,
    fail_at: str,
) -> None:
    """The swap of ``tiny`` (the last table) fails: before its statement is sent
    (``swap``), or with the statement failing on the server because its scratch table
    vanished (``statement``). The tables exchanged or renamed before it are put back and
    every table is as it was, on both versions."""
    from strongroom.engines.clickhouse import swap as swap_module

    backup(ch, source, local_repo, age_key)
    ch.q(f"INSERT INTO {source}.plain VALUES (7777, 'after the backup')")
    names = ["plain", "events", "odd `name` ü", "tiny", "v", "mrg"]
    before = {t: ch.dump(source, t) for t in names}
    tables = ch.tables(source)
    original = swap_module.SwapState.move_in
    used: list[str] = []

    def move_in(self: Any, index: int, tdb: str, final: str, *, existed: bool) -> str:
        if final == "tiny":
            if fail_at == "swap":
                raise ServiceUnavailable("simulated: connection lost before the swap")
            ch.q(f"DROP TABLE {chsql.qualified(tdb, self.scratch[index])}")
        used.append(original(self, index, tdb, final, existed=existed))
        return used[-1]

    monkeypatch.setattr(swap_module.SwapState, "move_in", move_in)
    error = ServiceUnavailable if fail_at == "swap" else NotFound
    with pytest.raises(error):
        restore(ch, local_repo, age_key, drop_existing=True)
    assert used and set(used) == {"exchange" if ch.server.label == "ch26" else "rename"}
    assert ch.tables(source) == tables
    assert {t: ch.dump(source, t) for t in names} == before
    assert ch.leftovers() == []


def test_a_lost_answer_to_the_swap_statement_never_drops_the_old_table(
    ch: Server,
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The swap statement of ``plain`` runs on the server but its answer is lost. 26.x:
    the UUID under ``plain`` shows the exchange ran, so it is exchanged back and all is as
    before. 18.16 (two renames): the old table is kept under its ``__sr_old_`` name and
    the error says what could not be cleaned up."""
    from strongroom.engines.clickhouse import swap as swap_module

    backup(ch, source, local_repo, age_key)
    ch.q(f"INSERT INTO {source}.plain VALUES (7777, 'after the backup')")
    before = ch.dump(source, "plain")
    original = swap_module.SwapState.ddl

    def ddl(self: Any, sql: str, what: str) -> None:
        original(self, sql, what)
        swap = sql.startswith(("EXCHANGE", "RENAME TABLE")) and "restored data" in what
        if swap and what.endswith(f"{source}.plain"):  # the swap itself, not an undo
            raise ServiceUnavailable("simulated: connection lost after the statement")

    monkeypatch.setattr(swap_module.SwapState, "ddl", ddl)
    with pytest.raises(ServiceUnavailable, match="simulated") as caught:
        restore(ch, local_repo, age_key, tables=["plain"], drop_existing=True)
    if ch.server.label == "ch26":
        assert ch.dump(source, "plain") == before and ch.leftovers() == []
    else:
        assert "could not clean up" in str(caught.value)
        kept = [t for t in ch.leftovers() if t.startswith(f"{source}.__sr_old_")]
        assert [ch.count(source, t.split(".", 1)[1]) for t in kept] == [501]


def test_a_fingerprint_mismatch_fails_and_names_the_table(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    repo = local_repo[0]
    manifest = backup(ch, source, local_repo, age_key)
    key = manifest_key("clickhouse", "ch1", manifest.backup_id)
    doc = json.loads(repo.get_bytes(key))
    doc.pop("seal")  # re-sealed below: the fingerprint check itself is under test here
    for table in doc["details"]["databases"][0]["tables"]:
        if table["name"] == "plain":
            table["fingerprint"]["hash"] = "12345"
    doc["seal"] = make_seal(doc, age_key.recipients)
    path = repo.root / key  # type: ignore[attr-defined]
    body = json.dumps(doc).encode()
    path.write_bytes(body)
    Path(f"{path}.sig").write_bytes(TEST_SIGNER.sign(body))  # a runner's key, no re-check
    into = ch.new_db("fp")
    with pytest.raises(IntegrityError, match=f"{into}.plain differs from backup"):
        restore(ch, local_repo, age_key, target_database=into)
    assert into not in ch.q("SHOW DATABASES").splitlines()
    assert ch.leftovers() == []


def test_wrong_key_and_missing_artifact(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    from pyrage import x25519

    repo = local_repo[0]
    manifest = backup(ch, source, local_repo, age_key)
    wrong = EncryptionConfig(identities=[SecretStr(str(x25519.Identity.generate()))])
    into = ch.new_db("key")
    with pytest.raises(IntegrityError, match="wrong key"):
        restore(ch, local_repo, wrong, target_database=into)
    native = next(a for a in manifest.artifacts if a.name.endswith(".native"))
    repo.delete(native.key)
    with pytest.raises(NotFound, match=native.name):
        restore(ch, local_repo, age_key, target_database=into)
    assert into not in ch.q("SHOW DATABASES").splitlines()
    assert ch.leftovers() == []


# --- bad input ----------------------------------------------------------------------------------


def test_bad_requests_get_clear_errors_and_change_nothing(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    backup(ch, source, local_repo, age_key)
    before = ch.tables(source)
    with pytest.raises(NotFound, match=f"it holds: {source}"):
        restore(ch, local_repo, age_key, databases=["nope"])
    with pytest.raises(NotFound, match=f"{source}.events"):
        restore(ch, local_repo, age_key, tables=["evnts*"])
    with pytest.raises(NotFound, match="it holds"):
        restore(ch, local_repo, age_key, tables=["events`; DROP TABLE plain; --"])
    with pytest.raises(InvalidInput, match="not partitioned"):
        restore(ch, local_repo, age_key, tables=["plain"], partitions=["all"])
    with pytest.raises(InvalidInput, match="need tables"):
        restore(ch, local_repo, age_key, partitions=["202401"])
    with pytest.raises(InvalidInput, match="exclude"):
        restore(ch, local_repo, age_key, schema_only=True, data_only=True)
    for bad in ("x\x00y", "y" * 300, ".inner.x", "system"):
        with pytest.raises(InvalidInput):
            restore(ch, local_repo, age_key, target_database=bad)
    for hostile in ("../../etc/passwd", "20261124T000000Z-abc/../"):
        with pytest.raises(InvalidInput):
            restore(ch, local_repo, age_key, backup_id=hostile)
    with pytest.raises(InvalidInput, match="select it too"):
        restore(ch, local_repo, age_key, target_database=ch.new_db("dep"), tables=["v"])
    with pytest.raises(NotFound, match=source):
        backup(ch, "no_such_db", local_repo, age_key)
    assert ch.tables(source) == before and ch.count(source, "plain") == 500


@pytest.fixture(scope="module")
def password_user(clickhouse_server: ClickHouseServer) -> tuple[str, str]:
    """A user with a password, added to the fixture server's users.xml (reloaded live)."""
    user, password = "sr_pw_user", "ch-secret-" + uuid.uuid4().hex[:10]
    path: Path = clickhouse_server.users_path
    text = path.read_text()
    if f"<{user}>" not in text:
        entry = (
            f"<{user}><password>{password}</password><networks><ip>::/0</ip></networks>"
            f"<profile>default</profile><quota>default</quota></{user}>"
        )
        path.write_text(text.replace("<users>", "<users>" + entry, 1))
        # the server reloads users.xml when its mtime changes (1 s resolution): make sure it does
        later = time.time() + 2
        os.utime(path, (later, later))
    conn = ClickHouseConnection(
        name="pw", http_port=clickhouse_server.http_port, user=user, password=SecretStr(password)
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            ClickHouseHTTP(conn).execute("SELECT 1")
            return user, password
        except AccessDenied:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@ONLY_CH18  # a user with a password: chdb (26.x) has no access management
def test_unreachable_server_and_wrong_password(
    ch: Server,
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
    password_user: tuple[str, str],
) -> None:
    repo, config = local_repo
    gone = ClickHouseConnection(name="gone", http_port=free_port(), connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="unreachable after"):
        backup_clickhouse(gone, repo, config, age_key)
    assert time.monotonic() - started < 30
    backup(ch, source, local_repo, age_key)
    with pytest.raises(ServiceUnavailable):
        restore_clickhouse(
            gone.model_copy(update={"name": "ch1"}), repo, age_key, ChRestoreRequest()
        )
    for key in [o.key for o in repo.list("")]:
        repo.delete(key)

    user, password = password_user
    wrong = conn_for(ch, source, user=user, password=SecretStr(password + "x"))
    with pytest.raises(AccessDenied) as info:
        backup_clickhouse(wrong, repo, config, age_key)
    assert password not in str(info.value)
    assert list(repo.list("catalog/")) == [] and list(repo.list("data/")) == []
    right = conn_for(ch, source, user=user, password=SecretStr(password))
    manifest = backup_clickhouse(right, repo, config, age_key)
    raw = repo.get_bytes(manifest_key("clickhouse", "ch1", manifest.backup_id)).decode()
    assert password not in raw and age_key.identities[0].get_secret_value() not in raw


# --- the data transports: clickhouse-client (native protocol) and HTTP ---------------------------


def test_transport_choice_and_wire_compression() -> None:
    base = ClickHouseConnection(name="t")
    assert chclient.transport(base) == chclient.NATIVE  # the tool is installed here
    assert chclient.transport(base.model_copy(update={"secure": True})) == chclient.HTTP
    assert chclient.transport(base.model_copy(update={"export_via": "http"})) == chclient.HTTP
    with pytest.raises(InvalidInput, match="TLS"):
        chclient.transport(
            base.model_copy(update={"export_via": "clickhouse-client", "secure": True})
        )
    for host, compressed in (
        ("127.0.0.1", False),
        ("::1", False),
        ("localhost", False),
        ("10.0.0.7", True),
        ("ch.example.internal", True),
    ):
        assert chclient.wire_compression(base.model_copy(update={"host": host})) is compressed
    assert chclient.wire_compression(base.model_copy(update={"wire_compression": True}))
    small, big = chclient.NATIVE_MIN_BYTES - 1, chclient.NATIVE_MIN_BYTES
    assert chclient.for_export(base, chclient.NATIVE, small) == chclient.HTTP
    assert chclient.for_export(base, chclient.NATIVE, big) == chclient.NATIVE
    assert chclient.for_export(base, chclient.NATIVE, None) == chclient.HTTP  # Log tables
    forced = base.model_copy(update={"export_via": "clickhouse-client"})
    assert chclient.for_export(forced, chclient.NATIVE, small) == chclient.NATIVE


def test_both_transports_store_the_same_content(
    ch: Server, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """The same tables through clickhouse-client and over HTTP: same rows, same
    fingerprints, the transport on record; the HTTP backup restores as well. In auto
    mode, exports this small go over HTTP (the tool's start-up would cost more)."""
    # full backups: each one exports every table (an incremental would reference the first)
    native = backup(ch, source, local_repo, age_key, export_via="clickhouse-client", full_every=1)
    http_ = backup(ch, source, local_repo, age_key, export_via="http", full_every=1)
    auto = backup(ch, source, local_repo, age_key, full_every=1)
    assert {a.meta.get("transport") for a in auto.artifacts} == {None, "http"}  # schema: None
    assert (
        auto.tool_versions["transport"] == "http" and "clickhouse-client" not in auto.tool_versions
    )
    assert native.tool_versions["transport"] == "native"
    assert "18.16" in native.tool_versions["clickhouse-client"]
    assert http_.tool_versions["transport"] == "http"

    def tables(manifest: Any) -> dict[str, Any]:
        return {
            t["name"]: (t.get("rows"), t.get("fingerprint"))
            for t in manifest.details["databases"][0]["tables"]
        }

    assert tables(native) == tables(http_)
    for manifest, via in ((native, "native"), (http_, "http")):
        data = [a for a in manifest.artifacts if a.name.endswith(".native")]
        assert data and {a.meta["transport"] for a in data} == {via}
    raw = {a.name: a.raw_size for a in native.artifacts}
    assert {a.name: a.raw_size for a in http_.artifacts} == raw  # same Native bytes per object
    into = ch.new_db("via_http")
    result = restore(ch, local_repo, age_key, backup_id=http_.backup_id, target_database=into)
    assert result["fingerprints_ok"]
    assert_same(ch, source, into)


def test_an_error_in_the_middle_of_a_native_export_fails_it(ch: Server) -> None:
    """A query that fails after rows went out: clickhouse-client's exit status says so."""
    from strongroom.engines.clickhouse.http_client import ClickHouseQueryError

    select = chclient.native_select(
        conn_for(ch),
        "SELECT number, throwIf(number = 150000) FROM system.numbers LIMIT 300000 "
        "SETTINGS max_block_size = 10000 FORMAT Native",
        {},
    )
    assert select.proc.stdout is not None
    received = len(select.proc.stdout.read())
    with pytest.raises(ClickHouseQueryError, match="throwIf") as info:
        select.check("export of boom")
    assert info.value.code == 395 and received > 0


@ONLY_CH18  # a user with a password: chdb (26.x) has no access management
def test_native_export_credentials_and_refusals(ch: Server, password_user: tuple[str, str]) -> None:
    user, password = password_user

    def probe(conn: ClickHouseConnection) -> Any:
        select = chclient.native_select(conn, "SELECT 1 FORMAT Native", {})
        assert not any(password in str(arg) for arg in select.proc.args)
        assert select.proc.stdout is not None
        select.proc.stdout.read()
        return select

    right = conn_for(ch, user=user, password=SecretStr(password))
    assert probe(right).check("probe") is None
    wrong = right.model_copy(update={"password": SecretStr(password + "x")})
    with pytest.raises(AccessDenied) as info:
        probe(wrong).check("probe")
    assert password not in str(info.value)
    closed = conn_for(ch).model_copy(update={"port": free_port(), "connect_timeout": 2})
    with pytest.raises(ServiceUnavailable, match="native port"):
        probe(closed).check("probe")


class _CuttingProxy:
    """Forwards one TCP connection to ``port`` and cuts both sides once ``limit`` bytes
    went to the client: a server that vanishes in the middle of a result."""

    def __init__(self, port: int, limit: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target, self.limit, self.sent = port, limit, 0
        self.cut = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target))

        def pump(src: socket.socket, dst: socket.socket, down: bool) -> None:
            with contextlib.suppress(OSError):
                while not self.cut.is_set():
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
                    if down:
                        self.sent += len(data)
                        if self.sent >= self.limit:
                            self.cut.set()
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

        threading.Thread(target=pump, args=(client, server, False), daemon=True).start()
        pump(server, client, True)

    def close(self) -> None:
        self.listener.close()


def test_a_connection_cut_mid_export_fails_the_backup_and_leaves_nothing(
    ch: Server, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    db = ch.new_db("cut")
    ch.run(f"CREATE DATABASE {db}")
    ch.run(f"CREATE TABLE {db}.big (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    ch.run(
        f"INSERT INTO {db}.big SELECT number, toString(cityHash64(number)) "
        "FROM system.numbers LIMIT 2000000"
    )
    proxy = _CuttingProxy(ch.server.tcp_port, limit=4 * 1024 * 1024)
    repo, config = local_repo
    # forced: auto exports from 26.x over HTTP (the installed client is 18.16's)
    cut = conn_for(ch, db).model_copy(
        update={"port": proxy.port, "export_via": "clickhouse-client"}
    )
    try:
        with pytest.raises(ServiceUnavailable, match="native port"):
            backup_clickhouse(cut, repo, config, age_key)
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    assert list(repo.list("catalog/")) == [] and list(repo.list("data/")) == []


# --- consistency: a table that changes while it is read ----------------------------------------


def test_a_table_written_during_its_export_is_read_again(
    ch: Server,
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from strongroom.engines.clickhouse import backup as engine

    original = engine._TableExport._export
    writes = {"left": 1}

    def export_and_write(self: Any, parts: list[dict[str, Any]], keys: list[str]) -> Any:
        stored = original(self, parts, keys)
        if self.table == "plain" and writes["left"]:
            writes["left"] -= 1
            ch.q(f"INSERT INTO {source}.plain VALUES (123456, 'written meanwhile')")
        return stored

    monkeypatch.setattr(engine._TableExport, "_export", export_and_write)
    manifest = backup(ch, source, local_repo, age_key)
    plain = next(t for t in manifest.details["databases"][0]["tables"] if t["name"] == "plain")
    assert plain["rows"] == 501  # the second reading, which saw the new row
    assert verify_backup(local_repo[0], manifest, age_key)["ok"]

    writes["left"] = 99  # a table that never stops changing: the backup gives up cleanly
    repo = local_repo[0]
    existing = {o.key for o in repo.list("data/")}
    with pytest.raises(Conflict, match="kept changing"):
        backup(ch, source, local_repo, age_key)
    assert {o.key for o in repo.list("data/")} == existing
    assert len(Catalog(repo).list("clickhouse")) == 1


# --- Prefect flows and the CLI commands ---------------------------------------------------------


@pytest.fixture(scope="module")
def flow_setup(
    prefect_api: str,
    clickhouse_server: ClickHouseServer,
    tmp_path_factory: pytest.TempPathFactory,
    password_user: tuple[str, str],
) -> Iterator[dict[str, Any]]:
    """Blocks registered once for the flow and CLI tests, and a source database of their own."""
    from pyrage import x25519

    from blocks import BackupRepository, EncryptionKey, register_all
    from blocks.clickhouse import ClickHouseTarget

    ch = Server(clickhouse_server)
    source = ch.new_db("flowsrc")
    ch.run(f"CREATE DATABASE {source}")
    ch.run(SCHEMA, db=source)
    ch.run(EVENTS, db=source, rows=3000, offset=0)
    ch.run(POPULATE_REST, db=source)
    register_all()
    ClickHouseTarget.register_type_and_schema()
    identity = x25519.Identity.generate()
    repo = tmp_path_factory.mktemp("chflow") / "repo"
    user, password = password_user
    EncryptionKey(recipients=[str(identity.to_public())], identity=str(identity)).save(
        "ch-key", overwrite=True
    )
    BackupRepository(**signing_block_fields(), local_path=str(repo)).save("ch-repo", overwrite=True)
    ClickHouseTarget(
        host=clickhouse_server.host,
        port=clickhouse_server.tcp_port,
        http_port=clickhouse_server.http_port,
        user=user,
        password=password,
        databases=[source],
    ).save("chflow", overwrite=True)
    yield {
        "target": "chflow",
        "source": source,
        "secrets": [password, str(identity)],
        "repo": repo,
        "blocks": {"repository": "ch-repo", "encryption_key": "ch-key"},
    }
    for db in ch.created:
        ch.q(f"DROP DATABASE IF EXISTS {chsql.quote_ident(db)}")


def _prefect(coro_fn: Any) -> Any:
    import asyncio

    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(run())


@ONLY_CH18  # flow_setup's target logs in with a password: chdb has no access management
def test_flows_publish_artifacts_and_keep_secrets_out(
    flow_setup: dict[str, Any],
    ch: Server,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import logging

    from flows.clickhouse import backup_clickhouse_flow, restore_clickhouse_flow
    from flows.verify import verify_backup_flow

    caplog.set_level(logging.DEBUG)
    target, names = flow_setup["target"], flow_setup["blocks"]
    manifest = backup_clickhouse_flow(target=target, **names)
    assert manifest["engine"] == "clickhouse" and len(manifest["artifacts"]) > 5
    report = verify_backup_flow(backup_id=manifest["backup_id"], engine="clickhouse", **names)
    assert report["ok"]
    into = ch.new_db("flow")
    report = restore_clickhouse_flow(
        target=target, target_database=into, tables=["events", "v"], **names
    )
    assert report["fingerprints_ok"] and ch.tables(into) == ["events", "v"]
    with pytest.raises(TargetNotEmpty):
        restore_clickhouse_flow(target=target, target_database=into, tables=["events"], **names)
    plan = restore_clickhouse_flow(
        target=target, target_database=into, tables=["events"], dry_run=True, **names
    )
    assert plan["dry_run"] and plan["blocked"]

    async def artifacts(client: Any) -> list[Any]:
        return await client.read_artifacts(limit=200)

    found = _prefect(artifacts)
    keys = {a.key for a in found}
    assert {f"backup-clickhouse-{target}-summary", f"backup-clickhouse-{target}-table"} <= keys
    assert f"restore-clickhouse-{target}-summary" in keys

    async def logs(client: Any) -> list[Any]:
        return await client.read_logs(limit=200)

    out, err = capfd.readouterr()
    texts = [caplog.text, out, err]
    texts += [str(line.message) for line in _prefect(logs)] + [str(a.data) for a in found]
    texts += [p.read_text() for p in (flow_setup["repo"] / "catalog").rglob("*.json")]
    for secret in flow_setup["secrets"]:
        for text in texts:
            assert secret not in text


@ONLY_CH18  # flow_setup's target logs in with a password: chdb has no access management
def test_flow_retries_only_transient_failures(
    flow_setup: dict[str, Any], ch: Server, password_user: tuple[str, str]
) -> None:
    from blocks.clickhouse import ClickHouseTarget
    from flows.clickhouse import backup_clickhouse_flow

    ClickHouseTarget(http_port=free_port(), password="x" * 12).save("ch-nowhere", overwrite=True)
    with pytest.raises(ServiceUnavailable):
        backup_clickhouse_flow(target="ch-nowhere", **flow_setup["blocks"])
    ClickHouseTarget(
        http_port=ch.server.http_port,
        user=password_user[0],
        password="wrong-password-123",
        databases=[flow_setup["source"]],
    ).save("ch-badpass", overwrite=True)
    with pytest.raises(AccessDenied):
        backup_clickhouse_flow(target="ch-badpass", **flow_setup["blocks"])

    async def task_runs(client: Any) -> list[Any]:
        return await client.read_task_runs(limit=200)

    runs = [r for r in _prefect(task_runs) if r.name.startswith("backup-clickhouse-")]
    counts = sorted(r.run_count for r in runs if r.state and r.state.is_failed())
    assert 3 in counts and 1 in counts  # retried twice when unreachable, never on credentials


@ONLY_CH18  # flow_setup's target logs in with a password: chdb has no access management
def test_cli_commands(flow_setup: dict[str, Any], ch: Server) -> None:
    import typer
    from typer.testing import CliRunner

    from strongroom.cli.clickhouse import register

    app, backup_app, restore_app = typer.Typer(), typer.Typer(), typer.Typer()
    app.add_typer(backup_app, name="backup")
    app.add_typer(restore_app, name="restore")
    register(backup_app, restore_app)
    runner = CliRunner()
    target = flow_setup["target"]
    blocks = ["-r", "ch-repo", "-k", "ch-key"]
    result = runner.invoke(app, ["backup", "clickhouse", target, *blocks, "--json"])
    assert result.exit_code == 0, result.output
    backup_id = json.loads(result.stdout)["backup_id"]
    into = ch.new_db("cli")
    args = [
        "restore",
        "clickhouse",
        target,
        *blocks,
        "-b",
        backup_id,
        "--into",
        into,
        "-t",
        "plain",
    ]
    result = runner.invoke(app, [*args, "--jobs", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fingerprints_ok"]
    assert json.loads(result.stdout)["jobs"] == 3
    result = runner.invoke(app, [*args, "--jobs", "0"])
    assert result.exit_code == 2  # refused by the option's range, before any flow runs
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0 and "blocked" in result.stdout
    result = runner.invoke(app, args)
    assert result.exit_code == 5 and "drop_existing" in result.stderr
    result = runner.invoke(app, ["restore", "clickhouse", target, *blocks, "-t", "nope*", "--json"])
    assert result.exit_code == 3 and "it holds" in json.loads(result.stdout)["error"]
    for text in (result.stdout, result.stderr):
        for secret in flow_setup["secrets"]:
            assert secret not in text
