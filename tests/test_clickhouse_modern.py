"""ClickHouse logical backup and restore of a realistic modern (26.x) dataset.

The dataset (strongroom.sandbox.gauntlet_ch26: 3M rows in 12 monthly partitions; Map,
named Tuple, LowCardinality(Nullable), DateTime64, IPv4/IPv6, UUID, Enum8/16, Decimal,
Bool, JSON, Variant and Dynamic columns; a projection, a TTL, skipping indexes; aggregate
states; SQL dictionaries; Distributed/URL/S3/Buffer/Null tables; materialized views with
and without TO) is built and backed up once per session (tests/fixtures/clickhouse_ch26.py).
Every restore path must end with the source's fingerprints and values.

26.x only: 18.16 has none of these types, engines' settings or SQL dictionaries; the ch18
server is used here only as the target that must refuse this backup.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse import native_client as chclient
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.native import summarize
from strongroom.engines.clickhouse.plan import ChRestoreRequest
from strongroom.engines.clickhouse.restore import restore_clickhouse
from strongroom.engines.clickhouse.sql import qualified, quote_string
from strongroom.errors import IntegrityError, InvalidInput, NotFound, TargetNotEmpty
from strongroom.sandbox.clickhouse import HTTPQueries
from strongroom.sandbox.gauntlet_ch26 import (
    AGG,
    ALLOW_ENGINES,
    AUX_DB,
    DICT_FLAT,
    DICT_HASHED,
    FACT,
    FACT_ROWS,
    HOSTILE_COLUMN,
    INNER_MV,
    MAIN_DB,
    MONTHS,
    NO_DATA,
    TO_MV,
    fingerprint,
)
from strongroom.verify import verify_backup
from tests.fixtures.clickhouse import started_server
from tests.fixtures.clickhouse_ch26 import PARTITION, PARTITION_WHERE, Ch26Dataset

RENAMED = "restored 26 `r` é"
MODERN_TYPES = ("Map(", "Tuple(a UInt32", "LowCardinality(Nullable(String))", "DateTime64(3")
MODERN_TYPES += ("IPv4", "IPv6", "UUID", "Enum16(", "Array(Nullable(String))", "Decimal(38")
MODERN_TYPES += ("Bool", "JSON", "Variant(", "Dynamic", "Array(LowCardinality(String))")


@pytest.fixture
def g(clickhouse_ch26: Ch26Dataset) -> Iterator[Ch26Dataset]:
    clickhouse_ch26.drop(MAIN_DB, AUX_DB, RENAMED)
    yield clickhouse_ch26
    clickhouse_ch26.drop(MAIN_DB, AUX_DB, RENAMED)


def _restore(g: Ch26Dataset, key: EncryptionConfig, **kw: Any) -> dict[str, Any]:
    started = time.monotonic()
    kw.setdefault("allow_engines", ALLOW_ENGINES)
    request = ChRestoreRequest(backup_id=g.manifest.backup_id, **kw)
    report = restore_clickhouse(g.conn, g.repo, key, request)
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def _tables(g: Ch26Dataset, db: str) -> list[str]:
    rows = g.client.tuples(f"SELECT name FROM system.tables WHERE database = {quote_string(db)}")
    return sorted(str(r[0]) for r in rows if not str(r[0]).startswith(".inner"))


def _entries(g: Ch26Dataset) -> dict[str, dict[str, Any]]:
    return {
        f"{db['name']}.{t['name']}": t
        for db in g.manifest.details["databases"]
        for t in db["tables"]
    }


def _dict_get(g: Ch26Dataset, db: str = AUX_DB) -> list[Any]:
    hashed, flat = quote_string(f"{db}.{DICT_HASHED}"), quote_string(f"{db}.{DICT_FLAT}")
    return g.client.tuples(
        f"SELECT dictGet({hashed}, 'name', toUInt64(7)), dictGet({hashed}, 'w', toUInt64(10)), "
        f"dictGet({flat}, 'name', toUInt64(14)), dictGet({flat}, 'name', toUInt64(5000))"
    )


def test_dataset_holds_what_it_promises(clickhouse_ch26: Ch26Dataset) -> None:
    g = clickhouse_ch26
    assert g.server.version_prefix == "26."
    entries = _entries(g)
    fact = entries[f"{MAIN_DB}.{FACT}"]
    assert fact["rows"] == FACT_ROWS and len(fact["partitions"]) == MONTHS
    types = " ".join(c["type"] for c in fact["columns"])
    assert [t for t in MODERN_TYPES if t not in types] == []
    assert HOSTILE_COLUMN in {c["name"] for c in fact["columns"]}
    assert entries[f"{MAIN_DB}.{AGG}"]["engine"] == "AggregatingMergeTree"
    assert entries[f"{MAIN_DB}.{INNER_MV}"]["data"] and not entries[f"{MAIN_DB}.{TO_MV}"]["data"]
    assert {entries[f"{AUX_DB}.{d}"]["kind"] for d in (DICT_HASHED, DICT_FLAT)} == {"dictionary"}
    for name in NO_DATA:  # schema only: no data exported
        (entry,) = [e for k, e in entries.items() if k.endswith(f".{name}")]
        assert not entry["data"] and entry["artifacts"] == [], entry
    engines = {e["engine"] for e in entries.values()}
    assert {"Distributed", "URL", "S3", "Buffer", "Null", "Dictionary"} <= engines
    # projection, TTL and skipping indexes are in the backed-up DDL
    assert g.load["rows"] >= FACT_ROWS and g.timings["build_s"] > 0


def test_whole_round_trip_is_fingerprint_identical(
    g: Ch26Dataset, age_key: EncryptionConfig
) -> None:
    report = _restore(g, age_key)
    assert report["fingerprints_ok"] and not report["leftovers"], report
    g.timings["restore_s"] = report["seconds"]
    assert fingerprint(g.client) == g.source_print
    assert g.sample_of() == g.sample
    assert report["dictionaries"] == {
        f"{AUX_DB}.{DICT_HASHED}": "reloaded",
        f"{AUX_DB}.{DICT_FLAT}": "reloaded",
    }
    assert _dict_get(g) == [["name 7 ü", 2.5, "name 14 ü", "?"]]
    create = g.client.execute(f"SHOW CREATE TABLE {qualified(MAIN_DB, FACT)} FORMAT TSVRaw")
    for clause in (b"PROJECTION p_by_e8", b"TTL ", b"TYPE bloom_filter", b"TYPE set(100)"):
        assert clause in create
    # the Distributed table reads the restored fact table through the cluster
    dist = qualified(MAIN_DB, "dist_fact")
    assert int(g.client.execute(f"SELECT count() FROM {dist}")) == FACT_ROWS
    assert int(g.client.execute(f"SELECT count() FROM {qualified(AUX_DB, 'buffer_t')}")) == 0


def test_renamed_database_round_trip(g: Ch26Dataset, age_key: EncryptionConfig) -> None:
    report = _restore(g, age_key, databases=[MAIN_DB], target_database=RENAMED)
    assert report["fingerprints_ok"], report
    restored = fingerprint(g.client, {MAIN_DB: RENAMED})
    expected = {k: v for k, v in g.source_print["tables"].items() if k.startswith(f"{MAIN_DB}.")}
    assert restored["tables"] == expected
    assert g.sample_of(RENAMED) == g.sample
    assert _tables(g, MAIN_DB) == [] and _tables(g, AUX_DB) == []
    # Distributed names its database: the renamed copy reads the renamed fact table
    dist = qualified(RENAMED, "dist_fact")
    assert int(g.client.execute(f"SELECT count() FROM {dist}")) == FACT_ROWS


def test_dictionaries_follow_a_renamed_database(g: Ch26Dataset, age_key: EncryptionConfig) -> None:
    report = _restore(g, age_key, databases=[AUX_DB], target_database=RENAMED)
    assert report["fingerprints_ok"], report
    assert set(report["dictionaries"].values()) == {"reloaded"}
    assert _dict_get(g, RENAMED) == [["name 7 ü", 2.5, "name 14 ü", "?"]]
    source = g.client.tuples(
        "SELECT create_table_query FROM system.tables WHERE database = "
        f"{quote_string(RENAMED)} AND name = {quote_string(DICT_HASHED)}"
    )[0][0]
    assert f"DB {quote_string(RENAMED)}" in str(source)


def test_table_glob_restore_brings_only_the_selected_tables(
    g: Ch26Dataset, age_key: EncryptionConfig
) -> None:
    report = _restore(g, age_key, tables=[f"{MAIN_DB}.fact*", "agg_*"])
    assert report["fingerprints_ok"], report
    names = {f"{MAIN_DB}.{FACT}", f"{MAIN_DB}.{AGG}"}
    assert fingerprint(g.client, tables=names)["tables"] == {
        k: v for k, v in g.source_print["tables"].items() if k in names
    }
    assert _tables(g, MAIN_DB) == sorted([AGG, FACT]) and _tables(g, AUX_DB) == []


def test_partition_restore_brings_only_that_partition(
    g: Ch26Dataset, age_key: EncryptionConfig
) -> None:
    report = _restore(g, age_key, tables=["fact*"], partitions=[PARTITION])
    assert report["fingerprints_ok"], report
    facts = {f"{MAIN_DB}.{FACT}"}
    assert fingerprint(g.client, tables=facts, where=PARTITION_WHERE) == g.partition_print
    whole = fingerprint(g.client, tables=facts)["tables"][f"{MAIN_DB}.{FACT}"]
    assert whole == g.partition_print["tables"][f"{MAIN_DB}.{FACT}"]  # nothing else came
    (part,) = [p for p in _entries(g)[f"{MAIN_DB}.{FACT}"]["partitions"] if p["id"] == PARTITION]
    assert 0 < whole["rows"] == part["rows"] < FACT_ROWS
    assert _tables(g, MAIN_DB) == [FACT]


def test_a_partition_the_backup_lacks_is_refused_before_anything(
    g: Ch26Dataset, age_key: EncryptionConfig
) -> None:
    with pytest.raises(NotFound, match=r"partition\(s\) '209912' not in the selected tables"):
        _restore(g, age_key, tables=["fact*"], partitions=[PARTITION, "209912"])
    assert _tables(g, MAIN_DB) == []
    databases = g.client.tuples("SELECT name FROM system.databases")
    assert (MAIN_DB,) not in databases


def test_modern_backup_verifies(clickhouse_ch26: Ch26Dataset, age_key: EncryptionConfig) -> None:
    """The Native reader walks every type of the fact table; only aggregate states (no
    length prefix) stop it, and that is reported, not failed."""
    g = clickhouse_ch26
    report = verify_backup(g.repo, g.manifest, age_key)
    assert report["ok"], report
    natives = [a for a in report["artifacts"] if a["artifact"].endswith(".native")]
    fact_names = {a.name for a in g.manifest.artifacts if a.meta.get("table") == FACT}
    facts = [a for a in natives if a["artifact"] in fact_names]
    assert len(facts) == MONTHS
    assert sum(a["structure"]["rows"] for a in facts) == FACT_ROWS  # walked to the end
    stopped = {a["structure"].get("note", "") for a in natives if a["structure"]["rows"] is None}
    assert stopped == {"row count not checked: cannot walk type AggregateFunction(uniq, UInt64)"}


def test_restore_onto_18_16_is_refused_in_planning(
    clickhouse_ch26: Ch26Dataset,
    clickhouse_servers: dict[str, HTTPQueries],
    age_key: EncryptionConfig,
) -> None:
    g = clickhouse_ch26
    old = started_server("ch18", clickhouse_servers)
    conn = ClickHouseConnection(
        name="old", host=old.host, port=old.tcp_port, http_port=old.http_port
    )
    client = ClickHouseHTTP(conn)
    before = client.tuples("SELECT database, name FROM system.tables ORDER BY database, name")
    request = ChRestoreRequest(
        backup_id=g.manifest.backup_id, source_target=g.conn.name, allow_engines=ALLOW_ENGINES
    )
    with pytest.raises(InvalidInput) as caught:
        restore_clickhouse(conn, g.repo, age_key, request)
    message = str(caught.value)
    assert "ClickHouse 18.16" in message and "Nothing was created" in message
    assert f"{MAIN_DB}.{FACT}: column 'attrs' has type Map(String, UInt64)" in message
    assert "(Map unknown)" in message
    assert client.tuples("SELECT database, name FROM system.tables ORDER BY database, name") == (
        before
    )
    names = {str(r[0]) for r in client.tuples("SELECT name FROM system.databases")}
    assert not names & {MAIN_DB, AUX_DB}
    # dictionaries alone: their column types are old, CREATE DICTIONARY is not
    tables = ChRestoreRequest(
        backup_id=g.manifest.backup_id,
        source_target=g.conn.name,
        tables=[f"{AUX_DB}.dict*"],
        allow_engines=ALLOW_ENGINES,
    )
    with pytest.raises(InvalidInput, match="SQL dictionaries"):
        restore_clickhouse(conn, g.repo, age_key, tables)


def test_auto_export_avoids_a_client_older_than_the_server(
    clickhouse_ch26: Ch26Dataset,
) -> None:
    """18.16's clickhouse-client cannot decode 26.x's types (it parses every block it
    passes on): auto exports from a newer server go over HTTP."""
    conn = clickhouse_ch26.conn
    assert "18.16" in chclient.version()
    assert chclient.transport(conn, "26.9.2.1") == chclient.HTTP
    assert chclient.transport(conn, "18.16.1") == chclient.NATIVE
    assert chclient.transport(conn) == chclient.NATIVE  # no server version: as before
    assert clickhouse_ch26.manifest.tool_versions["transport"] == "http"


def test_restore_over_itself_with_drop_existing(g: Ch26Dataset, age_key: EncryptionConfig) -> None:
    """Everything restored again over a changed copy: tables are swapped, the schema-only
    objects replaced or kept, and the dictionaries reloaded from the restored source."""
    assert _restore(g, age_key)["fingerprints_ok"]
    source = qualified(AUX_DB, "dict source")
    g.client.execute(f"INSERT INTO {source} VALUES (5000, 'added', 1)")
    g.client.execute(
        f"ALTER TABLE {qualified(MAIN_DB, FACT)} DELETE WHERE id < 1000",
        settings={"mutations_sync": 2},
    )
    g.client.execute(f"SYSTEM RELOAD DICTIONARY {qualified(AUX_DB, DICT_FLAT)}")
    assert _dict_get(g)[0][3] == "added"
    with pytest.raises(TargetNotEmpty):
        _restore(g, age_key)
    report = _restore(g, age_key, drop_existing=True)
    assert report["fingerprints_ok"] and not report["leftovers"], report
    assert fingerprint(g.client) == g.source_print
    assert set(report["dictionaries"].values()) == {"reloaded"}
    assert _dict_get(g) == [["name 7 ü", 2.5, "name 14 ü", "?"]]
    leftovers = [t for db in (MAIN_DB, AUX_DB) for t in _tables(g, db) if t.startswith("__sr_")]
    assert leftovers == []


_V = "Variant(UInt64, String, Array(UInt64))"
WALKED = {
    "Map": "map('a', number, 'b', 2)",
    "Map of arrays": "map('k', [toNullable('x'), NULL])",
    "named Tuple": "(number, 'x')::Tuple(a UInt64, `b c` String)",
    "LowCardinality(Nullable)": "toLowCardinality(if(number % 3 = 0, NULL, toString(number % 5)))",
    "Array(LowCardinality)": "[toLowCardinality(toString(number % 3))]",
    "Tuple of LowCardinality": "(toLowCardinality(toString(number % 3)), toLowCardinality('x'))",
    "Variant": f"multiIf(number % 3 = 0, number::{_V}, number % 3 = 1, "
    f"toString(number)::{_V}, NULL)",
    "Array(Variant)": "[number::Variant(UInt64, String)]",
    "Dynamic": "multiIf(number % 4 = 0, NULL, number % 4 = 1, number::Dynamic, "
    "number % 4 = 2, toString(number)::Dynamic, [toFloat64(number)]::Dynamic)",
    "JSON": "if(number % 2, '{\"a\": 1}', concat('{\"a\": ', toString(number), "
    '\', "b": {"c": "x"}, "arr": [1, 2]}\'))::JSON',
    "JSON with a setting": "'{\"a\": 1}'::JSON(max_dynamic_paths = 1)",
    "fixed-size": "(toIPv4(number), toIPv6('::1'), generateUUIDv4(), now64(3), toBool(1), "
    "toDecimal128(1, 10), CAST(1 AS Enum16('x' = 1)), toDate32('2024-01-01'))",
    "SimpleAggregateFunction": "CAST(number AS SimpleAggregateFunction(max, UInt64))",
}


@pytest.mark.parametrize("rows", [5, 100_000])  # one block, then several
@pytest.mark.parametrize("label", sorted(WALKED))
def test_native_reader_walks_what_26x_writes(
    clickhouse_servers: dict[str, HTTPQueries], label: str, rows: int
) -> None:
    """Every column is followed by a plain UInt64 one: a reader that lost its place in the
    stream fails on the next column or block."""
    server = started_server("ch26", clickhouse_servers)
    data = server.query_bytes(
        f"SELECT {WALKED[label]} AS c, number AS n FROM numbers({rows}) FORMAT Native"
    )
    summary = summarize(data)
    assert summary == {"blocks": summary["blocks"], "rows": rows, "complete": True}
    assert summary["blocks"] >= (2 if rows > 65_536 else 1)
    with pytest.raises(IntegrityError):
        summarize(data[:-3])  # cut short


def test_native_reader_stops_at_aggregate_states(
    clickhouse_servers: dict[str, HTTPQueries],
) -> None:
    server = started_server("ch26", clickhouse_servers)
    data = server.query_bytes(
        "SELECT number % 3 AS k, uniqState(number) AS u FROM numbers(1000) GROUP BY k FORMAT Native"
    )
    assert summarize(data) == {"blocks": 0, "rows": 0, "complete": False}
