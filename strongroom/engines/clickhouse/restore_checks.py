"""What a restore compares with the manifest, and when.

- ``content``: the staging table, before anything is visible: ``count()`` and the
  order-independent ``sum(cityHash64(every stored column))`` per partition, computed on
  the server (``inspection.fingerprint``), must equal the backup's. This is the proof
  that the server holds exactly what was backed up (the artifacts' SHA-256 already
  proved the bytes; this proves how the server parsed them).
- ``placed``: the final table, after the swap: rows per partition from ``system.parts``
  (metadata, no scan) for MergeTree tables, ``count()`` otherwise, must equal the
  backup's. The swap moves the checked parts (a rename, an exchange, or ``REPLACE
  PARTITION``, which links the same part files), so this confirms the checked data is
  the data in place and that nothing was added meanwhile, without a second full scan.
  ``recheck=True`` in the request runs the content fingerprint there too.
"""

from __future__ import annotations

from typing import Any

from strongroom.engines.clickhouse import inspection as inspect
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP


def expected(entry: dict[str, Any], partitions: list[str]) -> dict[str, dict[str, Any]]:
    """The manifest's fingerprints for what this action restores (keyed like ``fingerprint``)."""
    if entry.get("partitions"):
        return {
            p["id"]: {"rows": int(p["rows"]), "hash": str(p["hash"])}
            for p in entry["partitions"]
            if not partitions or p["id"] in partitions
        }
    fp = entry.get("fingerprint") or {"rows": 0, "hash": "0"}
    return {"": {"rows": int(fp["rows"]), "hash": str(fp["hash"])}} if int(fp["rows"]) else {}


def diff(want: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[str]:
    """What differs, one line per partition (``hash`` compared only where both have one)."""
    out = []
    for key in sorted(set(want) | set(found)):
        e, a = want.get(key), found.get(key)
        if e is not None and a is not None and "hash" not in a:
            e = {"rows": e["rows"]}
        if e != a:
            where = f"partition {key}: " if key else ""
            out.append(
                f"{where}expected {e['rows'] if e else 0} rows"
                + (f" (hash {e['hash'] if e else 0})" if a is None or "hash" in a else "")
                + f", found {a['rows'] if a else 0} rows"
                + (f" (hash {a['hash']})" if a and "hash" in a else "")
            )
    return out


def partitioned(entry: dict[str, Any]) -> bool:
    keyed = bool(entry.get("partitions")) or bool(entry.get("partition_key"))
    return keyed and inspect.is_merge_tree(entry["data_engine"])


def content(client: ClickHouseHTTP, entry: dict[str, Any], db: str, table: str) -> dict[str, Any]:
    """The content fingerprint of ``db.table`` (a full scan on the server)."""
    return inspect.fingerprint(
        client,
        db,
        table,
        inspect.stored_columns(entry["columns"]),
        by_partition=partitioned(entry),
        finalize_aggregates=entry.get("fingerprint_aggregates") == "finalized",
    )


def placed(client: ClickHouseHTTP, entry: dict[str, Any], db: str, table: str) -> dict[str, Any]:
    """Rows per partition key of ``db.table`` (``{key: {"rows": n}}``), without a scan."""
    if not inspect.is_merge_tree(entry["data_engine"]):
        rows = inspect.count_rows(client, db, table)
        return {"": {"rows": rows}} if rows else {}
    by_key = partitioned(entry)
    out: dict[str, dict[str, Any]] = {}
    for part in inspect.active_parts(client, db, table):
        key = str(part["partition_id"]) if by_key else ""
        out.setdefault(key, {"rows": 0})["rows"] += int(part["rows"])
    return {k: v for k, v in out.items() if v["rows"]}
