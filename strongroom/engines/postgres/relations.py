"""What each table-like relation in a PostgreSQL manifest is, and what the dump holds for it.

A logical backup's manifest lists every relation pg_dump dumps as a table: plain
tables, partitioned parents (relkind ``p``, at any depth), partitions, inheritance
parents and children, materialized views, unlogged and foreign tables. pg_dump emits
TABLE DATA only where rows live (never for a partitioned parent or a foreign table)
and MATERIALIZED VIEW DATA only for a populated materialized view; verify and the
post-restore checks ask for data exactly there. Selecting a partitioned parent by name
selects the parent and all its partitions; a partition selected alone is restored as
a standalone table (not attached to a parent that is not restored with it).

Manifests written before relation kinds were recorded carry no ``relkind``: their
tables are treated as plain tables counted with their children, as they were then.
"""

from __future__ import annotations

from typing import Any

from strongroom.errors import InvalidInput, NotFound

Key = tuple[str, str]
MAX_NAME = 63

KIND_NAMES = {
    "r": "table",
    "p": "partitioned table",
    "m": "materialized view",
    "f": "foreign table",
}


def check_identifier(value: str, what: str) -> str:
    if not value or len(value.encode()) > MAX_NAME or "\x00" in value:
        raise InvalidInput(f"invalid {what} {value[:80]!r}: 1-63 bytes, no NUL")
    return value


def key_of(table: dict[str, Any]) -> Key:
    return (str(table["schema"]), str(table["name"]))


def parent_of(table: dict[str, Any]) -> Key | None:
    parent = table.get("partition_of")
    return (str(parent[0]), str(parent[1])) if parent else None


def describe(table: dict[str, Any]) -> str:
    """``table``, ``partitioned table``, ``partition of s.p``, ``materialized view
    (unpopulated)``, ... for plans and error messages."""
    kind = KIND_NAMES.get(str(table.get("relkind", "r")), "table")
    parent = parent_of(table)
    if parent is not None:
        nested = "partitioned " if table.get("relkind") == "p" else ""
        kind = f"{nested}partition of {parent[0]}.{parent[1]}"
    if table.get("relkind") == "m" and table.get("populated") is False:
        kind += " (unpopulated)"
    if table.get("unlogged"):
        kind = "unlogged " + kind
    if table.get("inherits"):
        kind += " inheriting from " + ", ".join(f"{s}.{t}" for s, t in table["inherits"])
    return kind


def data_entry(table: dict[str, Any]) -> str | None:
    """The archive entry that holds this relation's rows, or None where pg_dump has none."""
    relkind = table.get("relkind", "r")
    if relkind == "r":
        return "TABLE DATA"
    if relkind == "m" and table.get("populated", True):
        return "MATERIALIZED VIEW DATA"
    return None


def counts_only(entry: dict[str, Any]) -> bool:
    """True when the manifest's counts are of rows stored in each relation itself
    (``FROM ONLY``): manifests that record relation kinds."""
    return any("relkind" in t for t in entry.get("tables", []))


def expected_rows(entry: dict[str, Any]) -> dict[Key, int]:
    """Row counts to compare after a restore: every relation the backup counted."""
    return {key_of(t): int(t["rows"]) for t in entry["tables"] if t.get("rows") is not None}


def descendants(entry: dict[str, Any], parent: Key) -> list[Key]:
    """Every partition under ``parent``, at any depth, parents before their partitions."""
    children: dict[Key, list[Key]] = {}
    for t in entry["tables"]:
        up = parent_of(t)
        if up is not None:
            children.setdefault(up, []).append(key_of(t))
    found: list[Key] = []
    todo = list(children.get(parent, []))
    while todo:
        key = todo.pop(0)
        found.append(key)
        todo.extend(children.get(key, []))
    return found


def select_tables(entry: dict[str, Any], tables: list[str], schemas: list[str]) -> list[Key]:
    """Resolve requested names against the manifest's table list (never trust the input).

    A partitioned parent brings all its partitions; ``schema.table`` is matched exactly
    first, a bare name must be unique across schemas."""
    known = [key_of(t) for t in entry["tables"]]
    shown = ", ".join(f"{s}.{t}" for s, t in known[:30]) or "(no tables)"
    if schemas:
        have = {s for s, _ in known}
        for schema in schemas:
            check_identifier(schema, "schema name")
            if schema not in have:
                raise NotFound(
                    f"schema {schema!r} is not in the backup of {entry['name']!r} or holds "
                    f"no tables; schemas with tables: {', '.join(sorted(have)) or '(none)'}"
                )
        return [(s, t) for s, t in known if s in schemas]
    if not tables:
        return known
    chosen: list[Key] = []
    for text in tables:
        check_identifier(text.split(".")[-1], "table name")
        exact = [(s, t) for s, t in known if f"{s}.{t}" == text]
        bare = [(s, t) for s, t in known if t == text]
        matches = exact or bare
        if not matches:
            raise NotFound(
                f"table {text[:80]!r} is not in the backup of {entry['name']!r}; it holds: {shown}"
            )
        if len(matches) > 1:
            listed = ", ".join(f"{s}.{t}" for s, t in matches)
            raise InvalidInput(f"table {text!r} is ambiguous; qualify it with its schema: {listed}")
        for key in [matches[0], *descendants(entry, matches[0])]:
            if key not in chosen:
                chosen.append(key)
    return chosen


def selection_notes(entry: dict[str, Any], selected: list[Key]) -> list[str]:
    """What the plan should say about partitions and data-less relations it selected."""
    by_key = {key_of(t): t for t in entry["tables"]}
    chosen = set(selected)
    notes: list[str] = []
    for key in selected:
        table = by_key.get(key)
        if table is None:
            continue
        parent = parent_of(table)
        if parent is not None and parent not in chosen:
            notes.append(
                f"{key[0]}.{key[1]} is a partition of {parent[0]}.{parent[1]}: restored as a "
                "standalone table (not attached; select the parent to restore it whole)"
            )
        elif table.get("relkind") == "p":
            parts = descendants(entry, key)
            if parent is None:
                notes.append(
                    f"{key[0]}.{key[1]} is partitioned: restored with its {len(parts)} partitions"
                )
        if table.get("relkind") == "f":
            notes.append(f"{key[0]}.{key[1]} is a foreign table: definition only, no rows")
    return notes
