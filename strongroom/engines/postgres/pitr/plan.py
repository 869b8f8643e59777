"""Planning a point-in-time recovery: validate the target, pick the timeline and the
base backup, and refuse targets outside the recoverable window (saying what the
window is). Nothing is changed here.

``PitrRequest`` is where operator and flow input enters: anything malformed (a time
that is not one, a time out of range, an LSN, xid, timeline or restore-point name
PostgreSQL would not accept, a NUL byte anywhere) raises ``InvalidInput`` when the
request is built, never a raw ``ValidationError``/``ValueError``/``OverflowError``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from strongroom.catalog import Catalog, Manifest
from strongroom.engines.postgres.pitr.basebackup import base_backups
from strongroom.engines.postgres.pitr.points import load_restore_point
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.check import ArchiveIndex, Interval, Reach, load_index, windows
from strongroom.errors import InvalidInput, NotFound, invalid_input
from strongroom.ids import check_backup_id, check_name
from strongroom.repository.base import Repository

TargetKind = Literal["latest", "immediate", "time", "lsn", "xid", "name"]
MAX_XID = 2**64 - 1  # recovery_target_xid is read as an unsigned 64-bit number
MAX_TIMELINE = 2**32 - 1
NAME_BYTES = 63  # MAXFNAMELEN - 1: recovery_target_name's limit


class PitrRequest(BaseModel):
    """A point-in-time recovery into an empty data directory."""

    target: str = Field(description="the source target whose backups and WAL archive to use")
    data_dir: str = Field(description="empty (or absent) directory to restore into")
    backup_id: str = Field(default="auto", description="'auto' picks the right base backup")
    recovery_target: TargetKind = "latest"
    target_time: dt.datetime | None = None
    target_lsn: str | None = None
    target_xid: int | None = Field(default=None, ge=3, le=MAX_XID)
    target_name: str | None = None
    inclusive: bool = Field(default=True, description="stop just after (True) or before")
    target_timeline: str = Field(default="latest", description="'latest', 'current' or a number")
    action: Literal["promote", "pause", "shutdown"] = "promote"
    start: bool = Field(default=False, description="start the server and wait for the target")
    delta: bool = Field(
        default=False,
        description="files backups: refresh a stale copy of the cluster in data_dir, "
        "fetching only what differs (an empty or absent data_dir is restored as usual)",
    )
    jobs: int = Field(default=1, ge=1, le=64, description="files backups: files written at once")
    port: int | None = Field(default=None, ge=1, le=65535)
    socket_dir: str | None = Field(
        default=None,
        description="Unix socket directory (default: a new temp dir, kept while it runs)",
    )
    wait_timeout_s: float = Field(default=1800.0, gt=0, allow_inf_nan=False)
    verify_query: str | None = Field(default=None, description="SQL run after recovery")
    verify_database: str = "postgres"
    verify_expect: str | None = Field(default=None, description="expected verify_query output")
    db_user: str = "postgres"
    os_user: str | None = Field(
        default=None, description="OS user owning the data dir (default: its owner / postgres)"
    )
    archive_after: str | None = Field(
        default=None,
        description="target to archive the restored cluster's new timeline into; "
        "None turns archiving off (it must not write into the source's archive by accident)",
    )
    wal_command: str | None = Field(
        default=None, description="command prefix for strongroom-wal (default: found on PATH)"
    )
    config_path: str | None = Field(
        default=None, description="where the restored cluster's WAL config goes"
    )
    prefetch: int = Field(default=8, ge=0, le=256)
    dry_run: bool = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_input(exc, "PITR request") from None

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and "\x00" in value:
            raise InvalidInput(f"{info.field_name} contains a NUL byte")
        return value

    @field_validator("target")
    @classmethod
    def _target_ok(cls, value: str) -> str:
        return check_name(value, "target name")

    @field_validator("data_dir")
    @classmethod
    def _data_dir_ok(cls, value: str) -> str:
        if not value.strip():
            raise InvalidInput("data_dir is empty")
        return value

    @field_validator("target_time")
    @classmethod
    def _time_ok(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is not None:
            try:
                value.astimezone(dt.UTC)
            except (OverflowError, ValueError):
                raise InvalidInput("target_time is out of range once converted to UTC") from None
        return value

    @field_validator("archive_after")
    @classmethod
    def _archive_ok(cls, value: str | None) -> str | None:
        return check_name(value, "archive_after target name") if value else value

    @field_validator("target_timeline")
    @classmethod
    def _timeline_ok(cls, value: str) -> str:
        if value not in ("latest", "current") and not (
            value.isascii()
            and value.isdigit()
            and len(value) <= 10
            and 1 <= int(value) <= MAX_TIMELINE
        ):
            raise InvalidInput(
                "target_timeline must be 'latest', 'current' or a timeline number "
                f"(1 to {MAX_TIMELINE})"
            )
        return value

    def check_target(self) -> None:
        need = {"time": self.target_time, "lsn": self.target_lsn, "xid": self.target_xid}
        need["name"] = self.target_name
        if self.recovery_target in need and need[self.recovery_target] is None:
            raise InvalidInput(
                f"recovery_target {self.recovery_target!r} needs target_{self.recovery_target}"
            )
        if self.target_lsn is not None:
            try:
                names.parse_lsn(self.target_lsn)
            except names.WalNameError as exc:
                raise InvalidInput(str(exc)) from None
        if self.target_name is not None and (
            not self.target_name
            or len(self.target_name.encode()) > NAME_BYTES
            or "'" in self.target_name
            or any(ord(c) < 32 or ord(c) == 127 for c in self.target_name)
        ):
            raise InvalidInput(
                f"target_name: 1 to {NAME_BYTES} bytes, no quotes or control characters"
            )
        if (
            self.recovery_target == "time"
            and self.target_time is not None
            and self.target_time.tzinfo is None
        ):
            raise InvalidInput("target_time needs a time zone (e.g. ...+00:00 or Z)")
        if self.backup_id != "auto":
            check_backup_id(self.backup_id)
        if self.start and self.port is None:
            raise InvalidInput("start needs a port for the restored server")

    def target_time_utc(self) -> dt.datetime:
        assert self.target_time is not None
        return self.target_time.astimezone(dt.UTC)


class Plan(BaseModel):
    """The recovery that will run."""

    backup: dict[str, Any]
    timeline: int
    recovery_settings: dict[str, str]
    window: list[dict[str, Any]]
    target_lsn: str | None = None
    notes: list[str] = Field(default_factory=list)


def _window_text(spans: list[Interval]) -> str:
    if not spans:
        return "nothing is restorable"
    return "; ".join(s.describe() for s in spans)


def _resolve_timeline(req: PitrRequest, index: ArchiveIndex) -> int | None:
    if req.target_timeline == "latest":
        return index.newest_timeline()
    if req.target_timeline == "current":
        return None  # the chosen backup's own timeline
    tli = int(req.target_timeline)
    if tli not in index.timelines():
        raise InvalidInput(
            f"timeline {tli} is not in the archive of {req.target}; it has {index.timelines()}"
        )
    return tli


def _settings(req: PitrRequest, timeline: int) -> dict[str, str]:
    s: dict[str, str] = {}
    if req.recovery_target == "immediate":
        s["recovery_target"] = "immediate"
    elif req.recovery_target == "time":
        s["recovery_target_time"] = req.target_time_utc().isoformat(sep=" ")
    elif req.recovery_target == "lsn":
        s["recovery_target_lsn"] = str(req.target_lsn)
    elif req.recovery_target == "xid":
        s["recovery_target_xid"] = str(req.target_xid)
    elif req.recovery_target == "name":
        s["recovery_target_name"] = str(req.target_name)
    if req.recovery_target in ("time", "lsn", "xid"):
        s["recovery_target_inclusive"] = "on" if req.inclusive else "off"
    s["recovery_target_timeline"] = "current" if req.target_timeline == "current" else str(timeline)
    if req.recovery_target != "latest":
        s["recovery_target_action"] = req.action
    return s


def plan_pitr(repo: Repository, req: PitrRequest) -> Plan:
    """Choose the base backup and timeline for ``req``; refuse targets outside the window."""
    req.check_target()
    if req.backup_id != "auto":  # named: an untrusted one is refused by name, not skipped
        Catalog(repo).load("postgresql", req.target, req.backup_id)
    backups = base_backups(repo, req.target)
    if not backups:
        raise NotFound(f"no base backup of target {req.target} in {repo.describe()}")
    size = int(backups[-1].details["wal_segment_size"])
    index = load_index(repo, req.target, size)
    wanted_tli = _resolve_timeline(req, index)
    notes: list[str] = []

    if req.backup_id != "auto":
        chosen = [m for m in backups if m.backup_id == req.backup_id]
        if not chosen:
            raise NotFound(f"base backup {req.backup_id} of target {req.target} not found")
        backups = chosen
    tli = wanted_tli if wanted_tli is not None else int(backups[-1].details["timeline"])
    rows = windows(index, backups, tli)
    if wanted_tli is None and req.backup_id == "auto":
        rows = [r for r in rows if int(r[0].details["timeline"]) == tli]
    if not rows:
        raise InvalidInput(
            f"no base backup of {req.target} lies on timeline {tli}'s history "
            f"(backups are on timelines {sorted({m.details['timeline'] for m in backups})})"
        )
    usable = [(m, r, s) for m, r, s in rows if s is not None]
    spans = [s for _, _, s in usable]
    if not usable:
        gaps = [g for _, r, _ in rows for g in r.gaps]
        raise InvalidInput(
            f"no base backup of {req.target} has the WAL it needs to become consistent on "
            f"timeline {tli} (gaps: {gaps[:3]})"
        )

    def refuse(what: str) -> InvalidInput:
        return InvalidInput(
            f"{what} is outside the recoverable window of {req.target}: {_window_text(spans)}"
        )

    target_lsn: int | None = None
    pick: tuple[Manifest, Reach, Interval]
    if req.recovery_target == "name":
        point = load_restore_point(repo, req.target, str(req.target_name))
        if point is None:
            notes.append(
                f"restore point {req.target_name!r} was not created through strongroom: its "
                "position is unknown, so the earliest base backup is used and PostgreSQL "
                "decides whether it is reached"
            )
            pick = usable[0]
        else:
            target_lsn = names.parse_lsn(point["lsn"])
    if req.recovery_target == "lsn":
        target_lsn = names.parse_lsn(str(req.target_lsn))
    if target_lsn is not None:
        what = (
            f"restore point {req.target_name!r} (LSN {names.format_lsn(target_lsn)})"
            if req.recovery_target == "name"
            else f"LSN {names.format_lsn(target_lsn)}"
        )
        fits = [u for u in usable if u[2].earliest_lsn <= target_lsn <= u[2].latest_lsn]
        if not fits:
            raise refuse(what)
        pick = max(fits, key=lambda u: u[2].earliest_lsn)
    elif req.recovery_target == "time":
        moment = req.target_time_utc()
        fits = [u for u in usable if u[2].earliest_time <= moment <= u[2].latest_time]
        if not fits:
            raise refuse(f"time {moment.isoformat()}")
        pick = max(fits, key=lambda u: u[2].earliest_lsn)
    elif req.recovery_target == "xid":
        xid = int(req.target_xid or 0)
        fits = [u for u in usable if int(u[0].details.get("next_xid", 0)) <= xid]
        if not fits:
            first = min(int(u[0].details.get("next_xid", 0)) for u in usable)
            raise InvalidInput(
                f"transaction {xid} is outside the recoverable window of {req.target}: the "
                f"earliest base backup ends at next xid {first}, so only transactions from "
                f"{first} on can be targeted; window {_window_text(spans)}"
            )
        pick = max(fits, key=lambda u: u[2].earliest_lsn)
        notes.append("the xid's commit position is not known before replay; PostgreSQL checks it")
    elif req.recovery_target in ("latest", "immediate"):
        pick = max(usable, key=lambda u: u[2].earliest_lsn)
        if req.recovery_target == "latest" and pick[2].gaps_after:
            raise InvalidInput(
                f"'latest' cannot be reached for {req.target}: the archive has a gap after "
                f"{pick[2].latest_segment} ({pick[1].gaps[:2]}); recover to a target inside "
                f"the window: {_window_text(spans)}"
            )
    manifest = pick[0]
    return Plan(
        backup={
            "backup_id": manifest.backup_id,
            "kind": manifest.kind,
            "timeline": manifest.details["timeline"],
            "start_lsn": manifest.details["start_lsn"],
            "stop_lsn": manifest.details["stop_lsn"],
            "stop_time": manifest.details["stop_time"],
            "system_identifier": manifest.details["system_identifier"],
            "wal_segment_size": size,
            "raw_size": manifest.raw_size,
        },
        timeline=tli,
        recovery_settings=_settings(req, tli),
        window=[s.as_dict() for s in spans],
        target_lsn=names.format_lsn(target_lsn) if target_lsn is not None else None,
        notes=notes,
    )
