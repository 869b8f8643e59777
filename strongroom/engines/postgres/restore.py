"""PostgreSQL logical restore: whole database, tables, schemas; schema- or data-only.

The artifact streams through ``pg_restore -f -`` (archive -> SQL) into ``psql``
inside one transaction that strongroom opens and only commits after
``pg_restore`` exited cleanly and every checksum matched. A whole-database
restore goes into a fresh scratch database that replaces the target only after
the row counts match the manifest, so a failure at any point leaves the target
as it was.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import sql
from pydantic import BaseModel, Field

from strongroom.artifacts import read_artifact
from strongroom.catalog import Catalog, Manifest
from strongroom.config import EncryptionConfig, PostgresConnection
from strongroom.engines.postgres import inspection as pg_inspect
from strongroom.engines.postgres import relations as pg_relations
from strongroom.engines.postgres import restore_phased
from strongroom.engines.postgres import swap as pg_swap
from strongroom.engines.postgres import toc as pg_toc
from strongroom.engines.postgres.backup import ENGINE, pg_tool
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.relations import check_identifier as _check_identifier
from strongroom.errors import (
    IntegrityError,
    InvalidInput,
    NotFound,
    StrongroomError,
    TargetNotEmpty,
)
from strongroom.pipeline import Progress
from strongroom.process import Tool
from strongroom.redact import register
from strongroom.repository.base import Repository


def default_jobs() -> int:
    """One job per core, at most 8 (the server does the work; more only queue)."""
    return max(1, min(8, os.cpu_count() or 1))


class PgRestoreRequest(BaseModel):
    """What to restore and where; every field is validated before anything changes."""

    backup_id: str = "latest"
    source_target: str | None = Field(
        default=None, description="target the backup was taken from (default: the restore target)"
    )
    database: str | None = Field(
        default=None, description="database in the backup (needed when it holds several)"
    )
    target_database: str | None = Field(default=None, description="default: same name")
    tables: list[str] = Field(default_factory=list, description="schema.table or table")
    schemas: list[str] = Field(default_factory=list)
    schema_only: bool = False
    data_only: bool = False
    drop_existing: bool = False
    dry_run: bool = False
    no_owner: bool = False
    jobs: int = Field(
        default_factory=default_jobs,
        ge=1,
        le=64,
        description="parallel pg_restore jobs of a whole-database restore (default: the cores)",
    )
    maintenance_work_mem_mb: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="maintenance_work_mem of each restore session (index builds), MB",
    )


def _pick_database(manifest: Manifest, wanted: str | None) -> dict[str, Any]:
    dbs: list[dict[str, Any]] = manifest.details.get("databases", [])
    names = [d["name"] for d in dbs]
    if wanted is None:
        if len(dbs) != 1:
            raise InvalidInput(
                f"backup {manifest.backup_id} holds {len(dbs)} databases "
                f"({', '.join(names)}); choose one with database="
            )
        return dbs[0]
    for entry in dbs:
        if entry["name"] == wanted:
            return entry
    raise NotFound(
        f"database {wanted[:80]!r} is not in backup {manifest.backup_id}; "
        f"it holds: {', '.join(names)}"
    )


def _database_exists(conn: PostgresConnection, name: str) -> bool:
    with connect(conn) as c:
        return (
            c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            is not None
        )


def _restore_args(req: PgRestoreRequest, selected: list[tuple[str, str]], clean: bool) -> list[str]:
    # tables are selected by a use-list (-L, see pg_toc) that _load adds
    args = [pg_tool("pg_restore"), "--exit-on-error", "-f", "-"]
    for schema in req.schemas:
        args += ["-n", schema]
    if req.schema_only:
        args.append("--schema-only")
    if req.data_only:
        args.append("--data-only")
    if clean:
        args += ["--clean", "--if-exists"]
    if req.no_owner:
        args.append("--no-owner")
    return args


class _Forward:
    """Copies pg_restore's SQL into psql, wrapped in BEGIN ... COMMIT that we control."""

    def __init__(self, restore: Tool, psql: Tool, preamble: str) -> None:
        self.restore = restore
        self.psql = psql
        self.error: BaseException | None = None
        assert psql.proc.stdin is not None
        psql.proc.stdin.write(b"BEGIN;\n" + preamble.encode() + b"\n")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        src, dst = self.restore.proc.stdout, self.psql.proc.stdin
        assert src is not None and dst is not None
        while chunk := src.read(1024 * 1024):
            if self.error is not None:
                continue  # psql failed: keep pg_restore unblocked; its error is reported
            try:
                dst.write(chunk)
            except BaseException as exc:
                self.error = exc

    def commit(self) -> None:
        self.thread.join()
        stdin = self.psql.proc.stdin
        assert stdin is not None
        stdin.write(b"COMMIT;\n")
        stdin.close()


def _run_restore(
    repo: Repository,
    manifest: Manifest,
    entry: dict[str, Any],
    conn: PostgresConnection,
    enc: EncryptionConfig,
    database: str,
    args: list[str],
    preamble: str,
    progress: Progress | None,
    spooled: Path | None = None,
) -> None:
    """Stream the dump into ``database`` in one transaction; commit only if all checks pass.

    With ``spooled`` (a verified directory-format dump on local disk) pg_restore
    reads that folder instead of the artifact stream.
    """
    env = {**conn.libpq_env(), "PGDATABASE": database}
    psql = Tool(
        [pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password"],
        env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    restore = Tool(
        [*args, str(spooled)] if spooled else args,
        env,
        stdin=subprocess.DEVNULL if spooled else subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    forward = _Forward(restore, psql, preamble)
    committed = False
    name = entry["artifact"]
    try:
        if spooled is None:
            artifact = manifest.artifact(name)
            assert restore.proc.stdin is not None
            # pg_restore -t/-n/-L stops reading once it has what it needs: the rest of
            # the artifact is still read (and discarded) so every checksum is checked
            # before the transaction can commit; a failure raises here, uncommitted.
            sink = pg_toc.DrainingSink(restore.proc.stdin)
            read_artifact(repo, artifact, sink, encryption=enc, progress=progress)
            sink.close()
        restore.check(f"pg_restore of {name}")
        if forward.error is not None and psql.proc.poll() is None:
            raise StrongroomError(f"copying SQL into psql failed: {forward.error}")
        if psql.proc.poll() is not None:
            psql.check(f"psql into database {database!r}")
        forward.commit()
        committed = True
        psql.check(f"psql into database {database!r}")
    finally:
        if not committed:
            psql.kill()  # first: its transaction must never see EOF and commit
            restore.kill()


def _spool_directory_dump(
    repo: Repository,
    manifest: Manifest,
    entry: dict[str, Any],
    enc: EncryptionConfig,
    folder: Path,
    progress: Progress | None,
) -> Path:
    """Fetch and verify every member of a directory-format dump before pg_restore sees it."""
    target = folder / "dump"
    target.mkdir()
    paths = [
        (manifest.artifact(member), _member_path(target, manifest.artifact(member).meta))
        for member in entry["members"]
    ]  # every name is checked before any file is opened
    for artifact, path in paths:
        with path.open("xb") as sink:
            read_artifact(repo, artifact, sink, encryption=enc, holdback=0, progress=progress)
    return target


def _member_path(folder: Path, meta: dict[str, Any]) -> Path:
    """Where a directory-format member goes: a plain file name (as pg_dump -Fd writes:
    ``toc.dat``, ``1234.dat``), resolved inside ``folder``; anything else is refused."""
    name = meta.get("member")
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or len(name) > 255
    ):
        raise IntegrityError(
            f"directory-format member name {str(name)[:80]!r} is not a plain file name; "
            "the manifest is not trusted"
        )
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise IntegrityError(f"directory-format member {name[:80]!r} resolves outside its folder")
    return path


def _parallel_restore(
    conn: PostgresConnection, database: str, folder: Path, req: PgRestoreRequest, args: list[str]
) -> None:
    """pg_restore -j N straight into a scratch database (atomicity comes from the swap)."""
    jobs = req.jobs
    env = restore_phased.session_env(conn, database, req.maintenance_work_mem_mb)
    cmd = [a for a in args if a not in ("-f", "-")]
    tool = Tool([*cmd, f"-j{jobs}", "-d", database, str(folder)], env, stdout=subprocess.DEVNULL)
    tool.check(f"pg_restore -j{jobs} into {database!r}")


def _compare_rows(
    conn: PostgresConnection,
    database: str,
    entry: dict[str, Any],
    selected: list[tuple[str, str]],
) -> list[dict[str, Any]]:
    """Restored rows against the manifest, for every relation the backup counted."""
    expected = pg_relations.expected_rows(entry)
    tables = [k for k in selected if k in expected]
    with connect(conn, database) as c:
        actual = pg_inspect.count_rows(c, tables, only=pg_relations.counts_only(entry))
    return _row_checks(entry, tables, actual)


def _row_checks(
    entry: dict[str, Any], tables: list[tuple[str, str]], actual: dict[tuple[str, str], int]
) -> list[dict[str, Any]]:
    expected = pg_relations.expected_rows(entry)
    return [
        {
            "table": f"{s}.{t}",
            "expected": expected.get((s, t)),
            "actual": actual.get((s, t)),
            "ok": expected.get((s, t)) == actual.get((s, t)),
        }
        for s, t in tables
        if (s, t) in expected
    ]


@dataclass
class _Job:
    """Everything a restore decided while planning, shared by the two ways to run it."""

    req: PgRestoreRequest
    manifest: Manifest
    entry: dict[str, Any]
    target_db: str
    selected: list[tuple[str, str]]
    whole: bool
    exists: bool
    conflicts: list[str]


def _plan(
    conn: PostgresConnection, repo: Repository, req: PgRestoreRequest
) -> tuple[dict[str, Any], _Job]:
    """Validate the request against the manifest and the target; nothing is changed."""
    if req.schema_only and req.data_only:
        raise InvalidInput("schema_only and data_only exclude each other")
    if req.tables and req.schemas:
        raise InvalidInput("give tables or schemas, not both")
    manifest = Catalog(repo).resolve(
        req.backup_id, ENGINE, req.source_target or conn.name, kind="logical"
    )
    entry = _pick_database(manifest, req.database)
    target_db = _check_identifier(req.target_database or entry["name"], "target database")
    selected = pg_relations.select_tables(entry, req.tables, req.schemas)
    members = [manifest.artifact(m) for m in entry.get("members") or [entry["artifact"]]]
    whole = not (req.tables or req.schemas or req.data_only)
    exists = _database_exists(conn, target_db)
    conflicts: list[str] = []
    non_empty = False
    if exists:
        with connect(conn, target_db) as c:
            if whole:
                non_empty = pg_inspect.has_user_objects(c)
            else:
                present = set(pg_inspect.user_tables(c))
                conflicts = [f"{s}.{t}" for s, t in selected if (s, t) in present]
                missing = [f"{s}.{t}" for s, t in selected if (s, t) not in present]
                if req.data_only and missing:
                    raise NotFound(
                        f"data-only restore needs the tables to exist in {target_db!r}; "
                        f"missing: {', '.join(missing)}"
                    )
                if req.data_only:
                    counts = pg_inspect.count_rows(c, selected)
                    conflicts = [f"{s}.{t}" for (s, t), n in counts.items() if n]
    elif req.data_only:
        raise NotFound(f"data-only restore needs database {target_db!r} to exist")

    plan: dict[str, Any] = {
        "backup_id": manifest.backup_id,
        "backup_finished_at": manifest.finished_at.isoformat(),
        "source_target": manifest.target,
        "source_database": entry["name"],
        "target_server": f"{conn.host}:{conn.port}",
        "target_database": target_db,
        "mode": "whole database" if whole else ("data only" if req.data_only else "selective"),
        "schema_only": req.schema_only,
        "tables": [f"{s}.{t}" for s, t in selected],
        "notes": pg_relations.selection_notes(entry, selected) if not whole else [],
        "artifact": entry["artifact"],
        "format": entry.get("format", "custom"),
        "raw_size": sum(a.raw_size for a in members),
        "stored_size": sum(a.stored_size for a in members),
        "target_exists": exists,
        "would_replace": (whole and exists) or bool(conflicts),
        "conflicts": conflicts,
        "drop_existing": req.drop_existing,
        "method": _method(req, whole, entry.get("format", "custom")),
    }
    if ((whole and non_empty) or conflicts) and not req.drop_existing:
        what = (
            f"database {target_db!r} is not empty"
            if whole
            else (f"{', '.join(conflicts)} already exist" + (" with rows" if req.data_only else ""))
        )
        if not req.dry_run:
            raise TargetNotEmpty(f"refusing to overwrite: {what}; pass drop_existing to replace")
        plan["blocked"] = f"{what}; needs drop_existing"
    job = _Job(req, manifest, entry, target_db, selected, whole, exists, conflicts)
    return plan, job


def _method(req: PgRestoreRequest, whole: bool, dump_format: str) -> str:
    """How the restore will run, as the plan shows it."""
    if not whole:
        return "one transaction in the target database, one stream (selective restores are atomic)"
    if dump_format == "directory":
        return f"spooled and verified, pg_restore -j{req.jobs} into a scratch database, swapped in"
    return (
        f"pg_restore into a scratch database, {req.jobs} parallel table load(s) while the "
        f"artifact streams, then indexes with -j{req.jobs}; swapped in after the checks"
    )


def _load(
    job: _Job,
    conn: PostgresConnection,
    repo: Repository,
    enc: EncryptionConfig,
    database: str,
    args: list[str],
    preamble: str,
    progress: Progress | None,
    *,
    parallel: bool = False,
) -> None:
    """Load the dump into ``database``: streamed (custom format) or via a verified spool.

    A table selection goes to pg_restore as a use-list built from the archive's own
    table of contents (``pg_toc``), so partitions come with their TABLE ATTACH."""
    with tempfile.TemporaryDirectory(prefix="strongroom-spool-") as folder:
        spooled: Path | None = None
        if job.entry.get("format", "custom") == "directory":
            spooled = _spool_directory_dump(
                repo, job.manifest, job.entry, enc, Path(folder), progress
            )
        if job.req.tables:
            if spooled is not None:
                listing = pg_toc.list_folder(spooled, pg_tool("pg_restore"))
            else:
                listing = pg_toc.list_stream(
                    repo, job.manifest.artifact(job.entry["artifact"]), enc, pg_tool("pg_restore")
                )
            chosen = pg_toc.use_list(
                listing,
                job.entry,
                job.selected,
                schema_only=job.req.schema_only,
                data_only=job.req.data_only,
            )
            list_path = Path(folder) / "use-list.txt"
            list_path.write_text(chosen, encoding="utf-8")
            args = [*args, "-L", str(list_path)]
        if spooled is not None and parallel:
            _parallel_restore(conn, database, spooled, job.req, args)
            return
        _run_restore(
            repo,
            job.manifest,
            job.entry,
            conn,
            enc,
            database,
            args,
            preamble,
            progress,
            spooled=spooled,
        )


def _restore_whole(
    job: _Job,
    conn: PostgresConnection,
    repo: Repository,
    enc: EncryptionConfig,
    progress: Progress | None,
    phases: dict[str, float],
) -> list[dict[str, Any]]:
    """Into a scratch database, check row counts, then swap it in place of the target."""
    entry = job.entry
    scratch = f"sr_restore_{secrets.token_hex(4)}"
    started = time.monotonic()
    with connect(conn) as c:
        c.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}"
            ).format(
                sql.Identifier(scratch),
                sql.Literal(entry["encoding"]),
                sql.Literal(entry["collate"]),
                sql.Literal(entry["ctype"]),
            )
        )
    phases["create_scratch_s"] = round(time.monotonic() - started, 3)
    try:
        if entry.get("format", "custom") == "custom":
            options = restore_phased.LoadOptions(
                jobs=job.req.jobs,
                memory_mb=job.req.maintenance_work_mem_mb,
                schema_only=job.req.schema_only,
                no_owner=job.req.no_owner,
            )
            counts = restore_phased.load_whole(
                repo, job.manifest, entry, conn, enc, scratch, options, progress, phases
            )
            checks = [] if job.req.schema_only else _row_checks(entry, job.selected, counts)
        else:
            args = _restore_args(job.req, job.selected, clean=False)
            _load(job, conn, repo, enc, scratch, args, "", progress, parallel=True)
            checks = (
                [] if job.req.schema_only else _compare_rows(conn, scratch, entry, job.selected)
            )
        bad = [c for c in checks if not c["ok"]]
        if bad:
            raise IntegrityError(f"row counts differ from the manifest: {bad[:5]}")
        started = time.monotonic()
        pg_swap.swap_in(conn, scratch, job.target_db, job.exists)
        phases["swap_s"] = round(time.monotonic() - started, 3)
    except BaseException:
        with contextlib.suppress(Exception):
            pg_swap.drop_database(conn, scratch)
        raise
    return checks


def _restore_selective(
    job: _Job,
    conn: PostgresConnection,
    repo: Repository,
    enc: EncryptionConfig,
    progress: Progress | None,
    phases: dict[str, float],
) -> list[dict[str, Any]]:
    """Tables, schemas or data-only: one transaction in the target database."""
    req, selected = job.req, job.selected
    created = False
    if not job.exists:
        with connect(conn) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(job.target_db)))
        created = True
    preamble = ""
    if not req.data_only:
        # pg_restore -n restores objects in a schema, not the schema itself
        preamble = "".join(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {};").format(sql.Identifier(s)).as_string(None)
            for s in sorted({s for s, _ in selected} | set(req.schemas))
        )
    if req.data_only and req.drop_existing and selected:
        preamble = (
            sql.SQL("TRUNCATE {};")
            .format(sql.SQL(", ").join(sql.Identifier(s, t) for s, t in selected))
            .as_string(None)
        )
    try:
        started = time.monotonic()
        args = _restore_args(req, selected, clean=bool(job.conflicts) and not req.data_only)
        _load(job, conn, repo, enc, job.target_db, args, preamble, progress)
        phases["one_transaction_s"] = round(time.monotonic() - started, 3)
    except BaseException:
        if created:
            with contextlib.suppress(Exception):
                pg_swap.drop_database(conn, job.target_db)
        raise
    if req.schema_only:
        return []
    started = time.monotonic()
    checks = _compare_rows(conn, job.target_db, job.entry, selected)
    phases["row_counts_s"] = round(time.monotonic() - started, 3)
    return checks


def plan_restore(
    conn: PostgresConnection, repo: Repository, req: PgRestoreRequest
) -> dict[str, Any]:
    """The plan of ``req`` (what would be restored, replaced or refused); changes nothing
    and needs no decryption key."""
    register(*conn.secrets())
    return {**_plan(conn, repo, req)[0], "dry_run": True}


def restore_postgres(
    conn: PostgresConnection,
    repo: Repository,
    enc: EncryptionConfig,
    req: PgRestoreRequest,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Restore per ``req``; returns the plan (dry run) or the report with row checks."""
    register(*conn.secrets(), *enc.secrets())
    plan, job = _plan(conn, repo, req)
    if req.dry_run:
        return {**plan, "dry_run": True}
    started = time.monotonic()
    restore = _restore_whole if job.whole else _restore_selective
    phases: dict[str, float] = {}
    checks = restore(job, conn, repo, enc, progress, phases)
    report = {
        **plan,
        "dry_run": False,
        "duration_s": round(time.monotonic() - started, 3),
        "phases_s": phases,
        "restored_at": dt.datetime.now(dt.UTC).isoformat(),
        "row_checks": checks,
        "rows_ok": all(c["ok"] for c in checks),
    }
    if not report["rows_ok"]:
        bad = [c for c in checks if not c["ok"]]
        raise IntegrityError(f"restored row counts differ from the manifest: {bad[:5]}")
    return report
