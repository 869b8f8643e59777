"""Restore drills: restore a backup into a scratch target, prove it, time it, clean up.

A drill

1. resolves the backup (``latest`` by default) of ``engine/target``;
2. prepares a scratch target (adapter: a throwaway database on a scratch
   server, or a scratch server it starts itself);
3. restores into it, timing the restore: that duration is the measured **RTO**;
4. optionally runs a hook on the scratch copy (tests use it to tamper);
5. compares the scratch copy with the manifest (row counts / key counts /
   fingerprints) and, where configured, with the live source;
6. always cleans the scratch target up;
7. measures **RPO** as the age of the restored data (drill start minus the
   backup's ``finished_at``), checks both against the objectives, and stores a
   drill record at ``drills/<engine>/<target>/<drill_id>.json`` (also for a
   failed drill: a failure is evidence too);
8. raises ``DrillFailed`` if anything failed (unless ``check=False``).

Drill records are signed (``strongroom.signing``): a drill runs on a runner with the
repository block (and its signing key) of the backups it drills, so a drill that is to
store its record refuses to start without a trusted signer. ``list_drills`` skips
records not signed by a trusted key (reporting them in ``findings``); ``load_drill``
refuses them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from strongroom.catalog import Catalog, Manifest
from strongroom.errors import IntegrityError, StrongroomError
from strongroom.ids import check_engine, check_name, new_backup_id, record_key_parts, scope_prefix
from strongroom.redact import scrub
from strongroom.repository.base import Repository
from strongroom.signing import get_verified_json, put_signed_json

log = logging.getLogger(__name__)

DRILL_FORMAT = 1


class DrillFailed(StrongroomError):
    """A drill ran and failed (data differs, restore failed, or an objective was missed).

    ``record`` is the stored drill record. Exit code 4 when data did not match, else 1.
    """

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record
        self.exit_code = IntegrityError.exit_code if record.get("data_mismatch") else 1


class EngineNotAvailable(StrongroomError):
    """This installation has no restore engine for the requested database kind."""

    exit_code = 2


class Objectives(BaseModel):
    """Recovery objectives of a target; None means "not set, not checked"."""

    rto_minutes: float | None = Field(default=None, gt=0)
    rpo_hours: float | None = Field(default=None, gt=0)


class ScratchAdapter(Protocol):
    """What an engine provides to drill its backups."""

    engine: str

    def prepare(self, manifest: Manifest) -> None:
        """Create or start the scratch target (not part of the RTO)."""

    def restore(self, manifest: Manifest) -> dict[str, Any]:
        """Restore the backup into the scratch target (timed: the RTO)."""

    def handle(self) -> Any:
        """What a hook receives to reach the scratch copy."""

    def compare(self, manifest: Manifest) -> list[dict[str, Any]]:
        """Checks of the scratch copy, each a dict with at least ``item`` and ``ok``."""

    def describe(self) -> dict[str, Any]:
        """Where the scratch copy lives (no secrets)."""

    def cleanup(self) -> dict[str, Any]:
        """Remove the scratch target; never raises; returns what was done (``ok``)."""


DrillHook = Callable[[Any], None]

# How a drill treats the live source: not compared, compared and reported, or a
# difference fails the check (only for a source that does not change).
LiveMode = Literal["off", "report", "strict"]


def live_verdict(check: dict[str, Any], mode: LiveMode, same: bool, detail: str) -> None:
    """Record on ``check`` whether the restored copy matches the live source; in
    ``strict`` mode a difference fails the check (``detail`` says how, unless the check
    already failed for another reason)."""
    check["live_match"] = same
    if mode == "strict" and not same:
        check["ok"] = False
        check.setdefault("detail", detail)


def drill_key(engine: str, target: str, drill_id: str) -> str:
    return f"drills/{check_engine(engine)}/{check_name(target, 'target name')}/{drill_id}.json"


def _seconds(td: dt.timedelta) -> float:
    return round(td.total_seconds(), 3)


def run_drill(
    adapter: ScratchAdapter,
    repo: Repository,
    *,
    target: str,
    backup_id: str = "latest",
    objectives: Objectives | None = None,
    hook: DrillHook | None = None,
    store: bool = True,
    check: bool = True,
    drill_id: str | None = None,
    now: Callable[[], dt.datetime] | None = None,
) -> dict[str, Any]:
    """Run one drill (see the module docstring); returns the drill record."""
    clock = now or (lambda: dt.datetime.now(dt.UTC))
    engine = check_engine(adapter.engine)
    check_name(target, "target name")
    if store:  # the record is evidence: no point drilling if it cannot be signed
        repo.trust.require_signer("a drill record")
    objectives = objectives or Objectives()
    did = drill_id or new_backup_id()
    started = clock()
    record: dict[str, Any] = {
        "format_version": DRILL_FORMAT,
        "drill_id": did,
        "engine": engine,
        "target": target,
        "requested_backup": backup_id,
        "started_at": started.isoformat(),
        "objectives": {
            "rto_s": objectives.rto_minutes * 60 if objectives.rto_minutes else None,
            "rpo_s": objectives.rpo_hours * 3600 if objectives.rpo_hours else None,
        },
    }
    failures: list[str] = []
    checks: list[dict[str, Any]] = []
    manifest: Manifest | None = None
    phase = "resolve"
    rto_s: float | None = None
    restored = False
    try:
        # PostgreSQL drills restore logical dumps (base backups are for PITR)
        kind = "logical" if engine == "postgresql" else None
        manifest = Catalog(repo).resolve(backup_id, engine, target, kind=kind)
        record.update(
            {
                "backup_id": manifest.backup_id,
                "backup_kind": manifest.kind,
                "backup_started_at": manifest.started_at.isoformat(),
                "backup_finished_at": manifest.finished_at.isoformat(),
                "backup_stored_size": manifest.stored_size,
                "backup_raw_size": manifest.raw_size,
            }
        )
        phase = "prepare"
        t0 = time.monotonic()
        adapter.prepare(manifest)
        record["prepare_s"] = round(time.monotonic() - t0, 3)
        record["scratch"] = adapter.describe()
        phase = "restore"
        t0 = time.monotonic()
        try:
            record["restore"] = adapter.restore(manifest)
            restored = True
        finally:
            rto_s = round(time.monotonic() - t0, 3)
        if hook is not None:
            phase = "hook"
            hook(adapter.handle())
        phase = "compare"
        checks = adapter.compare(manifest)
    except StrongroomError as exc:
        failures.append(f"{phase} failed: {scrub(str(exc))}")
        if isinstance(exc, IntegrityError):
            record["data_mismatch"] = True
    except Exception as exc:
        failures.append(f"{phase} failed: {type(exc).__name__}: {scrub(str(exc))}")
    finally:
        if manifest is not None:
            record.setdefault("scratch", adapter.describe())
            try:
                record["cleanup"] = adapter.cleanup()
            except Exception as exc:  # adapters should not raise here; record if they do
                record["cleanup"] = {"ok": False, "error": scrub(str(exc))}
            if not record["cleanup"].get("ok", False):
                failures.append(f"cleanup failed: {record['cleanup'].get('error', 'see cleanup')}")
    record["rto_s"] = rto_s
    record["restored"] = restored
    record["rpo_s"] = _seconds(started - manifest.finished_at) if manifest is not None else None
    return finish_drill(record, checks, failures, repo, store=store, check=check, clock=clock)


def finish_drill(
    record: dict[str, Any],
    checks: list[dict[str, Any]],
    failures: list[str],
    repo: Repository,
    *,
    store: bool,
    check: bool,
    clock: Callable[[], dt.datetime],
    label: str = "drill",
    rpo_decimals: int = 0,
) -> dict[str, Any]:
    """The end every drill shares (logical and PITR): failed checks, RTO and RPO
    (``record["rto_s"]``, ``record["rpo_s"]``) against the objectives, the verdict,
    the signed record stored, ``DrillFailed`` raised when ``check`` and it failed."""
    engine, target, did = record["engine"], record["target"], record["drill_id"]
    record["checks"] = checks
    bad = [c for c in checks if not c.get("ok")]
    if bad:
        record["data_mismatch"] = True
        shown = "; ".join(str(c.get("detail") or c.get("item")) for c in bad[:5])
        failures.append(f"restored data differs: {len(bad)} check(s) failed: {shown}")
    rto_s, rpo_s = record["rto_s"], record["rpo_s"]
    rto_obj, rpo_obj = record["objectives"]["rto_s"], record["objectives"]["rpo_s"]
    if rto_obj is not None and rto_s is not None and rto_s > rto_obj:
        failures.append(f"RTO {rto_s:.3f} s exceeds the objective {rto_obj:g} s")
    if rpo_obj is not None and rpo_s is not None and rpo_s > rpo_obj:
        failures.append(f"RPO {rpo_s:.{rpo_decimals}f} s exceeds the objective {rpo_obj:g} s")
    record["rto_ok"] = None if rto_obj is None or rto_s is None else rto_s <= rto_obj
    record["rpo_ok"] = None if rpo_obj is None or rpo_s is None else rpo_s <= rpo_obj
    record["finished_at"] = clock().isoformat()
    record["failures"] = failures
    record["ok"] = not failures
    record["data_mismatch"] = bool(record.get("data_mismatch"))
    if store:
        key = drill_key(engine, target, did)
        put_signed_json(repo, key, json.loads(json.dumps(record, default=str)))
        record["record_key"] = key
    log.info(
        "%s %s of %s/%s: %s (RTO %s s, RPO %s s)",
        label,
        did,
        engine,
        target,
        "ok" if record["ok"] else "FAILED",
        rto_s,
        rpo_s,
    )
    if check and failures:
        raise DrillFailed(f"{label} {did} of {engine}/{target} failed: {failures[0]}", record)
    return record


def list_drills(
    repo: Repository,
    engine: str | None = None,
    target: str | None = None,
    *,
    findings: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Drill records, oldest first, as summary rows (for ``strongroom list --drills``).
    Records not signed by a trusted key, or unreadable, are skipped (and appended to
    ``findings`` when given: ``key``, ``error``).

    Each row: drill_id, engine, target, backup_id, started_at, ok, rto_s,
    rto_objective_s, rpo_s, rpo_objective_s, failures, record_key.
    """
    prefix = scope_prefix("drills", engine, target)
    rows: list[dict[str, Any]] = []
    for info in repo.list(prefix):
        parts = record_key_parts(info.key, target)
        if parts is None:
            continue
        try:
            r, verdict = get_verified_json(repo, info.key, strict=False)
        except StrongroomError as exc:
            if findings is not None:
                findings.append({"key": info.key, "status": "unreadable", "error": str(exc)})
            continue
        if not verdict.trusted:
            log.warning("%s", verdict.message("drill record"))
            if findings is not None:
                findings.append(verdict.finding())
            continue
        objectives = r.get("objectives") or {}
        rows.append(
            {
                "drill_id": r.get("drill_id", parts[3][: -len(".json")]),
                "engine": r.get("engine", parts[1]),
                "target": r.get("target", parts[2]),
                "backup_id": r.get("backup_id"),
                "started_at": r.get("started_at"),
                "ok": bool(r.get("ok")),
                "rto_s": r.get("rto_s"),
                "rto_objective_s": objectives.get("rto_s"),
                "rpo_s": r.get("rpo_s"),
                "rpo_objective_s": objectives.get("rpo_s"),
                "failures": r.get("failures", []),
                "record_key": info.key,
            }
        )
    return sorted(rows, key=lambda row: (str(row["drill_id"]), row["engine"], row["target"]))


def load_drill(repo: Repository, engine: str, target: str, drill_id: str) -> dict[str, Any]:
    """One drill record; ``IntegrityError`` unless it is signed by a trusted key."""
    key = drill_key(engine, target, drill_id)
    data, verdict = get_verified_json(repo, key, strict=False)
    verdict.require("drill record")
    return data
