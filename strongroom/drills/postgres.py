"""PostgreSQL restore drills: every database of a backup into a throwaway database.

Scratch target, in order of preference:

* ``sandbox=True``: a throwaway PostgreSQL 15 cluster started for the drill
  (``strongroom.sandbox.postgres``), with the backup's globals (roles) restored
  first: the closest thing to a restore onto a fresh machine. Its start-up is
  recorded as ``prepare_s``, not as RTO.
* ``scratch``: a configured scratch server (another PostgresConnection);
* otherwise the source server itself.

Each database goes to ``sr_drill_<token>_<n>`` through the normal restore path
(``restore_postgres``: streamed, checksums verified, row counts checked
before the database appears under its name). The comparison then checks the
table set and exact row counts against the manifest, computes an
order-independent fingerprint of every table's rows, and optionally compares
counts and fingerprints with the live source database (``live="report"``
records drift, ``live="strict"`` fails on it: only for a source that does not
change between backup and drill). Every ``sr_drill_*`` database is dropped
afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pydantic import SecretStr

from strongroom.artifacts import read_artifact
from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig, PostgresConnection
from strongroom.drills.core import LiveMode, live_verdict
from strongroom.engines.postgres import inspection as pg_inspect
from strongroom.engines.postgres import relations as pg_relations
from strongroom.engines.postgres.backup import pg_tool
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.engines.postgres.sql_guard import (
    check_no_meta_commands,
    feed_restricted,
    new_restrict_key,
)
from strongroom.errors import IntegrityError, NotFound, StrongroomError
from strongroom.private_files import create_private
from strongroom.process import Tool
from strongroom.redact import register, scrub
from strongroom.repository.base import Repository

# Same text rendering of values on every server, so fingerprints compare across servers.
_SESSION = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';"
    " SET extra_float_digits = 1; SET bytea_output = 'hex'"
)


def fingerprint_tables(
    c: psycopg.Connection, tables: list[tuple[str, str]], *, only: bool = False
) -> dict[tuple[str, str], tuple[int, str]]:
    """(row count, fingerprint) per table: the sum of a 60-bit hash of each row's text,
    so the order of rows does not matter and memory stays flat."""
    c.execute(_SESSION)
    found: dict[tuple[str, str], tuple[int, str]] = {}
    for schema, table in tables:
        query = sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)::bigint),"
            " 0)::text FROM {}{}.{} AS t"
        ).format(sql.SQL("ONLY " if only else ""), sql.Identifier(schema), sql.Identifier(table))
        row = c.execute(query).fetchone()
        assert row is not None
        found[(schema, table)] = (int(row[0]), str(row[1]))
    return found


class PostgresDrill:
    """ScratchAdapter for PostgreSQL logical backups (see the module docstring)."""

    engine = "postgresql"

    def __init__(
        self,
        source: PostgresConnection,
        repo: Repository,
        enc: EncryptionConfig,
        *,
        scratch: PostgresConnection | None = None,
        sandbox: bool = False,
        live: LiveMode = "off",
        restore_globals: bool | None = None,
        fingerprints: bool = True,
        jobs: int = 1,
    ) -> None:
        self.source = source
        self.repo = repo
        self.enc = enc
        self.scratch_conn = scratch
        self.sandbox = sandbox
        self.live: LiveMode = live
        self.restore_globals = sandbox if restore_globals is None else restore_globals
        self.fingerprints = fingerprints
        self.jobs = jobs
        self.token = secrets.token_hex(4)
        self.conn: PostgresConnection = scratch or source
        self.databases: dict[str, str] = {}
        self._server: Any = None
        self._mode = "sandbox" if sandbox else ("scratch server" if scratch else "source server")
        register(*source.secrets(), *(scratch.secrets() if scratch else []), *enc.secrets())

    # ----------------------------------------------------------------- adapter

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self._mode,
            "server": f"{self.conn.host}:{self.conn.port}",
            "databases": dict(self.databases),
        }

    def prepare(self, manifest: Manifest) -> None:
        if manifest.kind != "logical":
            raise StrongroomError(
                f"backup {manifest.backup_id} is a {manifest.kind!r} backup; "
                "PostgreSQL drills restore logical backups"
            )
        if self.sandbox:
            from strongroom.sandbox.postgres import PostgresServer

            server = PostgresServer()
            self._server = server
            server.start()
            # Over the sandbox's private Unix socket (trust): globals.sql sets the roles'
            # passwords to the source's, the superuser's included.
            self.conn = PostgresConnection(
                name=self.source.name,
                host=str(server.socket_dir),
                port=server.port,
                user=server.superuser,
                password=SecretStr(server.password),
                sslmode="disable",
            )
            register(server.password)
        dbs = manifest.details.get("databases", [])
        if not dbs:
            raise NotFound(f"backup {manifest.backup_id} holds no databases")
        self.databases = {db["name"]: f"sr_drill_{self.token}_{i}" for i, db in enumerate(dbs)}

    def _same_server(self) -> bool:
        return not self.sandbox and (self.conn.host, self.conn.port) == (
            self.source.host,
            self.source.port,
        )

    def restore(self, manifest: Manifest) -> dict[str, Any]:
        report: dict[str, Any] = {"databases": []}
        if self.restore_globals:
            report["globals"] = self._apply_globals(manifest)
        no_owner = not (self._same_server() or self.restore_globals)
        for name, scratch in self.databases.items():
            result = restore_postgres(
                self.conn,
                self.repo,
                self.enc,
                PgRestoreRequest(
                    backup_id=manifest.backup_id,
                    source_target=manifest.target,
                    database=name,
                    target_database=scratch,
                    no_owner=no_owner,
                    jobs=self.jobs,
                ),
            )
            report["databases"].append(
                {
                    "database": name,
                    "scratch_database": scratch,
                    "seconds": result.get("duration_s"),
                    "raw_size": result.get("raw_size"),
                    "tables": len(result.get("tables", [])),
                }
            )
        report["no_owner"] = no_owner
        return report

    def _apply_globals(self, manifest: Manifest) -> dict[str, Any]:
        """Roles and tablespaces from globals.sql; 'already exists' errors are expected.

        The SQL is spooled into a private file and verified end to end before psql
        sees a byte, then fed behind a ``\\restrict`` line (``pg_sql_guard``)."""
        try:
            artifact = manifest.artifact("globals.sql")
        except NotFound:
            return {"applied": False, "reason": "no globals.sql in the backup"}
        with tempfile.TemporaryDirectory(prefix="sr-globals-") as folder:
            spooled = Path(folder) / "globals.sql"
            with create_private(spooled) as sink:
                read_artifact(self.repo, artifact, sink, encryption=self.enc)
            check_no_meta_commands(spooled, "globals.sql")
            env = {**self.conn.libpq_env(), "PGDATABASE": self.conn.maintenance_db}
            psql = Tool(
                [pg_tool("psql"), "-X", "-q", "--no-password"],
                env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
            )
            assert psql.proc.stdin is not None
            try:
                feed_restricted(spooled, psql.proc.stdin, new_restrict_key(), "globals.sql")
            except BrokenPipeError:
                pass  # psql ended early: its exit status and stderr say why
            finally:
                with contextlib.suppress(OSError):
                    psql.proc.stdin.close()
            psql.check("psql applying globals.sql")
        errors = [line for line in psql.stderr.splitlines() if "ERROR" in line]
        refused = [line for line in psql.stderr.splitlines() if "restricted" in line]
        if refused:
            raise IntegrityError(
                "globals.sql tried psql meta-commands that restricted mode refused "
                f"({len(refused)}); nothing of them ran"
            )
        return {"applied": True, "errors_ignored": len(errors)}

    def handle(self) -> dict[str, Any]:
        return {"connection": self.conn, "databases": dict(self.databases)}

    def compare(self, manifest: Manifest) -> list[dict[str, Any]]:
        checks: list[dict[str, Any]] = []
        for entry in manifest.details.get("databases", []):
            name = entry["name"]
            scratch = self.databases[name]
            listed = {(t["schema"], t["name"]) for t in entry["tables"]}
            expected = pg_relations.expected_rows(entry)  # relations the backup counted
            only = pg_relations.counts_only(entry)
            self._only = only
            with connect(self.conn, scratch) as c:
                present = set(pg_inspect.user_tables(c))
                tables = sorted(set(expected) & present)
                if self.fingerprints:
                    prints = fingerprint_tables(c, tables, only=only)
                else:
                    counted = pg_inspect.count_rows(c, tables, only=only)
                    prints = {k: (n, "") for k, n in counted.items()}
            live: dict[tuple[str, str], tuple[int, str]] = {}
            if self.live != "off":
                live = self._live(name, tables)
            for s, t in sorted(listed - present):
                checks.append(
                    {
                        "item": f"{name}:{s}.{t}",
                        "check": "table present",
                        "ok": False,
                        "detail": f"{name}:{s}.{t} missing from the restored database",
                    }
                )
            for s, t in sorted(present - listed):
                checks.append(
                    {
                        "item": f"{name}:{s}.{t}",
                        "check": "table present",
                        "ok": False,
                        "detail": f"{name}:{s}.{t} is restored but not in the manifest",
                    }
                )
            for key in tables:
                rows, fp = prints[key]
                item = f"{name}:{key[0]}.{key[1]}"
                check: dict[str, Any] = {
                    "item": item,
                    "check": "rows vs manifest" + (" + fingerprint" if self.fingerprints else ""),
                    "expected_rows": expected[key],
                    "restored_rows": rows,
                    "fingerprint": fp or None,
                    "ok": rows == expected[key],
                }
                if not check["ok"]:
                    check["detail"] = f"{item}: {rows} rows restored, manifest says {expected[key]}"
                if key in live:
                    live_rows, live_fp = live[key]
                    same = live_rows == rows and (not self.fingerprints or live_fp == fp)
                    check.update({"live_rows": live_rows, "live_fingerprint": live_fp or None})
                    live_verdict(
                        check,
                        self.live,
                        same,
                        f"{item}: restored copy differs from the live source "
                        f"({rows} vs {live_rows} rows"
                        + (", fingerprints differ" if live_fp != fp else "")
                        + ")",
                    )
                checks.append(check)
        return checks

    def _live(
        self, database: str, tables: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, str]]:
        with connect(self.source, database) as c:
            present = set(pg_inspect.user_tables(c))
            wanted = [t for t in tables if t in present]
            only = getattr(self, "_only", False)
            if self.fingerprints:
                return fingerprint_tables(c, wanted, only=only)
            return {k: (n, "") for k, n in pg_inspect.count_rows(c, wanted, only=only).items()}

    def cleanup(self) -> dict[str, Any]:
        dropped: list[str] = []
        errors: list[str] = []
        if self._server is not None:
            try:
                self._server.cleanup()
            except Exception as exc:
                errors.append(f"stopping the sandbox server: {scrub(str(exc))}")
            self._server = None
            return {
                "ok": not errors,
                "sandbox_stopped": not errors,
                "dropped": list(self.databases.values()),
                **({"error": "; ".join(errors)} if errors else {}),
            }
        try:
            with connect(self.conn) as c:
                # our databases, and a restore's own scratch database if one was left
                for name in self.databases.values():
                    c.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
                    dropped.append(name)
                left = c.execute(
                    "SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                    (list(self.databases.values()),),
                ).fetchall()
                if left:
                    errors.append(f"still present: {', '.join(r[0] for r in left)}")
        except StrongroomError as exc:
            errors.append(scrub(str(exc)))
        except psycopg.Error as exc:
            errors.append(scrub(str(exc)))
        return {
            "ok": not errors,
            "dropped": dropped,
            **({"error": "; ".join(errors)} if errors else {}),
        }
