"""What the connected ClickHouse server can do, read once per client and cached.

18.16 and 26.x differ in ways the engine must respect: obsolete settings (26.x refuses
``allow_experimental_low_cardinality_type``), Atomic databases (a materialized view's
inner table is ``.inner_id.<uuid>`` there, ``.inner.<name>`` on Ordinary ones, and
renaming a table over it breaks the view), which ``system.tables`` columns exist, and
whether ``EXCHANGE TABLES`` (an atomic swap of two tables) is understood, and whether
``system.parts`` carries part checksums (incremental backups, ``incremental``).
Code asks these facts instead of comparing version strings.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from strongroom.engines.clickhouse.http_client import ClickHouseHTTP, ClickHouseQueryError

LOW_CARDINALITY_SETTING = "allow_experimental_low_cardinality_type"
# 20.12+: Replacing/Summing/... engines merge rows inside each INSERT block, so restored
# data would differ from what was read (duplicates the source still holds collapse)
OPTIMIZE_ON_INSERT = "optimize_on_insert"
INNER_PREFIX = ".inner."
INNER_ID_PREFIX = ".inner_id."
ZERO_UUID = "00000000-0000-0000-0000-000000000000"
SYNTAX_ERROR = 62
# parsed only, never executed: touches no table (the names need not exist)
EXCHANGE_PROBE = "EXPLAIN AST EXCHANGE TABLES system.__sr_probe_a AND system.__sr_probe_b"

_CACHE: weakref.WeakKeyDictionary[ClickHouseHTTP, Capabilities] = weakref.WeakKeyDictionary()


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass(frozen=True)
class Capabilities:
    version_text: str
    version: tuple[int, ...]
    has_low_cardinality_setting: bool  # the setting exists (18.16); unknown on 26.x
    has_optimize_on_insert: bool  # inserts merge rows of merge-sensitive engines (26.x)
    table_uuids: bool  # system.tables has ``uuid``
    target_table_column: bool  # system.tables has ``target_table`` (26.x)
    # the parser knows ``EXCHANGE TABLES`` (26.x); it works only in Atomic databases
    exchange_tables: bool
    # system.parts has ``hash_of_all_files`` (26.x; not 18.16): a part's checksum
    part_checksums: bool = False

    @property
    def ddl_settings(self) -> dict[str, Any]:
        """Settings every DDL statement gets (only those the server knows)."""
        return {LOW_CARDINALITY_SETTING: 1} if self.has_low_cardinality_setting else {}

    @property
    def insert_settings(self) -> dict[str, Any]:
        """Settings for restore INSERTs: rows land exactly as they were read."""
        return {OPTIMIZE_ON_INSERT: 0} if self.has_optimize_on_insert else {}


def read_capabilities(client: ClickHouseHTTP) -> Capabilities:
    """Ask the server (uncached); ``capabilities`` caches the answer per client."""
    version = str(client.tuples("SELECT version()", what="reading the server version")[0][0])
    settings = {
        str(r[0])
        for r in client.tuples(
            "SELECT name FROM system.settings "
            f"WHERE name IN ('{LOW_CARDINALITY_SETTING}', '{OPTIMIZE_ON_INSERT}')",
            what="reading server settings",
        )
    }
    columns = {
        str(r[0])
        for r in client.tuples(
            "SELECT name FROM system.columns WHERE database = 'system' AND table = 'tables'",
            what="reading system.tables columns",
        )
    }
    part_columns = {
        str(r[0])
        for r in client.tuples(
            "SELECT name FROM system.columns WHERE database = 'system' AND table = 'parts' "
            "AND name = 'hash_of_all_files'",
            what="reading system.parts columns",
        )
    }
    return Capabilities(
        exchange_tables=_parses_exchange(client),
        part_checksums="hash_of_all_files" in part_columns,
        version_text=version,
        version=_version_tuple(version),
        has_low_cardinality_setting=LOW_CARDINALITY_SETTING in settings,
        has_optimize_on_insert=OPTIMIZE_ON_INSERT in settings,
        table_uuids="uuid" in columns,
        target_table_column="target_table" in columns,
    )


def _parses_exchange(client: ClickHouseHTTP) -> bool:
    """Whether the server understands ``EXCHANGE TABLES``, asked by parsing it with
    ``EXPLAIN AST`` (cheap and safe: nothing is executed). 18.16 knows neither and answers
    with a syntax error; a server with EXCHANGE but older than EXPLAIN (20.x) is taken
    for one without, which only means the two-rename swap. Other errors are raised."""
    try:
        client.execute(EXCHANGE_PROBE, what="asking whether EXCHANGE TABLES is supported")
    except ClickHouseQueryError as exc:
        if exc.code == SYNTAX_ERROR:
            return False
        raise
    return True


def capabilities(client: ClickHouseHTTP) -> Capabilities:
    """The server's capabilities, read on first use by this client and then cached."""
    caps = _CACHE.get(client)
    if caps is None:
        caps = read_capabilities(client)
        _CACHE[client] = caps
    return caps


def inner_table_names(view: dict[str, Any]) -> list[str]:
    """The names a materialized view's inner table can have (``system.tables`` row of the
    view): ``.inner_id.<uuid>`` in an Atomic database, ``.inner.<name>`` in an Ordinary one."""
    names = []
    uuid = str(view.get("uuid") or "")
    if uuid and uuid != ZERO_UUID:
        names.append(INNER_ID_PREFIX + uuid)
    names.append(INNER_PREFIX + str(view["name"]))
    return names


def is_inner_name(name: str) -> bool:
    return name.startswith((INNER_PREFIX, INNER_ID_PREFIX))
