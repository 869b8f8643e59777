"""PostgreSQL logical backup: ``pg_dump -Fc`` per database plus globals, streamed.

Each database is dumped from an exported snapshot; exact row counts are taken
in the same snapshot while the dump runs, so the manifest's counts describe
exactly the data in the dump. Nothing is staged on disk.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strongroom.artifacts import (
    claim_backup_id,
    publish_backup,
    storage_settings,
    store_artifact,
    store_tool_output,
)
from strongroom.catalog import Artifact, Manifest, data_key
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres import psql as pg_psql
from strongroom.engines.postgres.pg_bin import pg_tool
from strongroom.errors import NotFound
from strongroom.ids import new_backup_id
from strongroom.pipeline import Progress
from strongroom.process import Tool
from strongroom.redact import register
from strongroom.repository.base import Repository, StorageSettings

ENGINE = "postgresql"

ProgressFactory = Callable[[str, int | None], Progress]


def tool_version(name: str) -> str:
    out = subprocess.run([pg_tool(name), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def artifact_name(index: int, database: str, dump_format: str = "custom") -> str:
    """A storage-safe artifact name; the real database name lives in the manifest."""
    safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "_-" else "_" for ch in database)[
        :40
    ]
    return f"db{index:03d}-{safe or 'x'}.{'pgdump' if dump_format == 'custom' else 'pgdir'}"


def _select_databases(available: list[dict[str, Any]], wanted: list[str]) -> list[dict[str, Any]]:
    if not wanted:
        return [d for d in available if d["name"] != "postgres"] or available
    names = {d["name"]: d for d in available}
    missing = [w for w in wanted if w not in names]
    if missing:
        raise NotFound(
            f"database(s) {', '.join(map(repr, missing))} not on the server; "
            f"it has: {', '.join(sorted(names))}"
        )
    return [names[w] for w in wanted]


def _dump_database(
    conn: PostgresConnection,
    repo: Repository,
    enc: EncryptionConfig,
    *,
    key: str,
    name: str,
    database: dict[str, Any],
    level: int,
    settings: StorageSettings,
    progress: Progress | None,
    session: pg_psql.PsqlSession | None = None,
) -> tuple[list[Artifact], list[dict[str, Any]]]:
    """Dump one database from an exported snapshot; count its rows in the same snapshot.

    The snapshot is held by a ``psql`` session (``pg_psql``; ``session`` if one is already
    connected to this database), which also runs the exact counts while pg_dump streams;
    its answer is collected after the dump."""
    opened = session or pg_psql.open_session(pg_tool("psql"), conn, database["name"])
    with opened as snap:
        snapshot = snap.query(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT to_json(pg_export_snapshot())",
            "exporting a snapshot",
        )
        env = conn.libpq_env()
        env["PGDATABASE"] = database["name"]
        snap.send(pg_psql.COUNT_ROWS)  # runs in the snapshot while the dump streams
        if conn.dump_format == "directory":
            stored = _dump_directory(
                conn,
                repo,
                enc,
                env,
                snapshot,
                key=key,
                name=name,
                database=database,
                level=level,
                settings=settings,
                progress=progress,
            )
        else:
            dump = Tool(
                [pg_tool("pg_dump"), "-Fc", "-Z0", f"--snapshot={snapshot}", "--no-password"],
                env,
            )
            stored = [
                _store_from_tool(
                    dump,
                    repo,
                    key,
                    enc,
                    level=level,
                    settings=settings,
                    progress=progress,
                    name=name,
                    what=f"pg_dump of database {database['name']!r}",
                    content="pg_dump-custom",
                    meta={"database": database["name"]},
                )
            ]
        try:
            counts = pg_psql.count_rows_result(
                snap.receive(f"counting rows of {database['name']!r}")
            )
        except BaseException:
            for artifact in stored:
                repo.delete(artifact.key)
            raise
    return stored, counts


def _dump_directory(
    conn: PostgresConnection,
    repo: Repository,
    enc: EncryptionConfig,
    env: dict[str, str],
    snapshot: str,
    *,
    key: str,
    name: str,
    database: dict[str, Any],
    level: int,
    settings: StorageSettings,
    progress: Progress | None,
) -> list[Artifact]:
    """pg_dump -Fd -j N into a spool folder, then stream each file; the spool is removed."""
    spool_root = Path(conn.spool_dir) if conn.spool_dir else None
    if spool_root is not None:
        spool_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="strongroom-spool-", dir=spool_root) as spool:
        target = Path(spool) / "dump"
        dump = Tool(
            [
                pg_tool("pg_dump"),
                "-Fd",
                "-Z0",
                f"-j{conn.jobs}",
                f"--snapshot={snapshot}",
                "--no-password",
                "-f",
                str(target),
            ],
            env,
            stdout=subprocess.DEVNULL,
        )
        dump.check(f"pg_dump -Fd of database {database['name']!r}")
        stored: list[Artifact] = []
        try:
            for member in sorted(target.iterdir()):
                with member.open("rb") as source:
                    stored.append(
                        store_artifact(
                            repo,
                            f"{key}/{member.name}",
                            source,
                            name=f"{name}/{member.name}",
                            content="pg_dump-directory-member",
                            encryption=enc,
                            level=level,
                            settings=settings,
                            progress=progress,
                            meta={"database": database["name"], "member": member.name},
                        )
                    )
                member.unlink()  # free the spool as we go
        except BaseException:
            for artifact in stored:
                repo.delete(artifact.key)
            raise
    return stored


def _store_from_tool(
    tool: Tool,
    repo: Repository,
    key: str,
    enc: EncryptionConfig,
    *,
    level: int,
    settings: StorageSettings,
    progress: Progress | None,
    name: str,
    what: str,
    content: str,
    meta: dict[str, object] | None = None,
) -> Artifact:
    """Store a tool's stdout; the object is removed again unless the tool exits 0."""
    return store_tool_output(
        repo,
        tool,
        what,
        lambda source: store_artifact(
            repo,
            key,
            source,
            name=name,
            content=content,
            encryption=enc,
            level=level,
            settings=settings,
            progress=progress,
            meta=meta,
        ),
    )


def backup_postgres(
    conn: PostgresConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    backup_id: str | None = None,
    labels: dict[str, str] | None = None,
    progress: ProgressFactory | None = None,
    include_globals: bool = True,
) -> Manifest:
    """Back up the target's databases; returns the published manifest."""
    register(*conn.secrets(), *repo_config.secrets(), *enc.secrets())
    started = dt.datetime.now(dt.UTC)
    bid = backup_id or new_backup_id(started)
    settings = storage_settings(repo_config, started)
    claim_backup_id(repo, ENGINE, conn.name, bid)
    version = subprocess.Popen(  # read when the manifest is written
        [pg_tool("pg_dump"), "--version"], stdout=subprocess.PIPE, text=True
    )
    # One session serves the facts and then the first database's snapshot (a psql start
    # and a connection fewer); the maintenance database when the databases are not named.
    try:
        first = _facts_session(conn)
        try:
            server, available = pg_psql.server_and_databases(first)
            databases = _select_databases(available, conn.databases)
        except BaseException:
            first.close()
            raise
    except BaseException:
        version.kill()
        version.communicate()
        raise
    facts: pg_psql.PsqlSession | None = first

    artifacts: list[Artifact] = []
    db_details: list[dict[str, Any]] = []
    try:
        if include_globals:
            key = data_key(ENGINE, conn.name, bid, "globals.sql")
            tool = Tool(
                [pg_tool("pg_dumpall"), "--globals-only", "--no-password"],
                {**conn.libpq_env(), "PGDATABASE": conn.maintenance_db},
            )
            artifacts.append(
                _store_from_tool(
                    tool,
                    repo,
                    key,
                    enc,
                    level=repo_config.compression_level,
                    settings=settings,
                    progress=progress("globals.sql", None) if progress else None,
                    name="globals.sql",
                    what="pg_dumpall --globals-only",
                    content="sql",
                )
            )
        for index, database in enumerate(databases):
            name = artifact_name(index, database["name"], conn.dump_format)
            reuse = None
            if facts is not None and database["name"] == facts.database:
                reuse, facts = facts, None  # _dump_database closes it
            stored, tables = _dump_database(
                conn,
                repo,
                enc,
                key=data_key(ENGINE, conn.name, bid, name),
                name=name,
                database=database,
                level=repo_config.compression_level,
                settings=settings,
                progress=progress(name, database["size_bytes"]) if progress else None,
                session=reuse,
            )
            artifacts.extend(stored)
            db_details.append(
                {
                    **database,
                    "artifact": name,
                    "format": conn.dump_format,
                    "members": [a.name for a in stored],
                    "tables": tables,
                }
            )
        manifest = Manifest(
            backup_id=bid,
            engine=ENGINE,
            target=conn.name,
            kind="logical",
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            repository=repo.describe(),
            tool_versions={"pg_dump": version.communicate(timeout=30)[0].strip()},
            server={"host": conn.host, "port": conn.port, **server},
            artifacts=artifacts,
            details={"format": "custom", "databases": db_details},
            labels=dict(labels or {}),
        )
        publish_backup(repo, manifest, settings)
    except BaseException:
        for artifact in artifacts:
            repo.delete(artifact.key)
        raise
    finally:
        if facts is not None:
            facts.close()
        if version.poll() is None:
            version.kill()
        version.communicate()
    return manifest


def _facts_session(conn: PostgresConnection) -> pg_psql.PsqlSession:
    """A session on the first named database (its snapshot comes next), else on the
    maintenance database; a named database that does not exist falls back to the
    maintenance database, so the error can list the databases the server has."""
    psql = pg_tool("psql")
    if conn.databases:
        try:
            return pg_psql.open_session(psql, conn, conn.databases[0])
        except NotFound:
            pass
    return pg_psql.open_session(psql, conn, conn.maintenance_db)
