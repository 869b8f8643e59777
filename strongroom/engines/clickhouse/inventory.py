"""What a ClickHouse database holds, as manifest entries: every table, view, materialized
view (with the inner table its data lives in) and dictionary, with its DDL, columns and
whether it stores data. Shared by the logical backup and the native method, which record
the same entries.
"""

from __future__ import annotations

from typing import Any

from strongroom.engines.clickhouse import inspection as inspect
from strongroom.engines.clickhouse.capabilities import inner_table_names
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP

ENGINE = "clickhouse"


def inspect_database(client: ClickHouseHTTP, database: dict[str, str]) -> list[dict[str, Any]]:
    """Every table and view of one database, as manifest entries (plus ``create``)."""
    db = database["name"]
    rows = inspect.list_tables(client, db)
    columns = inspect.table_columns(client, db)
    by_name = {r["name"]: r for r in rows}
    inner_of = {
        view["name"]: next((by_name[n] for n in inner_table_names(view) if n in by_name), None)
        for view in rows
        if view["engine"] == "MaterializedView"
    }
    inner_names = {inner["name"] for inner in inner_of.values() if inner is not None}
    objects: list[dict[str, Any]] = []
    for row in rows:
        name, engine = row["name"], row["engine"]
        if name in inner_names:
            continue  # created by its materialized view; its data travels with the view
        kind = inspect.kind_of(engine, row["create_table_query"])
        obj: dict[str, Any] = {
            "database": db,
            "name": name,
            "kind": kind,
            "engine": engine,
            "create": row["create_table_query"],
            "partition_key": row["partition_key"],
            "sorting_key": row["sorting_key"],
            "columns": columns.get(name, []),
            "dependents": list(
                zip(row["dependencies_database"], row["dependencies_table"], strict=False)
            ),
            "data": False,
            "data_table": None,
            "data_engine": None,
            "inner_create": None,
            "note": "",
        }
        inner = inner_of.get(name) if kind == "materialized_view" else None
        if inner is not None:
            obj.update(
                data=True,
                data_table=inner["name"],
                data_engine=inner["engine"],
                inner_create=inner["create_table_query"],
                partition_key=inner["partition_key"],
                sorting_key=inner["sorting_key"],
                columns=columns.get(inner["name"], []),
                note=f"data in its inner table {inner['name']}",
            )
        elif kind == "table" and inspect.stores_data(engine):
            obj.update(data=True, data_table=name, data_engine=engine)
        else:
            obj["note"] = inspect.NO_DATA_NOTES.get(engine, f"engine {engine}: schema only")
        objects.append(obj)
    return objects
