"""What a ClickHouse server holds: databases, tables and views, columns, parts, content
fingerprints, and the order objects must be created in.

Only system tables and ``SHOW CREATE`` are used, which 18.16 and newer servers share.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from strongroom.engines.clickhouse.capabilities import capabilities, inner_table_names
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.sql import (
    fingerprint_expr,
    qualified,
    quote_ident,
    quote_string,
    references,
)
from strongroom.errors import InvalidInput, NotFound

SYSTEM_DATABASES = ("system", "INFORMATION_SCHEMA", "information_schema")
LOG_ENGINES = ("Log", "TinyLog", "StripeLog", "Memory")
# merges of these engines change what a plain SELECT returns (rows collapse or sum up)
MERGE_SENSITIVE = (
    "ReplacingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
    "SummingMergeTree",
    "AggregatingMergeTree",
    "GraphiteMergeTree",
)
NO_DATA_NOTES = {
    "View": "view: no data of its own",
    "MaterializedView": "materialized view: data lives in its target table",
    "Distributed": "no local data (reads other tables)",
    "Merge": "no local data (reads other tables)",
    "Buffer": "no local data kept: flushes to its destination table",
    "Null": "discards data",
    "Dictionary": "reads an external dictionary",
    "Kafka": "no local data (a stream)",
    "MySQL": "no local data (remote MySQL table)",
    "URL": "no local data (remote URL)",
    "HDFS": "no local data (remote HDFS)",
    "ODBC": "no local data (remote ODBC table)",
    "JDBC": "no local data (remote JDBC table)",
    "Set": "data not backed up: the Set engine cannot be read with SELECT",
    "Join": "data not backed up: the Join engine cannot be read with SELECT on 18.16",
    "File": "data not backed up: File tables live in the server's file system",
}
NATIVE_SETTINGS = {"max_execution_time": 0}


def is_merge_tree(engine: str) -> bool:
    return engine.endswith("MergeTree")


def is_replicated(engine: str) -> bool:
    return engine.startswith("Replicated")


def stores_data(engine: str) -> bool:
    return is_merge_tree(engine) or engine in LOG_ENGINES


def merge_sensitive(engine: str) -> bool:
    return engine.removeprefix("Replicated") in MERGE_SENSITIVE


def kind_of(engine: str, create: str = "") -> str:
    """``table``, ``view``, ``materialized_view`` or ``dictionary`` (a ``CREATE DICTIONARY``,
    19.17+: ``system.tables`` lists it with the engine ``Dictionary``, like a table
    ``ENGINE = Dictionary(name)`` that reads one)."""
    if engine == "Dictionary" and create.lstrip()[:17].upper() == "CREATE DICTIONARY":
        return "dictionary"
    if engine == "View":
        return "view"
    if engine == "MaterializedView":
        return "materialized_view"
    return "table"


def server_facts(client: ClickHouseHTTP) -> dict[str, Any]:
    row = client.rows(
        "SELECT version() AS version, uptime() AS uptime, timezone() AS timezone, "
        "hostName() AS hostname",
        what="reading server facts",
    )[0]
    return {
        "version": row["version"],
        "uptime_s": int(row["uptime"]),
        "timezone": row["timezone"],
        "hostname": row["hostname"],
    }


def list_databases(client: ClickHouseHTTP) -> list[dict[str, str]]:
    rows = client.rows("SELECT name, engine FROM system.databases ORDER BY name")
    return [
        {"name": r["name"], "engine": r["engine"]}
        for r in rows
        if r["name"] not in SYSTEM_DATABASES
    ]


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def select_databases(
    available: list[dict[str, str]], include: list[str], exclude: list[str]
) -> list[dict[str, str]]:
    names = [d["name"] for d in available]
    for pattern in include:
        if not pattern or "\x00" in pattern:
            raise InvalidInput(f"invalid database name {pattern[:80]!r}")
        if not _is_glob(pattern) and pattern not in names:
            raise NotFound(
                f"database {pattern[:80]!r} is not on the server; it has: "
                f"{', '.join(names) or '(no user databases)'}"
            )
    chosen = [
        d
        for d in available
        if (not include or any(fnmatch.fnmatchcase(d["name"], p) for p in include))
        and not any(fnmatch.fnmatchcase(d["name"], p) for p in exclude)
    ]
    if not chosen:
        raise NotFound(
            f"no database matches include={include} exclude={exclude}; "
            f"the server has: {', '.join(names) or '(no user databases)'}"
        )
    return chosen


def show_create_database(client: ClickHouseHTTP, name: str) -> str:
    body = client.execute(
        f"SHOW CREATE DATABASE {quote_ident(name)} FORMAT TSVRaw",
        what=f"SHOW CREATE DATABASE {name!r}",
    )
    return body.decode("utf-8", "surrogateescape").rstrip("\n")


def show_create_table(client: ClickHouseHTTP, database: str, name: str) -> str:
    body = client.execute(
        f"SHOW CREATE TABLE {qualified(database, name)} FORMAT TSVRaw",
        what=f"SHOW CREATE TABLE {database}.{name}",
    )
    return body.decode("utf-8", "surrogateescape").rstrip("\n")


def list_tables(client: ClickHouseHTTP, database: str) -> list[dict[str, Any]]:
    """Tables and views of one database, with their CREATE statements."""
    uuid = "toString(uuid) AS uuid, " if capabilities(client).table_uuids else ""
    rows = client.rows(
        f"SELECT name, {uuid}engine, create_table_query, partition_key, sorting_key, "
        "dependencies_database, dependencies_table FROM system.tables "
        f"WHERE database = {quote_string(database)} AND NOT is_temporary ORDER BY name",
        what=f"listing tables of {database!r}",
    )
    for row in rows:
        if not row["create_table_query"]:
            row["create_table_query"] = show_create_table(client, database, row["name"])
    return rows


def inner_table(client: ClickHouseHTTP, database: str, view: str) -> str | None:
    """The name of a materialized view's inner table on the server (None: it writes TO
    another table)."""
    uuid = "toString(uuid) AS uuid, " if capabilities(client).table_uuids else ""
    rows = client.rows(
        f"SELECT {uuid}name FROM system.tables WHERE database = {quote_string(database)}",
        what=f"listing tables of {database!r}",
    )
    names = {r["name"] for r in rows}
    view_rows = [r for r in rows if r["name"] == view]
    if not view_rows:
        return None
    return next((n for n in inner_table_names(view_rows[0]) if n in names), None)


def table_columns(client: ClickHouseHTTP, database: str) -> dict[str, list[dict[str, str]]]:
    rows = client.rows(
        "SELECT table, name, type, default_kind FROM system.columns "
        f"WHERE database = {quote_string(database)}",
        what=f"reading columns of {database!r}",
    )
    out: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        out.setdefault(r["table"], []).append(
            {"name": r["name"], "type": r["type"], "default_kind": r["default_kind"]}
        )
    return out


def stored_columns(columns: list[dict[str, str]]) -> list[tuple[str, str]]:
    """Columns ``SELECT *`` returns and INSERT accepts (not MATERIALIZED or ALIAS)."""
    return [
        (c["name"], c["type"])
        for c in columns
        if c.get("default_kind", "") not in ("MATERIALIZED", "ALIAS")
    ]


def active_parts(client: ClickHouseHTTP, database: str, table: str) -> list[dict[str, Any]]:
    """The table's active parts; ``checksum`` (``hash_of_all_files``) where the server
    has it (26.x), ``modified`` (modification time) always."""
    checksum = "hash_of_all_files" if capabilities(client).part_checksums else "''"
    rows = client.rows(
        "SELECT name, partition_id, partition, rows, data_uncompressed_bytes, "
        f"toString(modification_time) AS modified, {checksum} AS checksum "
        f"FROM system.parts WHERE database = {quote_string(database)} "
        f"AND table = {quote_string(table)} AND active ORDER BY name",
        what=f"reading parts of {database}.{table}",
    )
    return [
        {
            "name": r["name"],
            "partition_id": r["partition_id"],
            "partition": r["partition"],
            "rows": int(r["rows"]),
            "bytes": int(r["data_uncompressed_bytes"]),
            "modified": str(r["modified"]),
            "checksum": str(r["checksum"]),
        }
        for r in rows
    ]


def fingerprint(
    client: ClickHouseHTTP,
    database: str,
    table: str,
    columns: list[tuple[str, str]],
    *,
    by_partition: bool,
    finalize_aggregates: bool = True,
    only: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{partition_id: {"rows", "hash"}}`` (key ``""`` for the whole table): count() and
    an order-independent sum of cityHash64 over every stored column, computed on the server.
    ``only``: just these partition ids (with ``by_partition``)."""
    expr = fingerprint_expr(columns, finalize_aggregates=finalize_aggregates)
    source = qualified(database, table)
    if by_partition:
        where = ""
        if only is not None:
            ids = ", ".join(quote_string(p) for p in only) or "''"
            where = f" WHERE _partition_id IN ({ids})"
        sql = f"SELECT _partition_id, count(), {expr} FROM {source}{where} GROUP BY _partition_id"
    else:
        sql = f"SELECT '', count(), {expr} FROM {source}"
    rows = client.tuples(
        sql, settings={"max_execution_time": 0}, what=f"fingerprinting {database}.{table}"
    )
    return {str(p): {"rows": int(c), "hash": str(h)} for p, c, h in sorted(rows) if int(c)}


def total(prints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The whole-table fingerprint from per-partition ones (hashes add modulo 2**64)."""
    return {
        "rows": sum(p["rows"] for p in prints.values()),
        "hash": str(sum(int(p["hash"]) for p in prints.values()) % 2**64),
    }


def count_rows(client: ClickHouseHTTP, database: str, table: str) -> int:
    rows = client.tuples(
        f"SELECT count() FROM {qualified(database, table)}",
        what=f"counting rows of {database}.{table}",
    )
    return int(rows[0][0])


def creation_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tables first (those holding data, then the rest), then views and materialized views,
    each after every object of the backup it reads from or writes to."""
    key = {(o["database"], o["name"]): o for o in objects}
    deps: dict[tuple[str, str], set[tuple[str, str]]] = {k: set() for k in key}
    for o in objects:
        me = (o["database"], o["name"])
        for dep in o.get("dependents", []):
            if dep in deps and dep != me:
                deps[dep].add(me)
        if o["kind"] != "table":
            for ref in references(o["create"], o["database"]):
                if ref in key and ref != me:
                    deps[me].add(ref)
        o["depends_on"] = sorted(deps[me])
    tables = sorted(
        (o for o in objects if o["kind"] == "table"),
        key=lambda o: (not o["data"], o["database"], o["name"]),
    )
    views = {(o["database"], o["name"]) for o in objects if o["kind"] != "table"}
    ordered = list(tables)
    done = {(o["database"], o["name"]) for o in tables}
    pending = sorted(views)
    while pending:
        ready = [v for v in pending if deps[v] <= done | (deps[v] - views)]
        if not ready:  # a cycle (should not exist): keep name order
            ready = pending[:1]
        for v in ready:
            ordered.append(key[v])
            done.add(v)
        pending = [v for v in pending if v not in done]
    for index, o in enumerate(ordered):
        o["order"] = index
    return ordered
