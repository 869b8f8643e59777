"""A realistic modern ClickHouse (26.x) dataset, for round-trip tests of the logical backup.

Why it exists: the older gauntlet (``gauntlet_clickhouse``) keeps to what 18.16 has. Users
of 23.x-26.x store Map, named Tuple, LowCardinality(Nullable), DateTime64, IPv4/IPv6,
UUID, Bool, JSON, Variant and Dynamic columns, put projections, TTLs and data-skipping
indexes on their tables, aggregate with AggregateFunction and SimpleAggregateFunction
states, define dictionaries in SQL and keep tables whose engines hold no local data
(Distributed, URL, S3, Buffer, Null). This module builds all of that on a 26.x server,
in databases of its own (chdb's ``default`` is an Overlay database), with the 3M-row fact
table generated on the server by ``INSERT ... SELECT FROM numbers()`` (a few seconds).

Left out, because the server refuses it: ``ENGINE = Kafka`` (chdb's clickhouse-local
answers the CREATE with ``LOGICAL_ERROR: Shutdown was called`` though it keeps the table,
so a restore cannot tell success from failure). ``Distributed`` needs a cluster: the
26.x sandbox server defines ``sr_local`` (one shard, itself) for it.

``fingerprint`` reuses the older gauntlet's (per table: rows and a content hash in SQL).
"""

from __future__ import annotations

import time
from typing import Any

from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.sql import quote_ident, quote_string
from strongroom.sandbox.clickhouse_modern import CLUSTER
from strongroom.sandbox.gauntlet_clickhouse import dataset_size
from strongroom.sandbox.gauntlet_clickhouse import fingerprint as _fingerprint

MAIN_DB = "sr26 main `m` ü"
AUX_DB = "sr26 aux"
FACT = "fact 'events' ü"
HOSTILE_COLUMN = "user name 'q' ü"
FACT_ROWS = 3_000_000
MONTHS = 12
# 365 days spread over FACT_ROWS rows: 12 monthly partitions of 2024
STEP_MS = 10_512
AGG = "agg_by_bucket"
DICT_SOURCE = "dict source"
DICT_HASHED = "dict_hashed"
DICT_FLAT = "dict_flat"
DICT_ROWS = 1000
INNER_MV = "mv inner ü"
TO_MV = "mv_to_agg"
NO_DATA = ("dist_fact", "url_t", "s3_t", "buffer_t", "null_t")
# a restore must be told to create these (they reach outside the server)
ALLOW_ENGINES = ["Distributed", "URL", "S3", "Dictionary"]
SETTINGS: dict[str, Any] = {}


def _q(db: str, table: str) -> str:
    return f"{quote_ident(db)}.{quote_ident(table)}"


_VARIANT = "Variant(UInt64, String, Array(UInt64))"


def _schema() -> list[str]:
    fact = _q(MAIN_DB, FACT)
    agg = _q(MAIN_DB, AGG)
    src = _q(AUX_DB, DICT_SOURCE)
    return [
        f"CREATE DATABASE {quote_ident(MAIN_DB)}",
        f"CREATE DATABASE {quote_ident(AUX_DB)}",
        f"""CREATE TABLE {fact} (
            ts DateTime64(3, 'UTC'), id UInt64, uid UUID, ip4 IPv4, ip6 IPv6,
            e8 Enum8('a' = 1, 'b b' = 2, 'ü\\'' = 3), e16 Enum16('x' = -1000, 'y' = 1000),
            tags Array(Nullable(String)), attrs Map(String, UInt64),
            pt Tuple(a UInt32, b String), lcn LowCardinality(Nullable(String)),
            lca Array(LowCardinality(String)),
            amount Decimal(18, 4), big Decimal(38, 10), flag Bool, j JSON,
            v {_VARIANT}, dyn Dynamic, {quote_ident(HOSTILE_COLUMN)} String,
            month UInt32 MATERIALIZED toYYYYMM(ts),
            INDEX i_mm id TYPE minmax GRANULARITY 4,
            INDEX i_bf uid TYPE bloom_filter GRANULARITY 4,
            INDEX i_set e8 TYPE set(100) GRANULARITY 4,
            PROJECTION p_by_e8 (SELECT e8, count() GROUP BY e8)
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY id
        TTL toDateTime(ts) + INTERVAL 50 YEAR""",
        f"""CREATE TABLE {agg} (
            k UInt32, u AggregateFunction(uniq, UInt64), s AggregateFunction(sum, UInt64),
            q AggregateFunction(quantiles(0.5, 0.9), Float64),
            mx SimpleAggregateFunction(max, UInt64)
        ) ENGINE = AggregatingMergeTree ORDER BY k""",
        f"CREATE MATERIALIZED VIEW {_q(MAIN_DB, TO_MV)} TO {agg} AS SELECT "
        "toUInt32(id % 1000) AS k, uniqState(id) AS u, sumState(id) AS s, "
        "quantilesState(0.5, 0.9)(toFloat64(amount)) AS q, max(id) AS mx "
        f"FROM {fact} GROUP BY k",
        f"CREATE MATERIALIZED VIEW {_q(MAIN_DB, INNER_MV)} ENGINE = MergeTree "
        "PARTITION BY toYYYYMM(ts) ORDER BY id AS "
        f"SELECT ts, id, attrs, lcn FROM {fact} WHERE id % 97 = 0",
        f"CREATE VIEW {_q(MAIN_DB, 'view e8')} AS SELECT e8, count() AS c FROM {fact} GROUP BY e8",
        f"CREATE TABLE {src} (id UInt64, name String, w Float64) ENGINE = MergeTree ORDER BY id",
        f"CREATE DICTIONARY {_q(AUX_DB, DICT_HASHED)} (id UInt64, name String, w Float64) "
        f"PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE {quote_string(DICT_SOURCE)} "
        f"DB {quote_string(AUX_DB)})) LIFETIME(0) LAYOUT(HASHED())",
        f"CREATE DICTIONARY {_q(AUX_DB, DICT_FLAT)} (id UInt64, name String DEFAULT '?') "
        f"PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE {quote_string(DICT_SOURCE)} "
        f"DB {quote_string(AUX_DB)})) LIFETIME(MIN 0 MAX 0) LAYOUT(FLAT())",
        f"CREATE TABLE {_q(MAIN_DB, 'dist_fact')} AS {fact} ENGINE = Distributed("
        f"{quote_string(CLUSTER)}, {quote_string(MAIN_DB)}, {quote_string(FACT)}, rand())",
        f"CREATE TABLE {_q(AUX_DB, 'url_t')} (a UInt32, b String) "
        "ENGINE = URL('http://127.0.0.1:9/data.csv', CSV)",
        f"CREATE TABLE {_q(AUX_DB, 's3_t')} (a UInt32, b String) "
        "ENGINE = S3('http://127.0.0.1:9/bucket/data.csv', 'CSV')",
        f"CREATE TABLE {_q(AUX_DB, 'null_t')} (a UInt32, b String) ENGINE = Null",
        f"CREATE TABLE {_q(AUX_DB, 'buffer dest')} (a UInt32, b String) "
        "ENGINE = MergeTree ORDER BY a",
        f"CREATE TABLE {_q(AUX_DB, 'buffer_t')} AS {_q(AUX_DB, 'buffer dest')} ENGINE = Buffer("
        f"{quote_string(AUX_DB)}, {quote_string('buffer dest')}, 1, 1, 10, 1, 100, 1, 1000)",
    ]


def _fact_insert(rows: int, offset: int) -> str:
    variant = _VARIANT
    return f"""INSERT INTO {_q(MAIN_DB, FACT)} SELECT
        toDateTime64('2024-01-01 00:00:00', 3, 'UTC') + toIntervalMillisecond(number * {STEP_MS}),
        number,
        toUUID(concat('00000000-0000-4000-8000-', leftPad(toString(number), 12, '0'))),
        toIPv4(number * 7919), toIPv6(concat('2001:db8::', hex(number % 65536))),
        number % 3 + 1, if(number % 2, 'x', 'y'),
        [toString(number % 10), NULL, if(number % 3 = 0, NULL, 'ü')],
        map(concat('k', toString(number % 5)), number, 'z', number % 7),
        (toUInt32(number % 1000), hex(number)),
        if(number % 5 = 0, NULL, concat('lc', toString(number % 13))),
        arrayMap(x -> concat('t', toString(x)), range(number % 3)),
        toDecimal64(number / 1000, 4), toDecimal128(number / 7, 10), number % 2 = 0,
        if(number % 4 = 0, '{{"a": 1}}', concat('{{"a": ', toString(number), ', "b": {{"c": "',
           toString(number % 17), '"}}, "arr": [', toString(number % 3), ']}}')),
        multiIf(number % 3 = 0, number::{variant}, number % 3 = 1,
                toString(number)::{variant}, [number, 1]::{variant}),
        multiIf(number % 4 = 0, NULL, number % 4 = 1, number::Dynamic,
                number % 4 = 2, toString(number)::Dynamic, [toFloat64(number)]::Dynamic),
        concat('u ', toString(number), if(number % 11 = 0, ' `\\'\\t', ''))
        FROM numbers({offset}, {rows})"""


def load_ch26(client: ClickHouseHTTP, rows: int = FACT_ROWS) -> dict[str, Any]:
    """Drop and create both databases; returns row counts, partitions and seconds."""
    started = time.monotonic()
    for db in (MAIN_DB, AUX_DB):
        client.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)}")
    for stmt in _schema():
        client.execute(stmt, settings=SETTINGS)
    half = rows // 2  # two inserts: two parts in some partitions; the TO view fills AGG
    for offset, count in ((0, half), (half, rows - half)):
        client.execute(_fact_insert(count, offset), settings={"max_execution_time": 0})
    client.execute(
        f"INSERT INTO {_q(AUX_DB, DICT_SOURCE)} SELECT number, concat('name ', "
        f"toString(number), if(number % 7 = 0, ' ü', '')), number / 4 FROM numbers({DICT_ROWS})"
    )
    for name in (DICT_HASHED, DICT_FLAT):
        client.execute(f"SYSTEM RELOAD DICTIONARY {_q(AUX_DB, name)}")
    return {
        **dataset_size(client, [MAIN_DB, AUX_DB]),
        "seconds": round(time.monotonic() - started, 2),
    }


def fingerprint(
    client: ClickHouseHTTP,
    databases: dict[str, str] | None = None,
    *,
    tables: set[str] | None = None,
    where: str = "",
) -> dict[str, Any]:
    """Per table of both databases (source names): engine, rows, content hash; tables of
    engines that hold no local data, and dictionaries, are listed by engine only."""
    mapping = databases or {MAIN_DB: MAIN_DB, AUX_DB: AUX_DB}
    skip = {f"{db}.{name}" for db in mapping for name in (*NO_DATA, DICT_HASHED, DICT_FLAT)}
    wanted = tables
    if wanted is None:
        wanted = {
            f"{src}.{n!s}"
            for src, actual in mapping.items()
            for (n,) in client.tuples(
                f"SELECT name FROM system.tables WHERE database = {quote_string(actual)}"
            )
        }
    out = _fingerprint(client, mapping, tables=wanted - skip, where=where)
    out.pop("meta", None)
    for src, actual in mapping.items():
        for name, engine in client.tuples(
            f"SELECT name, engine FROM system.tables WHERE database = {quote_string(actual)}"
        ):
            key = f"{src}.{name}"
            if key in skip and key in wanted:
                out["tables"][key] = {"engine": str(engine), "rows": None, "hash": None}
    return out
