"""Named restore points: ``pg_create_restore_point`` plus a record in the repository.

The record (``pitr/<target>/restore_points/<name>.json``, never overwritten)
keeps the restore point's LSN, timeline and time, so a PITR restore to a name
can choose its base backup and check the recoverable window like an LSN target.
The WAL segment holding the restore point is switched out and waited for, so
the name is restorable once this returns.

A PITR restore decides on this record (which base backup, which LSN), so it is signed
(``strongroom.signing``) and read strictly: a record not signed by a trusted key is an
``IntegrityError`` naming it, never a restore target.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from strongroom.config import PostgresConnection
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.pitr.basebackup import wait_for_wal
from strongroom.engines.postgres.wal import names
from strongroom.errors import Conflict, IntegrityError, InvalidInput, NotFound, ServiceUnavailable
from strongroom.ids import check_name
from strongroom.repository.base import Repository
from strongroom.signing import get_verified_json, put_signed_json

MAX_WAIT_S = 86400.0


def point_key(target: str, name: str) -> str:
    return f"pitr/{target}/restore_points/{name}.json"


def check_wait(wait_s: float) -> float:
    """A finite number of seconds, 0 to a day (NaN or infinity would wait forever)."""
    if (
        isinstance(wait_s, bool)
        or not isinstance(wait_s, int | float)
        or not math.isfinite(wait_s)
        or not 0 <= wait_s <= MAX_WAIT_S
    ):
        raise InvalidInput(f"wait_s must be a number of seconds from 0 to {MAX_WAIT_S:.0f}")
    return float(wait_s)


def create_restore_point(
    conn: PostgresConnection,
    repo: Repository,
    name: str,
    *,
    wait_s: float = 120.0,
) -> dict[str, Any]:
    """Create restore point ``name`` on ``conn``'s cluster and record it. The name and
    the wait are checked before anything is asked of the server."""
    check_name(name, "restore point name")
    wait_s = check_wait(wait_s)
    repo.trust.require_signer(f"restore point {name!r}")
    key = point_key(conn.name, name)
    if repo.exists(key):
        raise Conflict(f"restore point {name!r} already exists for target {conn.name}")
    with connect(conn) as c:
        row = c.execute(
            "SELECT pg_create_restore_point(%s)::text, now(),"
            " (SELECT timeline_id FROM pg_control_checkpoint()),"
            " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),"
            " (SELECT system_identifier FROM pg_control_system())",
            (name,),
        ).fetchone()
        assert row is not None
        lsn_text, created, tli, size, sysid = row
        c.execute("SELECT pg_switch_wal()")
        # the checkpoint's timeline can lag a promotion; the current WAL file tells the truth
        walrow = c.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    if walrow is not None:
        tli = names.timeline_of(str(walrow[0]))
    lsn = names.parse_lsn(lsn_text)
    segment = names.segment_of_lsn(int(tli), lsn, int(size))
    missing = wait_for_wal(repo, conn.name, [segment], timeout_s=wait_s)
    record = {
        "name": name,
        "target": conn.name,
        "lsn": names.format_lsn(lsn),
        "timeline": int(tli),
        "time": created.astimezone(dt.UTC).isoformat(),
        "segment": segment,
        "system_identifier": int(sysid),
        "archived": not missing,
    }
    put_signed_json(repo, key, record, overwrite=False)
    if missing:
        raise ServiceUnavailable(
            f"restore point {name!r} created at {record['lsn']}, but its WAL segment "
            f"{segment} is not archived after {wait_s:.0f} s; check archive_command"
        )
    return record


def load_restore_point(repo: Repository, target: str, name: str) -> dict[str, Any] | None:
    try:
        check_name(name, "restore point name")
    except InvalidInput:
        return None
    try:
        record = _record(repo, point_key(target, name))
    except NotFound:
        return None
    del record["_lsn"]
    return record


def _record(repo: Repository, key: str) -> dict[str, Any]:
    """One stored restore point record, signed by a trusted key (else ``IntegrityError``
    naming it); a malformed one is named, not a raw error."""
    record, verdict = get_verified_json(repo, key, strict=False)
    verdict.require("restore point record")
    try:
        record["_lsn"] = names.parse_lsn(str(record["lsn"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise IntegrityError(f"restore point record {key} is malformed: {exc}") from None
    return record


def list_restore_points(
    repo: Repository, target: str, *, findings: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Restore points of ``target`` by LSN. A record that is untrusted or malformed is an
    ``IntegrityError``, or, when ``findings`` is given (a listing), skipped and reported
    there (``key``, ``error``)."""
    found = []
    for info in repo.list(f"pitr/{target}/restore_points/"):
        if not info.key.endswith(".json"):
            continue
        try:
            found.append(_record(repo, info.key))
        except (IntegrityError, NotFound) as exc:
            if findings is None:
                raise
            findings.append({"key": info.key, "error": str(exc)})
    found.sort(key=lambda r: int(r["_lsn"]))
    for record in found:
        del record["_lsn"]
    return found
