"""Putting a restored scratch database in place of the target, atomically.

A whole-database restore loads into a fresh scratch database; only when every check
passed does it take the target's name. Both renames run in one transaction, so the
target is never missing and never half-restored; the old copy is dropped afterwards.
"""

from __future__ import annotations

import secrets

import psycopg
from psycopg import sql

from strongroom.config import PostgresConnection
from strongroom.engines.postgres.connect import connect
from strongroom.errors import Conflict


def drop_database(conn: PostgresConnection, name: str) -> None:
    with connect(conn) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def swap_in(conn: PostgresConnection, scratch: str, target: str, exists: bool) -> None:
    """Replace ``target`` with ``scratch``; the old database is dropped only after the swap.

    Both renames run in one transaction, so a failure (or a kill) leaves the target
    exactly as it was, never missing.
    """

    def rename(c: psycopg.Connection, old: str, new: str) -> None:
        c.execute(
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(old), sql.Identifier(new)
            )
        )

    def kick(c: psycopg.Connection, database: str) -> None:
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        )

    with connect(conn) as c:
        kick(c, scratch)  # nobody else has business in our scratch database
        if not exists:
            try:
                rename(c, scratch, target)
            except psycopg.Error as exc:
                raise Conflict(
                    f"could not rename the restored copy {scratch!r} to {target!r}: "
                    f"{exc.diag.message_primary or type(exc).__name__}"
                ) from None
            return
        old = f"sr_old_{secrets.token_hex(4)}"
        try:
            kick(c, target)
            kick(c, scratch)
            with c.transaction():  # both renames commit together, or neither does
                rename(c, target, old)
                rename(c, scratch, target)
        except psycopg.Error as exc:
            raise Conflict(
                f"could not put the restored copy in place of {target!r}: "
                f"{exc.diag.message_primary or type(exc).__name__}; {target!r} is unchanged"
            ) from None
        c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(old)))
