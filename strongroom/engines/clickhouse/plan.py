"""Restore planning for ClickHouse: what the request selects from the backup, what the
target server already holds, and the action for every object (or why it is blocked).

Nothing here changes the server; ``dry_run`` returns exactly this plan.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from strongroom.artifacts import read_artifact
from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse import inspection as inspect
from strongroom.engines.clickhouse.capabilities import (
    INNER_ID_PREFIX,
    INNER_PREFIX,
    capabilities,
    inner_table_names,
    is_inner_name,
)
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.sql import TypeNode, normalized, parse_type, rewrite_create
from strongroom.engines.clickhouse.table_engines import object_engines
from strongroom.engines.clickhouse.verify import check_schema_document
from strongroom.errors import IntegrityError, InvalidInput, NotFound
from strongroom.repository.base import Repository

MAX_NAME_BYTES = 200


class ChRestoreRequest(BaseModel):
    """What to restore and where; every field is validated before anything changes."""

    backup_id: str = "latest"
    source_target: str | None = Field(
        default=None, description="target the backup was taken from (default: the restore target)"
    )
    databases: list[str] = Field(
        default_factory=list, description="databases of the backup to restore (default: all)"
    )
    tables: list[str] = Field(
        default_factory=list,
        description="glob patterns matched against 'db.table' and 'table' (default: all)",
    )
    partitions: list[str] = Field(
        default_factory=list, description="partition ids (e.g. 202401) of the selected tables"
    )
    target_database: str | None = Field(
        default=None, description="restore the (single) selected database under this name"
    )
    schema_only: bool = False
    data_only: bool = False
    drop_existing: bool = False
    dry_run: bool = False
    jobs: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="tables and partitions loaded at once (default: from the cores, "
        "strongroom.engines.clickhouse.parallel.default_jobs)",
    )
    recheck: bool = Field(
        default=False,
        description="after the swap, fingerprint the final tables again (a second full scan); "
        "by default their rows per partition are compared (see restore_checks)",
    )
    allow_engines: list[str] = Field(
        default_factory=list,
        description="engines/table functions outside the default allowlist the backup's DDL "
        "may use (e.g. URL, Distributed, remote); see strongroom.engines.clickhouse.table_engines",
    )


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InvalidInput(f"invalid {what} {str(value)[:80]!r}: empty or contains NUL")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES or is_inner_name(value):
        raise InvalidInput(
            f"invalid {what} {value[:80]!r}: at most {MAX_NAME_BYTES} bytes, "
            f"not starting with {INNER_PREFIX!r} or {INNER_ID_PREFIX!r}"
        )
    if value in inspect.SYSTEM_DATABASES and what == "target database":
        raise InvalidInput(f"refusing to restore into the system database {value!r}")
    return value


@dataclass
class Selection:
    databases: list[dict[str, Any]]
    objects: list[dict[str, Any]]  # manifest entries, in creation order
    rename: dict[str, str]
    partitions: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)

    def target_db(self, source_db: str) -> str:
        return self.rename.get(source_db, source_db)


def _listing(entries: list[str], limit: int = 40) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f", ... ({len(entries)} in all)" if len(entries) > limit else "") or "(none)"


def select(manifest: Manifest, req: ChRestoreRequest) -> Selection:
    """Resolve the request against the manifest; unknown names get errors listing what exists."""
    if req.schema_only and req.data_only:
        raise InvalidInput("schema_only and data_only exclude each other")
    if req.partitions and req.schema_only:
        raise InvalidInput("partitions hold data: they cannot be restored schema-only")
    if req.partitions and not req.tables:
        raise InvalidInput("partitions need tables= naming the table(s) they belong to")
    all_dbs: list[dict[str, Any]] = manifest.details.get("databases", [])
    names = [d["name"] for d in all_dbs]
    for wanted in req.databases:
        check_name(wanted, "database name")
        if wanted not in names:
            raise NotFound(
                f"database {wanted[:80]!r} is not in backup {manifest.backup_id}; "
                f"it holds: {_listing(names)}"
            )
    dbs = [d for d in all_dbs if not req.databases or d["name"] in req.databases]
    rename: dict[str, str] = {}
    if req.target_database is not None:
        check_name(req.target_database, "target database")
        if len(dbs) != 1:
            raise InvalidInput(
                f"target_database needs exactly one database; the selection holds {len(dbs)} "
                f"({_listing([d['name'] for d in dbs])}): choose one with databases="
            )
        rename[dbs[0]["name"]] = req.target_database
    entries = [{**t, "database": d["name"]} for d in dbs for t in d.get("tables", [])]
    known = [f"{e['database']}.{e['name']}" for e in entries]
    chosen = entries
    if req.tables:
        chosen = []
        for pattern in req.tables:
            check_name(pattern, "table pattern")
            hits = [
                e
                for e in entries
                if fnmatch.fnmatchcase(f"{e['database']}.{e['name']}", pattern)
                or fnmatch.fnmatchcase(e["name"], pattern)
            ]
            if not hits:
                raise NotFound(
                    f"no table of backup {manifest.backup_id} matches {pattern[:80]!r}; "
                    f"it holds: {_listing(known)}"
                )
            chosen += [h for h in hits if h not in chosen]
    chosen.sort(key=lambda e: e["order"])
    selection = Selection(databases=dbs, objects=chosen, rename=rename)
    if req.partitions:
        _select_partitions(selection, req.partitions)
    return selection


def _select_partitions(selection: Selection, wanted: list[str]) -> None:
    found: set[str] = set()
    for entry in selection.objects:
        if entry["kind"] != "table":
            continue
        if not entry.get("partitions") and not entry.get("partition_key"):
            raise InvalidInput(
                f"table {entry['database']}.{entry['name']} ({entry['engine']}) is not "
                "partitioned; restore it whole (drop partitions=)"
            )
        picked = [p for p in entry.get("partitions", []) if p["id"] in wanted]
        found |= {p["id"] for p in picked}
        selection.partitions[(entry["database"], entry["name"])] = picked
    missing = [p for p in wanted if p not in found]
    if missing:
        have = [
            f"{e['database']}.{e['name']}:{p['id']}"
            for e in selection.objects
            if e["kind"] == "table"
            for p in e.get("partitions", [])
        ]
        raise NotFound(
            f"partition(s) {', '.join(map(repr, missing))} not in the selected tables of the "
            f"backup; they hold: {_listing(have)}"
        )


def load_schemas(
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    databases: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """The schema documents of the selected databases (decrypted and checked)."""
    docs: dict[str, dict[str, Any]] = {}
    for db in databases:
        sink = io.BytesIO()
        read_artifact(repo, manifest.artifact(db["schema_artifact"]), sink, encryption=enc)
        try:
            doc = json.loads(sink.getvalue().decode("utf-8", "surrogateescape"))
        except ValueError:
            raise IntegrityError(f"schema of {db['name']!r} is not valid JSON") from None
        check_schema_document(doc, manifest, db["name"])
        docs[db["name"]] = {
            "create_database": doc["create_database"],
            "objects": {o["name"]: o for o in doc["objects"]},
        }
    return docs


@dataclass
class TargetState:
    databases: set[str]
    tables: dict[tuple[str, str], dict[str, Any]]  # (db, name) -> system.tables row + columns

    def get(self, db: str, name: str) -> dict[str, Any] | None:
        return self.tables.get((db, name))


def read_target(client: ClickHouseHTTP, databases: list[str]) -> TargetState:
    existing = {d["name"] for d in inspect.list_databases(client)}
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for db in databases:
        if db not in existing:
            continue
        columns = inspect.table_columns(client, db)
        for row in inspect.list_tables(client, db):
            row["columns"] = columns.get(row["name"], [])
            tables[(db, row["name"])] = row
    return TargetState(existing, tables)


def _current_data(
    state: TargetState, tdb: str, entry: dict[str, Any], current: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The target's table that holds the data of ``entry`` (None: not there)."""
    data_table = entry.get("data_table")
    if not data_table or current is None:
        return None
    if entry["kind"] == "materialized_view":
        if current["engine"] != "MaterializedView":
            return None
        return next(
            (t for n in inner_table_names(current) if (t := state.get(tdb, n)) is not None), None
        )
    return state.get(tdb, data_table)


def _columns(cols: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(c["name"], c["type"]) for c in cols]


def _rows(client: ClickHouseHTTP, db: str, row: dict[str, Any]) -> int:
    if inspect.is_merge_tree(row["engine"]):
        return sum(p["rows"] for p in inspect.active_parts(client, db, row["name"]))
    if inspect.stores_data(row["engine"]):
        return inspect.count_rows(client, db, row["name"])
    return 0


def _partition_rows(client: ClickHouseHTTP, db: str, table: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in inspect.active_parts(client, db, table):
        out[p["partition_id"]] = out.get(p["partition_id"], 0) + p["rows"]
    return out


def plan_actions(
    client: ClickHouseHTTP,
    manifest: Manifest,
    req: ChRestoreRequest,
    sel: Selection,
    docs: dict[str, dict[str, Any]],
    state: TargetState,
) -> list[dict[str, Any]]:
    """One action per selected object, in creation order."""
    mode = (
        "partitions"
        if req.partitions
        else "data_only"
        if req.data_only
        else "schema_only"
        if req.schema_only
        else "full"
    )
    selected = {(sel.target_db(e["database"]), e["name"]) for e in sel.objects}
    actions: list[dict[str, Any]] = []
    for entry in sel.objects:
        db, name = entry["database"], entry["name"]
        tdb = sel.target_db(db)
        doc = docs[db]["objects"][name]
        current = state.get(tdb, name)
        current_data = _current_data(state, tdb, entry, current)
        act: dict[str, Any] = {
            "database": db,
            "table": name,
            "target": f"{tdb}.{name}",
            "target_database": tdb,
            "kind": entry["kind"],
            "engine": entry["engine"],
            "exists": current is not None,
            "data": False,
            "partitions": [],
            "rows": 0,
            "raw_size": 0,
            "blocked": None,
            "blocked_kind": None,
            "note": entry.get("note", ""),
            # the table holding the data on the target now (a view's inner table is named
            # after its UUID in Atomic databases, so it differs from the backup's)
            "data_target": current_data["name"] if current_data else None,
        }
        actions.append(act)
        if inspect.is_replicated(entry.get("data_engine") or entry["engine"]):
            act["action"] = "skip"
            act["blocked"] = (
                "Replicated tables are not restored by this version (a scratch table would "
                "share the ZooKeeper path); restore into a non-replicated copy by hand"
            )
            act["blocked_kind"] = "unsupported"
            continue
        if mode == "partitions" or (mode == "data_only"):
            if not entry["data"]:
                act["action"] = "skip"
                act["note"] = act["note"] or "no data to restore"
                continue
            if mode == "data_only" and (current is None or current_data is None):
                raise NotFound(
                    f"data-only restore needs {tdb}.{name} to exist on the target "
                    f"(restore its schema first, or drop data_only)"
                )
            picked = sel.partitions.get((db, name)) if mode == "partitions" else None
            if mode == "partitions" and not picked:
                act["action"] = "skip"
                act["note"] = "none of the requested partitions"
                continue
            _data(act, manifest, entry, picked)
            if current_data is not None and (
                _columns(current_data["columns"]) != _columns(entry["columns"])
                or (
                    mode == "partitions"
                    and (
                        current_data["engine"] != entry["data_engine"]
                        or current_data["partition_key"] != entry["partition_key"]
                    )
                )
            ):
                act["blocked"] = (
                    f"{tdb}.{name} exists with a different schema (columns/engine/partition "
                    "key); restore the whole table with drop_existing instead"
                )
                act["blocked_kind"] = "schema"
                act["action"] = "load" if mode == "data_only" else "replace partitions"
                continue
            if mode == "partitions":
                act["action"] = "replace partitions" if current is not None else "create"
                if current is not None and current_data is not None:
                    have = _partition_rows(client, tdb, current_data["name"])
                    busy = [p["id"] for p in picked or [] if have.get(p["id"])]
                    if busy and not req.drop_existing:
                        act["blocked"] = f"{tdb}.{name} partition(s) {', '.join(busy)} hold rows"
                        act["blocked_kind"] = "not_empty"
                    act["replaces"] = busy
            else:
                act["action"] = "load"
                held = _rows(client, tdb, current_data) if current_data else 0
                act["target_rows"] = held
                if held and not req.drop_existing:
                    act["blocked"] = f"{tdb}.{name} holds {held} rows"
                    act["blocked_kind"] = "not_empty"
            continue
        # full or schema-only
        with_data = entry["data"] and mode == "full"
        if with_data:
            _data(act, manifest, entry, None)
        if entry["kind"] != "table":
            missing = [
                f"{sel.target_db(d)}.{t}"
                for d, t in entry.get("depends_on", [])
                if (sel.target_db(d), t) not in selected and state.get(sel.target_db(d), t) is None
            ]
            if missing:
                act["action"] = "create" if current is None else "replace"
                act["blocked"] = (
                    f"{tdb}.{name} reads from or writes to {', '.join(missing)}, which is "
                    "neither on the target nor selected: select it too"
                )
                act["blocked_kind"] = "dependency"
                continue
        if current is None:
            act["action"] = "create"
            continue
        held = _rows(client, tdb, current_data) if current_data else 0
        act["target_rows"] = held
        wanted = rewrite_create(doc["create"], database=tdb, name=name, rename_databases=sel.rename)
        same = (
            normalized(wanted) == normalized(current["create_table_query"])
            if entry["kind"] != "table" or not entry["data"]
            else (
                current["engine"] == entry["engine"]
                and _columns(current["columns"]) == _columns(entry["columns"])
            )
        )
        act["action"] = "keep" if same and not with_data and not held else "replace"
        if held and not req.drop_existing:
            act["blocked"] = f"{tdb}.{name} holds {held} rows"
            act["blocked_kind"] = "not_empty"
        elif not same and not req.drop_existing:
            act["blocked"] = f"{tdb}.{name} exists with a different definition"
            act["blocked_kind"] = "schema"
    return actions


def _data(
    act: dict[str, Any],
    manifest: Manifest,
    entry: dict[str, Any],
    picked: list[dict[str, Any]] | None,
) -> None:
    names = [p["artifact"] for p in picked] if picked is not None else list(entry["artifacts"])
    artifacts = [manifest.artifact(n) for n in names]
    act["data"] = True
    act["artifacts"] = names
    act["partitions"] = [p["id"] for p in picked] if picked is not None else []
    act["rows"] = (
        sum(p["rows"] for p in picked) if picked is not None else int(entry.get("rows") or 0)
    )
    act["raw_size"] = sum(a.raw_size for a in artifacts)
    act["stored_size"] = sum(a.stored_size for a in artifacts)


def missing_artifacts(repo: Repository, manifest: Manifest, actions: list[dict[str, Any]]) -> str:
    """Why the selected data cannot be read (empty: every artifact is there), checked
    before anything changes: an incremental lists artifacts its base backups stored, and a
    base that is gone (deleted by hand, a bucket accident) must stop the restore up front."""
    missing = [
        artifact
        for act in actions
        for name in act.get("artifacts", [])
        for artifact in [manifest.artifact(name)]
        if not repo.exists(artifact.key)
    ]
    if not missing:
        return ""
    owners = sorted({str(a.meta.get("stored_by") or manifest.backup_id) for a in missing})
    shown = ", ".join(a.name for a in missing[:3])
    return (
        f"{len(missing)} artifact(s) of backup {manifest.backup_id} are missing from the "
        f"repository ({shown}{' ...' if len(missing) > 3 else ''}), stored by backup(s) "
        f"{', '.join(owners)}: its incremental chain is broken; restore an older full "
        "backup or one taken after it"
    )


# object_engines' names that are no table engine of system.table_engines
_NOT_ENGINES = {"<no engine named>", "Dictionary", "View", "MaterializedView"}


_NAMED_ELEMENT = re.compile(r"(`(?:[^`\\]|\\.)*`|[A-Za-z_][A-Za-z0-9_]*)\s+(\S.*)", re.S)


def _families(node: TypeNode, out: set[str]) -> None:
    """Every type family a (parsed) column type uses (a named Tuple's ``name T`` and an
    aggregate state's argument types too)."""
    out.add(node.name)
    aggregate = node.name in ("AggregateFunction", "SimpleAggregateFunction")
    args = node.args
    if aggregate:  # (function, types...) or, for a versioned state, (version, function, ...)
        args = args[2:] if args and str(args[0]).strip().isdigit() else args[1:]
    for arg in args:
        if isinstance(arg, TypeNode):
            _families(arg, out)
            continue
        text = arg.strip()
        named = _NAMED_ELEMENT.fullmatch(text) if node.name == "Tuple" else None
        if named is not None:
            text = named.group(2)
        elif not aggregate:
            continue  # an argument, not a type (Enum values, numbers, time zones)
        with contextlib.suppress(InvalidInput):
            _families(parse_type(text), out)


def check_target_support(
    client: ClickHouseHTTP, sel: Selection, docs: dict[str, dict[str, Any]]
) -> None:
    """Refuse (InvalidInput, before anything changes) a restore whose objects use column
    types, table engines or SQL dictionaries the target server does not have, such as a
    backup of 26.x (Map, JSON, Variant...) restored onto 18.16, naming table and type."""
    types: set[str] = set()
    for name, insensitive, alias in client.tuples(
        "SELECT name, case_insensitive, alias_to FROM system.data_type_families",
        what="reading the target's data types",
    ):
        types |= {str(name), str(alias)} | ({str(name).lower()} if int(insensitive) else set())
    engines = {str(r[0]) for r in client.tuples("SELECT name FROM system.table_engines")}
    sql_dictionaries = bool(
        client.tuples(
            "SELECT name FROM system.columns WHERE database = 'system' "
            "AND table = 'dictionaries' AND name = 'database'"
        )
    )
    version = capabilities(client).version_text
    problems: list[str] = []
    for entry in sel.objects:
        where = f"{entry['database']}.{entry['name']}"
        for column in entry.get("columns", []):
            used: set[str] = set()
            try:
                _families(parse_type(column["type"]), used)
            except InvalidInput:
                continue
            unknown = sorted(f for f in used if f not in types and f.lower() not in types)
            if unknown:
                problems.append(
                    f"{where}: column {column['name']!r} has type {column['type']} "
                    f"({', '.join(unknown)} unknown)"
                )
        if entry["kind"] == "dictionary" and not sql_dictionaries:
            problems.append(f"{where}: SQL dictionaries (CREATE DICTIONARY) are not supported")
        doc = docs[entry["database"]]["objects"][entry["name"]]
        for create in (doc.get("create"), doc.get("inner_create")):
            for engine in object_engines(create) if create else []:
                if engine not in _NOT_ENGINES | engines and not engine.endswith("()"):
                    problems.append(f"{where}: table engine {engine} is unknown")
    if problems:
        raise InvalidInput(
            f"the target server (ClickHouse {version}) lacks what the backup uses: "
            f"{'; '.join(problems[:10])}"
            + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
            + ". Nothing was created: restore onto a server of the backup's version or newer"
        )
