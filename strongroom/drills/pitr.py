"""PITR drills: recover a PostgreSQL target to a point in time in a throwaway cluster.

A logical drill (core.run_drill) proves a dump restores; a PITR drill proves the base
backups and the WAL archive together reach a point, the promise point-in-time recovery
makes. It

1. notes the reference point on the source (when given a connection): its next
   transaction id and, with ``track_commit_timestamp``, its last commit time;
2. runs ``pitr_restore`` (plan, base backup, WAL replay through ``strongroom-wal
   fetch``) into a new private data directory, starts the cluster on a free port and
   waits for recovery to reach the point (``latest``, a time or an LSN): that whole
   restore is the measured **RTO**;
3. checks the copy: recovery stopped at (not after) a time target, every database
   answers, and an optional verification query gives the expected output;
4. measures the **RPO** as the commits the copy lacks against the reference: 0 when
   the copy holds every transaction the source had assigned when the drill started;
   else the time from the copy's last replayed commit to the reference (the source's
   last commit with commit timestamps, the drill's start without; a time target is
   its own reference);
5. always stops the cluster and removes the directory, and stores a signed drill
   record (``drills/postgresql/<target>/<id>.json``, ``kind: pitr``) that the
   compliance audit's drill control reads like any other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.drills.core import DRILL_FORMAT, Objectives, finish_drill
from strongroom.errors import IntegrityError, InvalidInput, StrongroomError
from strongroom.ids import check_name, new_backup_id
from strongroom.redact import scrub
from strongroom.repository.base import Repository

# The source's side of the RPO: next xid (every transaction assigned before is older)
# and, where commit timestamps are tracked, the time of its last commit.
SOURCE_SQL = """
SELECT json_build_object(
  'at', now(),
  'next_xid', pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
  'lsn', pg_current_wal_lsn()::text,
  'last_commit_at', CASE WHEN current_setting('track_commit_timestamp') = 'on'
                         THEN (SELECT timestamp FROM pg_last_committed_xact()) END)
"""
# The copy's side, after promotion (pg_last_xact_replay_timestamp stays at the last
# commit replayed; NULL when recovery replayed none).
RECOVERED_SQL = """
SELECT json_build_object(
  'next_xid', pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
  'last_xact_at', pg_last_xact_replay_timestamp(),
  'databases', (SELECT json_agg(datname ORDER BY datname) FROM pg_database
                WHERE datallowconn AND NOT datistemplate))
"""


def _parse_time(text: Any) -> dt.datetime | None:
    if not text:
        return None
    value = dt.datetime.fromisoformat(str(text))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def source_reference(source: PostgresConnection) -> dict[str, Any]:
    """The source's next xid, LSN and (with commit timestamps) last commit, now."""
    from strongroom.engines.postgres.pg_bin import pg_tool
    from strongroom.engines.postgres.psql import open_session

    with open_session(pg_tool("psql"), source, source.maintenance_db) as session:
        answer: dict[str, Any] = session.query(SOURCE_SQL, "the PITR drill's reference point")
    return answer


def measure_rpo(
    reference: dict[str, Any] | None,
    recovered: dict[str, Any],
    *,
    started: dt.datetime,
    target_time: dt.datetime | None,
) -> dict[str, Any]:
    """The RPO figures (module docstring, step 4): ``rpo_s``, ``lost_xids``, ``basis``."""
    last = _parse_time(recovered.get("last_xact_at"))
    if target_time is not None:
        if last is None:
            return {"rpo_s": None, "lost_xids": None, "basis": "no commit replayed"}
        gap = max(0.0, (target_time - last).total_seconds())
        return {"rpo_s": round(gap, 3), "lost_xids": None, "basis": "target time"}
    if reference is None:
        if last is None:
            return {"rpo_s": None, "lost_xids": None, "basis": "no reference, no commit"}
        age = (started - last).total_seconds()
        return {"rpo_s": round(max(0.0, age), 3), "lost_xids": None, "basis": "drill start"}
    lost = max(0, int(reference["next_xid"]) - int(recovered["next_xid"]))
    if lost == 0:
        return {"rpo_s": 0.0, "lost_xids": 0, "basis": "every assigned transaction recovered"}
    source_last = _parse_time(reference.get("last_commit_at"))
    basis = "source's last commit" if source_last else "drill start"
    upto = source_last or _parse_time(reference.get("at")) or started
    behind = (upto - last).total_seconds() if last else None
    return {
        "rpo_s": round(max(0.0, behind), 3) if behind is not None else None,
        "lost_xids": lost,
        "basis": basis,
    }


def _checks(
    recovered: dict[str, Any],
    answers: dict[str, str],
    target_time: dt.datetime | None,
    verify: tuple[str, str | None, str] | None,
    verified: str | None,
) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    last = _parse_time(recovered.get("last_xact_at"))
    if target_time is not None:
        ok = last is None or last <= target_time
        checks.append(
            {
                "item": "recovery target",
                "check": "stopped at the target time",
                "expected": target_time.isoformat(),
                "restored": last.isoformat() if last else None,
                "ok": ok,
                **({} if ok else {"detail": "a commit after the target time was replayed"}),
            }
        )
    for name, answer in answers.items():
        checks.append(
            {
                "item": name,
                "check": "database answers",
                "restored": answer,
                "ok": answer.isdigit(),
                **({} if answer.isdigit() else {"detail": f"{name}: {answer[:200]}"}),
            }
        )
    if verify is not None:
        _query, expect, database = verify
        ok = expect is None or (verified or "").strip() == expect.strip()
        checks.append(
            {
                "item": database,
                "check": "verification query",
                "expected": expect,
                "restored": (verified or "")[:500],
                "ok": ok,
                **({} if ok else {"detail": f"verification query returned {verified!r}"}),
            }
        )
    return checks


def run_pitr_drill(
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    target: str,
    recovery_target: str = "latest",
    target_time: dt.datetime | None = None,
    target_lsn: str | None = None,
    source: PostgresConnection | None = None,
    objectives: Objectives | None = None,
    verify_query: str | None = None,
    verify_expect: str | None = None,
    verify_database: str = "postgres",
    work_dir: str | None = None,
    os_user: str | None = None,
    wait_timeout_s: float = 1800.0,
    store: bool = True,
    check: bool = True,
    now: Callable[[], dt.datetime] | None = None,
) -> dict[str, Any]:
    """One PITR drill (module docstring); returns the drill record."""
    from strongroom.engines.postgres import root_fs as fs
    from strongroom.engines.postgres.pitr.plan import PitrRequest
    from strongroom.engines.postgres.pitr.restore import pitr_restore
    from strongroom.engines.postgres.pitr.server import RestoredServer, resolve_os_user
    from strongroom.sandbox.ports import free_port

    clock = now or (lambda: dt.datetime.now(dt.UTC))
    check_name(target, "target name")
    if recovery_target not in ("latest", "time", "lsn"):
        raise InvalidInput(f"a PITR drill goes to latest, a time or an LSN: {recovery_target!r}")
    if (recovery_target == "time") != (target_time is not None) or (recovery_target == "lsn") != (
        target_lsn is not None
    ):
        raise InvalidInput("a PITR drill to a time needs target_time, to an LSN target_lsn (only)")
    if store:
        repo.trust.require_signer("a drill record")
    objectives = objectives or Objectives()
    did = new_backup_id()
    port = free_port()
    request = PitrRequest(  # validated before anything happens (bad input: exit 2)
        target=target,
        data_dir="/nonexistent/validate-only",
        recovery_target=recovery_target,
        target_time=target_time,
        target_lsn=target_lsn,
        action="promote",
        start=True,
        port=port,
        wait_timeout_s=wait_timeout_s,
        os_user=os_user,
    )
    started = clock()
    record: dict[str, Any] = {
        "format_version": DRILL_FORMAT,
        "drill_id": did,
        "engine": "postgresql",
        "kind": "pitr",
        "target": target,
        "requested_backup": "auto",
        "recovery": {
            "target": recovery_target,
            "time": target_time.isoformat() if target_time else None,
            "lsn": target_lsn,
        },
        "started_at": started.isoformat(),
        "objectives": {
            "rto_s": objectives.rto_minutes * 60 if objectives.rto_minutes else None,
            "rpo_s": objectives.rpo_hours * 3600 if objectives.rpo_hours else None,
        },
    }
    failures: list[str] = []
    checks: list[dict[str, Any]] = []
    rto_s: float | None = None
    phase = "reference"
    root = Path(tempfile.mkdtemp(prefix="strongroom-drill-pitr-", dir=work_dir))
    data_dir = root / "data"
    server: RestoredServer | None = None
    try:
        reference = source_reference(source) if source is not None else None
        record["reference"] = reference
        user = resolve_os_user(root, os_user)
        owner = fs.owner_of(user)
        if owner is not None:  # root: the restored cluster runs as (and owns) this user
            os.chown(root, *owner)
        request = request.model_copy(
            update={"data_dir": str(data_dir), "socket_dir": str(root), "os_user": user}
        )
        phase = "restore"
        t0 = time.monotonic()
        server = RestoredServer(data_dir, port, root, root / "unused.log", user)
        try:
            report = pitr_restore(repo, repo_config, enc, request)
        finally:
            rto_s = round(time.monotonic() - t0, 3)
        recovery = report.get("recovery") or {}
        # the server's socket is in a private folder pitr_restore made under ``root``
        server.socket_dir = Path(recovery.get("socket_dir") or root)
        plan = report.get("plan") or {}
        backup = plan.get("backup") or {}
        record.update(
            backup_id=backup.get("backup_id"),
            backup_kind=backup.get("kind"),
            backup_finished_at=backup.get("finished_at"),
            scratch={"mode": "pitr-sandbox", "server": f"127.0.0.1:{port}"},
            restore={
                "seconds": report.get("seconds"),
                "recovery_seconds": recovery.get("seconds"),
                "timeline": recovery.get("timeline"),
                "replay_lsn": recovery.get("replay_lsn"),
                "stopped_at": recovery.get("stopped_at"),
            },
        )
        phase = "compare"
        with _admitted(server, data_dir, request.db_user, owner):
            recovered = json.loads(server.psql(RECOVERED_SQL))
            record["recovered"] = recovered
            answers = {}
            for name in recovered.get("databases") or []:
                try:
                    answers[name] = server.psql("SELECT count(*) FROM pg_class", database=name)
                except StrongroomError as exc:
                    answers[name] = scrub(str(exc))
            verified = None
            if verify_query:
                verified = server.psql(verify_query, database=verify_database)
        verify = (verify_query, verify_expect, verify_database) if verify_query else None
        checks = _checks(recovered, answers, target_time, verify, verified)
        record["rpo"] = measure_rpo(reference, recovered, started=started, target_time=target_time)
    except StrongroomError as exc:
        failures.append(f"{phase} failed: {scrub(str(exc))}")
        if isinstance(exc, IntegrityError):
            record["data_mismatch"] = True
    except Exception as exc:
        failures.append(f"{phase} failed: {type(exc).__name__}: {scrub(str(exc))}")
    finally:
        record["cleanup"] = _cleanup(server, root)
        if not record["cleanup"]["ok"]:
            failures.append(f"cleanup failed: {record['cleanup'].get('error')}")
    record["rto_s"] = rto_s
    record["rpo_s"] = (record.get("rpo") or {}).get("rpo_s")
    record["restored"] = "recovered" in record
    return finish_drill(
        record,
        checks,
        failures,
        repo,
        store=store,
        check=check,
        clock=clock,
        label="PITR drill",
        rpo_decimals=3,
    )


@contextlib.contextmanager
def _admitted(server: Any, data_dir: Path, db_user: str, owner: Any) -> Iterator[None]:
    """strongroom's temporary pg_hba.conf rule (pitr.hba) while the drill checks the
    copy: the restored cluster keeps the source's rules, which may want passwords."""
    from strongroom.engines.postgres import root_fs as fs
    from strongroom.engines.postgres.pitr.hba import admit, withdraw

    data_fd = fs.open_dir(data_dir)
    try:
        rule = admit(data_fd, db_user, owner)
        server.reload()
        try:
            yield
        finally:
            withdraw(data_fd, rule, owner)
    finally:
        os.close(data_fd)


def _cleanup(server: Any, root: Path) -> dict[str, Any]:
    """Stop the throwaway cluster and remove its directory; never raises."""
    try:
        if server is not None and server.running():
            server.stop("immediate")
        shutil.rmtree(root)
        return {"ok": True, "removed": str(root)}
    except Exception as exc:
        return {"ok": False, "error": scrub(f"{type(exc).__name__}: {exc}")}
