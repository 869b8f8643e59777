"""Server and database facts for a backup, asked through one ``psql`` call.

A backup needs only a few facts before its dumps start (server version, which
databases exist, their sizes and encodings). Asking them through ``psql`` keeps the
backup path free of a database driver: the dump starts a quarter of a second sooner,
which is most of the fixed cost of backing up a small database. Connection failures
get the same classification as everywhere else (credentials refused, database
missing, server unreachable after bounded retries), and the password travels in the
environment only.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from strongroom.config import PostgresConnection
from strongroom.errors import AccessDenied, NotFound, ServiceUnavailable, ToolFailed
from strongroom.redact import scrub

CONNECT_ATTEMPTS = 3

FACTS_QUERY = """
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


def server_and_databases(
    conn: PostgresConnection, psql: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``({"version", "version_num", "in_recovery"}, [database facts by name])``."""
    where = f"{conn.host}:{conn.port}/{conn.maintenance_db}"
    env = {**conn.libpq_env(), "PGDATABASE": conn.maintenance_db}
    argv = [psql, "-XAtq", "--no-password", "-v", "ON_ERROR_STOP=1"]
    last = "connection failed"
    for attempt in range(CONNECT_ATTEMPTS):
        if attempt:
            time.sleep(min(0.5 * 2**attempt, 4.0))
        out = subprocess.run(
            [*argv, "-c", FACTS_QUERY], env=env, capture_output=True, text=True, check=False
        )
        if out.returncode == 0:
            facts = json.loads(out.stdout)
            databases = facts.pop("databases")
            return facts, databases
        stderr = out.stderr.lower()
        lines = scrub(out.stderr).strip().splitlines()
        last = lines[-1] if lines else f"psql exit code {out.returncode}"
        if "password authentication failed" in stderr or "no password supplied" in stderr:
            raise AccessDenied(f"PostgreSQL {where}: credentials refused")
        if "does not exist" in stderr and "database" in stderr:
            raise NotFound(f"PostgreSQL {where}: database does not exist")
        if out.returncode != 2:  # 2: the connection failed; anything else is not transient
            raise ToolFailed(f"PostgreSQL {where}: reading server facts failed: {last}")
    raise ServiceUnavailable(
        f"PostgreSQL {where} unreachable after {CONNECT_ATTEMPTS} attempts: {last}"
    )
