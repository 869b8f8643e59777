"""SQL sessions through ``psql`` for the backup path: facts, the exported snapshot, counts.

A logical backup needs a few queries before and during the dump: server facts, the
database list, a snapshot to share with pg_dump, and exact row counts in that
snapshot. Asking them through ``psql`` (which strongroom needs anyway) keeps the
backup path free of a database driver, so a backup's process starts its dump sooner.
Every answer is one JSON value per query, so names with quotes, ``|`` or newlines
travel safely. The password goes through the environment only. Connection failures
get the classification used everywhere (credentials refused, database missing,
server unreachable after bounded retries).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections import deque
from typing import Any

from strongroom.config import PostgresConnection
from strongroom.errors import AccessDenied, NotFound, ServiceUnavailable, StrongroomError
from strongroom.process import classify_failure
from strongroom.redact import register, scrub

CONNECT_ATTEMPTS = 3

# Every relation pg_dump dumps as a table-like object: plain, partitioned (any depth),
# partitions, inheritance children, materialized views and foreign tables; extension
# members are left out (pg_dump does not dump their data).
USER_TABLES = """
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'm', 'f')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
    AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                    AND d.objid = c.oid AND d.deptype = 'e')
"""

# One JSON object per relation, in the session's snapshot: its kind, where it hangs
# (partition of / inherits from), and the exact rows stored in the relation itself
# (FROM ONLY: a parent's count never includes its children) with its size on disk
# (``bytes``: a parallel restore splits tables into groups of equal work by it) and
# the oids of its indexes and index-backed constraints (``index_oids``: built as soon
# as the table is loaded).
# Partitioned parents hold no rows (0); foreign tables are not counted (that would
# query the remote server) and neither are unpopulated materialized views (null).
# query_to_xml runs each count(*) inside this statement, with the names quoted by
# format(%I): never interpolated by us.
# The counts run while pg_dump streams and finish long before it, so parallel workers
# would only take CPU from the dump (and from the production server): one backend.
COUNT_ROWS = f"""
SET LOCAL max_parallel_workers_per_gather = 0;
SELECT coalesce(json_agg(json_build_object(
  'schema', n.nspname, 'name', c.relname, 'oid', c.oid::bigint, 'relkind', c.relkind,
  'unlogged', c.relpersistence = 'u',
  'bytes', CASE WHEN c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated)
     THEN pg_table_size(c.oid) END,
  'index_oids', (SELECT json_agg(x.o ORDER BY x.o) FROM (
       SELECT i.indexrelid::bigint AS o FROM pg_index i WHERE i.indrelid = c.oid
       UNION ALL SELECT k.oid::bigint FROM pg_constraint k
       WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u', 'x')) x),
  'populated', CASE WHEN c.relkind = 'm' THEN c.relispopulated END,
  'partition_of', (SELECT json_build_array(pn.nspname, pc.relname)
     FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent
     JOIN pg_namespace pn ON pn.oid = pc.relnamespace
     WHERE c.relispartition AND i.inhrelid = c.oid),
  'inherits', (SELECT json_agg(json_build_array(pn.nspname, pc.relname) ORDER BY i.inhseqno)
     FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent
     JOIN pg_namespace pn ON pn.oid = pc.relnamespace
     WHERE NOT c.relispartition AND i.inhrelid = c.oid),
  'rows', CASE
     WHEN c.relkind = 'p' THEN 0
     WHEN c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated) THEN
       (xpath('/row/c/text()', query_to_xml(
          format('SELECT count(*) AS c FROM ONLY %I.%I', n.nspname, c.relname), false, true, '')
       ))[1]::text::bigint
   END) ORDER BY n.nspname, c.relname), '[]'::json)
{USER_TABLES}
"""

FACTS = """
SELECT json_build_object(
  'version', current_setting('server_version'),
  'version_num', current_setting('server_version_num')::int,
  'in_recovery', pg_is_in_recovery(),
  'databases', (
    SELECT coalesce(json_agg(json_build_object(
      'name', datname, 'size_bytes', pg_database_size(oid),
      'encoding', pg_encoding_to_char(encoding), 'collate', datcollate, 'ctype', datctype
    ) ORDER BY datname), '[]'::json)
    FROM pg_database WHERE datallowconn AND NOT datistemplate))
"""


def connect_refusal(where: str, message: str) -> StrongroomError | None:
    """The error for a connection libpq refused for good (never retried): credentials or
    a missing database; None for anything else (which may be transient). Shared by
    these psql sessions and the psycopg connections (``pg_connect``)."""
    text = message.lower()
    if "password authentication failed" in text or "no password" in text:
        return AccessDenied(f"PostgreSQL {where}: credentials refused")
    if "does not exist" in text and "database" in text:
        return NotFound(f"PostgreSQL {where}: database does not exist")
    return None


class PsqlSession:
    """One ``psql`` process driven over pipes: send a statement, read its JSON answer.

    ``send`` and ``receive`` are separate, so a long query (the row counts) runs while
    the caller streams the dump, and is collected afterwards.
    """

    def __init__(self, psql: str, conn: PostgresConnection, database: str) -> None:
        register(*conn.secrets())
        self.database = database
        self.where = f"{conn.host}:{conn.port}/{database}"
        env = {**conn.libpq_env(), "PGDATABASE": database}
        self._marker = f"__strongroom_{uuid.uuid4().hex}__"
        self.proc = subprocess.Popen(
            [psql, "-XAtq", "--no-password", "-v", "ON_ERROR_STOP=1", "-P", "pager=off"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self._tail: deque[str] = deque(maxlen=200)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._tail.append(line)

    @property
    def stderr(self) -> str:
        return scrub("".join(self._tail))

    def send(self, sql: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{sql.strip().rstrip(';')};\n\\echo {self._marker}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._failure("sending a query") from None

    def receive(self, what: str) -> Any:
        """The JSON answer of the oldest query sent and not yet received."""
        assert self.proc.stdout is not None
        lines: list[str] = []
        for line in self.proc.stdout:
            if line.rstrip("\n") == self._marker:
                text = "".join(lines).strip()
                return json.loads(text) if text else None
            lines.append(line)
        raise self._failure(what)

    def query(self, sql: str, what: str) -> Any:
        self.send(sql)
        return self.receive(what)

    def _failure(self, what: str) -> Exception:
        code = self.proc.wait(timeout=30)
        self._drain.join(timeout=5)
        return classify_failure("psql", f"{what} on {self.where}", code, self.stderr)

    def close(self) -> None:
        """End the session (a transaction still open is rolled back by the server)."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("\\q\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> PsqlSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(psql: str, conn: PostgresConnection, database: str) -> PsqlSession:
    """A connected session, with bounded retries for an unreachable server."""
    last = ""
    for attempt in range(CONNECT_ATTEMPTS):
        if attempt:
            time.sleep(min(0.5 * 2**attempt, 4.0))
        session = PsqlSession(psql, conn, database)
        try:
            session.query("SELECT 1", "connecting")
            return session
        except StrongroomError:
            session.close()
            refused = connect_refusal(session.where, session.stderr)
            if refused is not None:
                raise refused from None
            lines = session.stderr.strip().splitlines()
            last = lines[-1] if lines else "connection failed"
        except BaseException:
            session.close()
            raise
    raise ServiceUnavailable(
        f"PostgreSQL {conn.host}:{conn.port}/{database} unreachable after "
        f"{CONNECT_ATTEMPTS} attempts: {last}"
    )


def server_and_databases(
    session: PsqlSession,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``({"version", "version_num", "in_recovery"}, [database facts by name])``."""
    facts = session.query(FACTS, "reading server facts")
    databases = facts.pop("databases")
    return facts, databases


def count_rows_result(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's table entries: schema, name, rows (int, or None when not counted),
    relkind, oid and how the relation hangs together (see ``pg_relations``)."""
    tables: list[dict[str, Any]] = []
    for row in rows:
        entry = {k: v for k, v in row.items() if v is not None or k == "rows"}
        entry["schema"], entry["name"] = str(row["schema"]), str(row["name"])
        entry["rows"] = None if row["rows"] is None else int(row["rows"])
        if not entry.get("unlogged"):
            entry.pop("unlogged", None)
        tables.append(entry)
    return tables
