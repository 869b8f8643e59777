"""Structure checks ``strongroom verify`` runs on ClickHouse artifacts (no server needed).

- schema documents: valid JSON of the expected format, every statement parses as a
  CREATE of the object it claims to define, and the objects are the manifest's.
- data (``FORMAT Native``): walked block by block; columns must be the table's and
  the row count must equal the manifest's, so a cut-off or padded stream fails.

Importing this module registers both checks with ``strongroom.verify``.
"""

from __future__ import annotations

import json
from typing import Any

from strongroom.catalog import Artifact, Manifest
from strongroom.engines.clickhouse.native import NativeWalker
from strongroom.engines.clickhouse.sql import parse_create, strip_low_cardinality
from strongroom.errors import IntegrityError, InvalidInput
from strongroom.verify import register_check

SCHEMA_CONTENT = "clickhouse-schema+json"
NATIVE_CONTENT = "clickhouse-native"
SCHEMA_FORMAT = "strongroom-clickhouse-schema"
SCHEMA_MAX = 256 * 1024 * 1024
_KINDS = {
    "table": "TABLE",
    "view": "VIEW",
    "materialized_view": "MATERIALIZED VIEW",
    "dictionary": "DICTIONARY",
}


def _database_entry(manifest: Manifest, name: str) -> dict[str, Any]:
    for db in manifest.details.get("databases", []):
        if db.get("name") == name:
            return dict(db)
    raise IntegrityError(f"manifest has no database {name!r}")


def _table_entry(manifest: Manifest, database: str, table: str) -> dict[str, Any]:
    for entry in _database_entry(manifest, database).get("tables", []):
        if entry.get("name") == table:
            return dict(entry)
    raise IntegrityError(f"manifest has no table {database}.{table}")


def check_schema_document(doc: Any, manifest: Manifest, database: str) -> dict[str, Any]:
    """Raise IntegrityError unless ``doc`` is a schema document matching the manifest."""
    if not isinstance(doc, dict) or doc.get("format") != SCHEMA_FORMAT:
        raise IntegrityError("schema document has an unknown format")
    if doc.get("database") != database:
        raise IntegrityError(f"schema document is for {doc.get('database')!r}, not {database!r}")
    try:
        head = parse_create(doc["create_database"])
        if head.kind != "DATABASE" or head.name != database:
            raise IntegrityError(f"CREATE DATABASE statement does not define {database!r}")
        for obj in doc["objects"]:
            head = parse_create(obj["create"])
            if head.name != obj["name"] or head.kind != _KINDS.get(obj["kind"]):
                raise IntegrityError(
                    f"statement for {database}.{obj['name']} defines {head.kind} {head.name!r}"
                )
            if obj.get("inner_create"):
                inner = parse_create(obj["inner_create"])
                if inner.name != obj.get("data_table"):
                    raise IntegrityError(f"inner table statement of {obj['name']} is inconsistent")
    except InvalidInput as exc:
        raise IntegrityError(
            f"a statement in the schema of {database!r} does not parse: {exc}"
        ) from None
    except (KeyError, TypeError):
        raise IntegrityError(f"schema document of {database!r} lacks required fields") from None
    expected = {t["name"] for t in _database_entry(manifest, database).get("tables", [])}
    present = {o["name"] for o in doc["objects"]}
    if expected != present:
        missing = sorted(expected - present)[:5]
        extra = sorted(present - expected)[:5]
        raise IntegrityError(
            f"schema of {database!r} differs from the manifest: missing {missing}, extra {extra}"
        )
    return {"objects": len(doc["objects"]), "create_statements": len(doc["objects"]) + 1}


class SchemaCheck:
    """The schema document must be JSON whose CREATE statements parse and match."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        self._manifest = manifest
        self._database = str(artifact.meta.get("database", ""))
        self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if len(self._buf) + len(data) > SCHEMA_MAX:
            raise IntegrityError("schema document is implausibly large")
        self._buf += data
        return len(data)

    def finish(self) -> dict[str, Any]:
        try:
            doc = json.loads(self._buf.decode("utf-8", "surrogateescape"))
        except ValueError as exc:
            raise IntegrityError(f"schema document is not valid JSON: {exc}") from None
        return check_schema_document(doc, self._manifest, self._database)


class NativeCheck:
    """Walks the Native stream: columns and exact row count must match the manifest."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        meta = artifact.meta
        self._problem: IntegrityError | None = None
        self._expected_rows = int(meta.get("rows", -1))
        self._expected_columns: list[tuple[str, str]] = []
        try:
            entry = _table_entry(manifest, str(meta.get("database")), str(meta.get("table")))
            self._expected_columns = [
                (c["name"], strip_low_cardinality(c["type"]))
                for c in entry.get("columns", [])
                if c.get("default_kind", "") not in ("MATERIALIZED", "ALIAS")
            ]
        except (IntegrityError, InvalidInput, KeyError, TypeError) as exc:
            self._problem = IntegrityError(f"manifest entry for this data is unusable: {exc}")
        self._walker = NativeWalker()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._walker.write(data)

    def finish(self) -> dict[str, Any]:
        summary = self._walker.finish()
        if self._problem is not None:
            raise self._problem
        try:
            found = [(n, strip_low_cardinality(t)) for n, t in summary.columns]
        except InvalidInput:
            found = summary.columns
        if summary.blocks and found != self._expected_columns:
            raise IntegrityError(
                f"data columns {summary.columns[:6]} differ from the table's "
                f"{self._expected_columns[:6]}"
            )
        if summary.complete and summary.rows != self._expected_rows:
            raise IntegrityError(
                f"data holds {summary.rows} rows, the manifest says {self._expected_rows}"
            )
        result: dict[str, Any] = {"blocks": summary.blocks, "rows": summary.rows}
        if not summary.complete:
            result["rows"] = None
            result["note"] = f"row count not checked: cannot walk type {summary.stopped_at}"
        return result

    def close(self) -> None:
        self._walker.close()


register_check(SCHEMA_CONTENT, SchemaCheck)
register_check(NATIVE_CONTENT, NativeCheck)
