"""ClickHouse restore: everything, databases, tables (globs) or partitions; schema-only,
data-only, into a renamed database; verified by server-side fingerprints.

Nothing half-done: ClickHouse keeps the blocks of an INSERT that was cut off
(measured on 18.16), so data is never streamed into a table that matters.
Every table's data is first loaded into a scratch table
(``__sr_restore_<run>_<n>``), ``jobs`` artifacts at a time (``parallel``), and its
fingerprint (per partition) compared with the manifest. Only when every scratch
table of the run matches are they swapped in (whole tables by ``EXCHANGE TABLES`` in
Atomic databases of 26.x, by two ``RENAME TABLE`` on 18.16: see ``swap``; ``ALTER
TABLE ... REPLACE PARTITION ... FROM`` for partitions and, in Atomic databases, for a
materialized view's ``.inner_id.<uuid>`` table, which a rename would detach from its
view), views created, and the final tables checked again (rows in place, or the
fingerprint with ``recheck``: ``restore_checks``). Replaced tables and partitions are
kept aside until then, so a failure at any step undoes the swaps and the target is as
it was.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Catalog, Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse import inspection as inspect
from strongroom.engines.clickhouse import restore_checks as checks
from strongroom.engines.clickhouse.backup import ENGINE
from strongroom.engines.clickhouse.capabilities import INNER_ID_PREFIX, capabilities
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.parallel import Staged, StopAware, default_jobs, load_all
from strongroom.engines.clickhouse.plan import (
    ChRestoreRequest,
    Selection,
    check_target_support,
    load_schemas,
    missing_artifacts,
    plan_actions,
    read_target,
    select,
)
from strongroom.engines.clickhouse.sql import qualified, quote_ident, quote_string, rewrite_create
from strongroom.engines.clickhouse.swap import ASIDE_PREFIX, SwapState
from strongroom.engines.clickhouse.table_engines import check_objects
from strongroom.errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    NotFound,
    StrongroomError,
    TargetNotEmpty,
)
from strongroom.pipeline import Progress
from strongroom.redact import register, scrub
from strongroom.repository.base import Repository

ProgressFactory = Callable[[str, int | None], Progress]
log = logging.getLogger(__name__)

SCRATCH_PREFIX = "__sr_restore_"

__all__ = ["ChRestoreRequest", "restore_clickhouse"]


class _Run(SwapState):
    """One restore's staging, commit and undo."""

    def __init__(
        self,
        client: ClickHouseHTTP,
        repo: Repository,
        enc: EncryptionConfig,
        manifest: Manifest,
        sel: Selection,
        docs: dict[str, dict[str, Any]],
        actions: list[dict[str, Any]],
        progress: ProgressFactory | None,
        jobs: int,
        recheck: bool = False,
    ) -> None:
        super().__init__(client)
        self.repo = repo
        self.enc = enc
        self.manifest = manifest
        self.sel = sel
        self.docs = docs
        self.actions = actions
        self.progress = progress
        self.entries = {(e["database"], e["name"]): e for e in sel.objects}
        self.created_dbs: list[str] = []
        self.checks: list[dict[str, Any]] = []
        self.jobs = jobs
        self.recheck = recheck
        # artifact name -> (target database, staging table, target shown in messages)
        self.destination: dict[str, tuple[str, str, str]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def create_statement(self, act: dict[str, Any], name: str, inner: bool = False) -> str:
        doc = self.docs[act["database"]]["objects"][act["table"]]
        return rewrite_create(
            doc["inner_create"] if inner else doc["create"],
            database=act["target_database"],
            name=name,
            rename_databases=self.sel.rename,
        )

    # -- phase 0: databases ----------------------------------------------------------------

    def create_databases(self, existing: set[str], *, empty_too: bool) -> None:
        """Create missing target databases that receive objects (or, for a whole-database
        restore, that were empty in the backup)."""
        for db in self.sel.databases:
            tdb = self.sel.target_db(db["name"])
            if tdb in existing or tdb in self.created_dbs:
                continue
            used = any(a["target_database"] == tdb and a["action"] != "skip" for a in self.actions)
            if not used and not (empty_too and not db.get("tables")):
                continue
            stmt = rewrite_create(self.docs[db["name"]]["create_database"], database=tdb, name=tdb)
            self.ddl(stmt, f"creating database {tdb!r}")
            self.created_dbs.append(tdb)

    # -- phase 1: stage and check ----------------------------------------------------------

    def stage(self) -> None:
        """Create every staging table, then load them ``jobs`` artifacts at a time
        (``parallel``), each table checked as soon as its data is in."""
        capabilities(self.client)  # read once, before the loads share the client
        staged = [
            self._stage_one(index, act)
            for index, act in enumerate(self.actions)
            if act["data"] and act["action"] != "skip"
        ]
        load_all(staged, self.jobs, self._load)

    def _stage_one(self, index: int, act: dict[str, Any]) -> Staged:
        entry = self.entries[(act["database"], act["table"])]
        tdb = act["target_database"]
        scratch = self.name(SCRATCH_PREFIX)
        data_table = act.get("data_target") or entry["data_table"]
        target_exists = act["exists"] and act["action"] in ("load", "replace partitions")
        if target_exists:
            stmt = f"CREATE TABLE {qualified(tdb, scratch)} AS {qualified(tdb, data_table)}"
        else:
            stmt = self.create_statement(act, scratch, inner=entry["kind"] == "materialized_view")
        self.ddl(stmt, f"creating scratch table for {act['target']}")
        self.scratch[index] = scratch
        if inspect.merge_sensitive(entry["data_engine"]):
            self.stop_merges(tdb, scratch)
        artifacts = []
        for name in act["artifacts"]:
            artifact = self.manifest.artifact(name)
            self.destination[artifact.name] = (tdb, scratch, act["target"])
            artifacts.append(artifact)
        return Staged(
            artifacts=artifacts,
            check=lambda: self.check(act, entry, tdb, scratch, stage="scratch"),
        )

    def _load(self, artifact: Any, stop: threading.Event) -> None:
        """Stream one verified artifact into its staging table (runs in a pool thread)."""
        if artifact.raw_size == 0:
            return
        tdb, table, shown = self.destination[artifact.name]
        what = f"loading {artifact.name} into {shown}"
        insert = self.client.insert_stream(
            f"INSERT INTO {qualified(tdb, table)} FORMAT Native",
            artifact.raw_size,
            settings={"max_execution_time": 0, **capabilities(self.client).insert_settings},
            what=what,
        )
        try:
            read_artifact(
                self.repo,
                artifact,
                StopAware(insert, stop),
                encryption=self.enc,
                progress=self.progress(artifact.name, artifact.raw_size) if self.progress else None,
            )
            insert.finish()
        except BaseException:
            insert.abort()  # the server keeps blocks it already parsed: scratch only
            raise

    def check(
        self, act: dict[str, Any], entry: dict[str, Any], tdb: str, table: str, *, stage: str
    ) -> None:
        """``scratch``: the content fingerprint; ``final``: rows in place, or the
        fingerprint again with ``recheck`` (``restore_checks``)."""
        want = checks.expected(entry, act["partitions"])
        if stage == "scratch" or self.recheck:
            found = checks.content(self.client, entry, tdb, table)
        else:
            found = checks.placed(self.client, entry, tdb, table)
        if act["partitions"]:
            found = {k: v for k, v in found.items() if k in act["partitions"]}
        problems = checks.diff(want, found)
        self.checks.append(
            {
                "table": act["target"],
                "stage": stage,
                "check": "fingerprint" if stage == "scratch" or self.recheck else "rows",
                "partitions": ", ".join(act["partitions"]) or "all",
                "expected_rows": sum(e["rows"] for e in want.values()),
                "actual_rows": sum(a["rows"] for a in found.values()),
                "ok": not problems,
            }
        )
        if problems:
            raise IntegrityError(
                f"restored data of {act['target']} differs from backup "
                f"{self.manifest.backup_id}: {'; '.join(problems[:5])}"
            )

    # -- phase 2: commit -------------------------------------------------------------------

    def commit(self) -> None:
        """Tables first (and their final checks), then views: replacing a materialized
        view cannot be undone, so it happens only once every table is in place and checked."""
        for phase in ("tables", "views"):
            done = []
            for index, act in enumerate(self.actions):
                if act["action"] in ("skip", "keep") or (act["kind"] == "table") != (
                    phase == "tables"
                ):
                    continue
                if act["action"] == "load":
                    self._load_in(index, act)
                elif act["action"] == "replace partitions":
                    self._swap_partitions(index, act, act["partitions"])
                    act["swap"] = "replace partitions"
                elif act["kind"] == "table":
                    self._put_table(index, act)
                else:
                    self._put_view(index, act)
                done.append(act)
            for act in done:
                if act["data"]:
                    entry = self.entries[(act["database"], act["table"])]
                    final = entry_target(act, entry)
                    self.check(act, entry, act["target_database"], final, stage="final")

    def _put_table(self, index: int, act: dict[str, Any]) -> None:
        tdb, name = act["target_database"], act["table"]
        if index in self.scratch:
            act["swap"] = self.move_in(index, tdb, name, existed=act["exists"])
            return
        if act["exists"]:
            self.put_aside(tdb, name)
        self.ddl(self.create_statement(act, name), f"creating {tdb}.{name}")
        self.undo.append((f"removing {tdb}.{name}", f"DROP TABLE IF EXISTS {qualified(tdb, name)}"))

    def _load_in(self, index: int, act: dict[str, Any]) -> None:
        """Data-only restore: the checked scratch table replaces the target's data."""
        entry = self.entries[(act["database"], act["table"])]
        tdb = act["target_database"]
        final = act.get("data_target") or entry["data_table"]
        if final.startswith(INNER_ID_PREFIX):
            self._fill_inner(index, act, final)
        else:
            act["swap"] = self.move_in(index, tdb, final, existed=True)

    def _pids(self, tdb: str, table: str) -> set[str]:
        return {p["partition_id"] for p in inspect.active_parts(self.client, tdb, table)}

    def _fill_inner(self, index: int, act: dict[str, Any], inner: str) -> None:
        """A materialized view in an Atomic database stops working when a table is renamed
        over its inner table: every partition is replaced in place instead (the target's
        partitions the backup lacks are dropped)."""
        tdb = act["target_database"]
        pids = sorted(self._pids(tdb, inner) | self._pids(tdb, self.scratch[index]))
        self._swap_partitions(index, act, pids, table=inner)
        act["data_target"] = inner
        act["swap"] = "replace partitions"

    def _swap_partitions(
        self, index: int, act: dict[str, Any], pids: list[str], *, table: str | None = None
    ) -> None:
        """Replace partitions ``pids`` of the target with the scratch table's. Only
        partitions the target holds are kept aside (26.x refuses ``REPLACE PARTITION``
        from a table that lacks the partition); the others are undone by dropping them."""
        tdb = act["target_database"]
        name = table or act.get("data_target") or act["table"]
        target = qualified(tdb, name)
        scratch = qualified(tdb, self.scratch[index])
        held = self._pids(tdb, name)
        fresh = self._pids(tdb, self.scratch[index])
        holder = self.name(ASIDE_PREFIX)
        self.ddl(f"CREATE TABLE {qualified(tdb, holder)} AS {target}", "creating partition holder")
        self.aside.append((tdb, holder))
        entry = self.entries[(act["database"], act["table"])]
        if inspect.merge_sensitive(entry["data_engine"]):
            self.stop_merges(tdb, name)
        for pid in pids:
            part = f"PARTITION ID {quote_string(pid)}"
            if pid in held:
                self.ddl(
                    f"ALTER TABLE {qualified(tdb, holder)} REPLACE {part} FROM {target}",
                    f"keeping partition {pid} of {tdb}.{name}",
                )
                back = f"ALTER TABLE {target} REPLACE {part} FROM {qualified(tdb, holder)}"
            else:
                back = f"ALTER TABLE {target} DROP {part}"
            self.undo.append((f"putting partition {pid} of {tdb}.{name} back", back))
            if pid in fresh:
                self.ddl(
                    f"ALTER TABLE {target} REPLACE {part} FROM {scratch}",
                    f"replacing partition {pid} of {tdb}.{name}",
                )
            elif pid in held:
                self.ddl(
                    f"ALTER TABLE {target} DROP {part}", f"emptying partition {pid} of {tdb}.{name}"
                )

    def _put_view(self, index: int, act: dict[str, Any]) -> None:
        tdb, name = act["target_database"], act["table"]
        # a dictionary is dropped with DROP DICTIONARY (26.x refuses DROP TABLE on one)
        drop = "DROP DICTIONARY" if act["kind"] == "dictionary" else "DROP TABLE"
        if act["exists"]:
            if act["kind"] == "view":
                self.put_aside(tdb, name)
            else:
                # 18.16 cannot rename a materialized view ("Method rename is not supported
                # by storage MaterializedView"): it is dropped and re-created, which cannot be
                # undone, so it happens after every table is swapped in and checked. So is
                # a dictionary (no data of its own: it is reloaded from its source).
                self.ddl(f"{drop} {qualified(tdb, name)}", f"dropping {tdb}.{name}")
        self.ddl(self.create_statement(act, name), f"creating {tdb}.{name}")
        self.undo.append((f"removing {tdb}.{name}", f"{drop} IF EXISTS {qualified(tdb, name)}"))
        if index in self.scratch:
            inner = inspect.inner_table(self.client, tdb, name)
            if inner is None:
                raise IntegrityError(f"{tdb}.{name} was created without an inner table")
            if inner.startswith(INNER_ID_PREFIX):
                self._fill_inner(index, act, inner)
            else:
                # Ordinary database (18.16): the view's new, empty inner table goes aside;
                # the checked data takes its name
                act["swap"] = self.move_in(index, tdb, inner, existed=True)
                act["data_target"] = inner

    def reload_dictionaries(self) -> dict[str, str]:
        """Load every restored dictionary from its (restored) source now, so the first
        ``dictGet`` does not pay for it and a source that cannot be read shows up in the
        report. A failure is reported, not raised: the restore itself is complete."""
        out: dict[str, str] = {}
        for act in self.actions:
            # kept ones too: their source table may just have been replaced
            if act["kind"] != "dictionary" or act["action"] == "skip":
                continue
            tdb, name = act["target_database"], act["table"]
            try:
                self.ddl(
                    f"SYSTEM RELOAD DICTIONARY {qualified(tdb, name)}",
                    f"reloading dictionary {tdb}.{name}",
                )
                out[act["target"]] = "reloaded"
            except StrongroomError as exc:
                out[act["target"]] = f"reload failed: {scrub(str(exc))[:300]}"
                log.warning("dictionary %s: %s", act["target"], out[act["target"]])
        return out

    # -- cleanup ---------------------------------------------------------------------------

    def drop_quietly(self, tdb: str, table: str) -> None:
        try:
            self.ddl(f"DROP TABLE IF EXISTS {qualified(tdb, table)}", f"dropping {tdb}.{table}")
        except StrongroomError as exc:
            self.leftovers.append(f"{tdb}.{table} ({scrub(str(exc))[:200]})")

    def finish(self) -> None:
        self.start_merges()
        for index, scratch in self.scratch.items():  # partitions were copied out of these
            self.drop_quietly(self.actions[index]["target_database"], scratch)
        self.scratch.clear()
        for tdb, table in self.aside:
            self.drop_quietly(tdb, table)
        self.aside.clear()

    def rollback(self) -> None:
        self.start_merges()
        for description, sql in reversed(self.undo):
            try:
                self.ddl(sql, description)
            except StrongroomError as exc:
                self.leftovers.append(f"undo failed: {description} ({scrub(str(exc))[:200]})")
        self.undo.clear()
        for index, scratch in list(self.scratch.items()):
            tdb = self.actions[index]["target_database"]
            self.drop_quietly(tdb, scratch)
        self.scratch.clear()
        for tdb, table in self.aside:
            if not self.leftovers:  # only tables no undo still needs
                self.drop_quietly(tdb, table)
        for tdb in reversed(self.created_dbs):
            try:
                self.ddl(f"DROP DATABASE IF EXISTS {quote_ident(tdb)}", f"dropping {tdb!r}")
            except StrongroomError as exc:
                self.leftovers.append(f"database {tdb} ({scrub(str(exc))[:200]})")


def entry_target(act: dict[str, Any], entry: dict[str, Any]) -> str:
    """The table that holds the object's data on the target after the restore."""
    if entry["kind"] != "materialized_view":
        return str(act["table"])
    return str(act.get("data_target") or entry["data_table"])


def _raise_if_blocked(actions: list[dict[str, Any]]) -> None:
    blocked = [a for a in actions if a.get("blocked")]
    if not blocked:
        return
    reasons = "; ".join(a["blocked"] for a in blocked[:10])
    kinds = {a["blocked_kind"] for a in blocked}
    if "unsupported" in kinds or "dependency" in kinds:
        raise InvalidInput(f"cannot restore: {reasons}")
    if "schema" in kinds:
        raise Conflict(f"refusing to restore: {reasons}; pass drop_existing to replace")
    raise TargetNotEmpty(f"refusing to overwrite: {reasons}; pass drop_existing to replace")


def restore_clickhouse(
    conn: ClickHouseConnection,
    repo: Repository,
    enc: EncryptionConfig,
    req: ChRestoreRequest,
    *,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Restore per ``req``; returns the plan (dry run) or the report with fingerprint checks."""
    register(*conn.secrets(), *enc.secrets())
    manifest = Catalog(repo).resolve(req.backup_id, ENGINE, req.source_target or conn.name)
    if manifest.kind == "native":  # the server's BACKUP: RESTORE ... FROM S3 (native_restore)
        from strongroom.engines.clickhouse.native_restore import restore_native

        return restore_native(conn, repo, enc, manifest, req)
    sel = select(manifest, req)
    client = ClickHouseHTTP(conn)
    docs = load_schemas(repo, manifest, enc, sel.databases)
    engines = check_objects(docs, sel.objects, req.allow_engines)  # before anything changes
    check_target_support(client, sel, docs)
    state = read_target(client, sorted({sel.target_db(d["name"]) for d in sel.databases}))
    actions = plan_actions(client, manifest, req, sel, docs, state)
    mode = (
        "partitions"
        if req.partitions
        else "data only"
        if req.data_only
        else "schema only"
        if req.schema_only
        else "full"
    )
    plan: dict[str, Any] = {
        "backup_id": manifest.backup_id,
        "backup_finished_at": manifest.finished_at.isoformat(),
        "source_target": manifest.target,
        "target_server": conn.describe(),
        "mode": mode,
        "databases": {d["name"]: sel.target_db(d["name"]) for d in sel.databases},
        "actions": actions,
        "tables": [a["target"] for a in actions if a["action"] != "skip"],
        "raw_size": sum(a["raw_size"] for a in actions),
        "rows": sum(a["rows"] for a in actions),
        "drop_existing": req.drop_existing,
        "jobs": req.jobs or default_jobs(),  # tables/partitions loaded at once
        "engines": engines,
        "would_replace": [a["target"] for a in actions if a["action"] in ("replace", "load")]
        + [
            f"{a['target']}:{p}"
            for a in actions
            if a["action"] == "replace partitions"
            for p in a.get("replaces", [])
        ],
    }
    stale = sorted(
        f"{db}.{name}"
        for db, name in state.tables
        if name.startswith((SCRATCH_PREFIX, ASIDE_PREFIX))
    )
    plan["stale_scratch"] = stale
    if stale:
        # left by an interrupted (killed) restore: never dropped automatically, another
        # restore may still be using them
        plan["warnings"] = [
            f"scratch tables of an interrupted earlier restore: {', '.join(stale[:10])}; "
            "drop them once no restore of this target runs"
        ]
        log.warning("%s", plan["warnings"][0])
    blocked = [a["blocked"] for a in actions if a.get("blocked")]
    gone = missing_artifacts(repo, manifest, actions)
    if gone:
        blocked.append(gone)
    if req.dry_run:
        plan["dry_run"] = True
        if blocked:
            plan["blocked"] = "; ".join(blocked)
        return plan
    _raise_if_blocked(actions)
    if gone:
        raise NotFound(gone)

    started = time.monotonic()
    run = _Run(client, repo, enc, manifest, sel, docs, actions, progress, plan["jobs"], req.recheck)
    try:
        run.create_databases(
            state.databases, empty_too=not (req.tables or req.data_only or req.partitions)
        )
        run.stage()
        run.commit()
    except BaseException as exc:
        run.rollback()
        if run.leftovers and isinstance(exc, StrongroomError):
            raise type(exc)(
                f"{exc} (rolled back; could not clean up: {'; '.join(run.leftovers[:5])})"
            ) from None
        raise
    run.finish()
    dictionaries = run.reload_dictionaries()
    return {
        **plan,
        "dry_run": False,
        "duration_s": round(time.monotonic() - started, 3),
        "restored_at": dt.datetime.now(dt.UTC).isoformat(),
        # staging checks first (they ran in parallel, in no fixed order), then the final ones
        "checks": sorted(run.checks, key=lambda c: c["stage"] != "scratch"),
        # how each table's data was put in place: exchange | rename | replace partitions
        "swaps": {a["target"]: a["swap"] for a in actions if "swap" in a},
        "fingerprints_ok": all(c["ok"] for c in run.checks),
        "leftovers": run.leftovers,
        "dictionaries": dictionaries,  # target -> reloaded | reload failed: why
    }
