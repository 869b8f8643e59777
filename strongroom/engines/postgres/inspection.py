"""Facts about a PostgreSQL server and its databases: versions, sizes, tables, row counts."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from strongroom.engines.postgres.psql import USER_TABLES

# The same tables the backup counts (pg_psql.USER_TABLES), with % escaped for psycopg.
USER_RELATIONS = "SELECT n.nspname, c.relname" + USER_TABLES.replace("%", "%%") + "ORDER BY 1, 2"

ANY_USER_OBJECT = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
"""


def server_facts(c: psycopg.Connection) -> dict[str, Any]:
    row = c.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " pg_is_in_recovery()"
    ).fetchone()
    assert row is not None
    return {"version": row[0], "version_num": row[1], "in_recovery": row[2]}


def user_tables(c: psycopg.Connection) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in c.execute(USER_RELATIONS).fetchall()]


def has_user_objects(c: psycopg.Connection) -> bool:
    row = c.execute(ANY_USER_OBJECT).fetchone()
    return bool(row and row[0])


def count_rows(
    c: psycopg.Connection, tables: list[tuple[str, str]], *, only: bool = False
) -> dict[tuple[str, str], int]:
    """Exact row counts per (schema, table); identifiers quoted, never interpolated.
    ``only``: rows stored in each relation itself, not its partitions or children
    (how manifests that record relation kinds count)."""
    counts: dict[tuple[str, str], int] = {}
    for schema, table in tables:
        query = sql.SQL("SELECT count(*) FROM {}{}.{}").format(
            sql.SQL("ONLY " if only else ""), sql.Identifier(schema), sql.Identifier(table)
        )
        row = c.execute(query).fetchone()
        counts[(schema, table)] = int(row[0]) if row else 0
    return counts
