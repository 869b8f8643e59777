"""WAL retention for PITR targets: keep the WAL every retained base backup needs.

Layout: ``wal/<target>/<timeline>/<segment>``. A segment's name is
``TTTTTTTTXXXXXXXXYYYYYYYY`` (timeline, then the log/segment position), possibly
followed by a suffix (``.partial``, ``.00000028.backup``, a compression or
encryption extension). Positions are comparable across timelines (the LSN
space continues through a promotion), and within one timeline folder names
sort lexically in position order.

Rule: find the oldest start position among the retained base backups of the
target; every segment (on any timeline) whose position is before it is not
needed to restore any retained base backup (nor any point after it) and goes.
Timeline history files (``0000000N.history``) are always kept: they are tiny
and recovery follows them. Without any retained base backup nothing is dropped.

Only what the target owns is ever deleted: objects named exactly
``wal/<target>/<timeline>/<WAL file name>`` (the folder matching the name's timeline);
anything else under ``wal/`` is reported, never deleted. Base backups hold WAL by the
target their manifest is listed under, never by a field inside it. A base backup
retention does not trust can only hold more WAL (its start lowers the cut), never let
WAL go: with no trusted base backup, nothing is dropped.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from strongroom.catalog import Manifest
from strongroom.engines.postgres.wal import names
from strongroom.ids import NAME_RE
from strongroom.policy.locks import ObjectStore
from strongroom.repository.base import Repository

SEGMENT_RE = re.compile(r"^(?P<tli>[0-9A-Fa-f]{8})(?P<log>[0-9A-Fa-f]{8})(?P<seg>[0-9A-Fa-f]{8})")
HISTORY_RE = re.compile(r"^[0-9A-Fa-f]{8}\.history")
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_LOG_BYTES = 0x1_0000_0000

# Manifest ``details`` fields that name the first WAL segment a base backup needs, in the
# order they are tried (``start_wal`` is what strongroom.engines.postgres.pitr.basebackup writes);
# failing those, ``start_lsn`` + ``timeline`` (+ ``wal_segment_size``). A base backup's
# WAL lives under ``wal/<details.wal_target or target>/``.
START_SEGMENT_FIELDS = (
    "start_wal",
    "start_wal_segment",
    "start_segment",
    "wal_start_segment",
    "start_wal_file",
)


def segment_position(name: str) -> tuple[int, int] | None:
    """(log, seg) of a segment name (None if not a segment): sorts in WAL order, and
    compares across timelines."""
    match = SEGMENT_RE.match(name)
    if not match:
        return None
    return int(match["log"], 16), int(match["seg"], 16)


def parse_lsn(lsn: str) -> int:
    hi, lo = lsn.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_segment(lsn: str, timeline: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The name of the WAL segment that holds ``lsn`` on ``timeline``."""
    value = parse_lsn(lsn)
    per_log = _LOG_BYTES // segment_size
    segno = value // segment_size
    return f"{timeline:08X}{segno // per_log:08X}{segno % per_log:08X}"


def _as_timeline(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value:
        try:
            return int(value, 16) if len(value) == 8 else int(value)
        except ValueError:
            return None
    return None


def base_start_segment(manifest: Manifest) -> str | None:
    """The first WAL segment a base backup needs, from its manifest ``details``."""
    details = manifest.details
    for name in START_SEGMENT_FIELDS:
        value = details.get(name)
        if isinstance(value, str) and SEGMENT_RE.match(value):
            return value[:24].upper()
    wal = details.get("wal")
    if isinstance(wal, dict):
        for name in (*START_SEGMENT_FIELDS, "start_segment", "first_segment"):
            value = wal.get(name)
            if isinstance(value, str) and SEGMENT_RE.match(value):
                return value[:24].upper()
    lsn = details.get("start_lsn") or (wal.get("start_lsn") if isinstance(wal, dict) else None)
    timeline = _as_timeline(
        details.get("timeline", details.get("start_timeline", details.get("start_tli")))
    )
    if isinstance(lsn, str) and timeline is not None:
        size = int(details.get("wal_segment_size") or DEFAULT_SEGMENT_SIZE)
        return lsn_segment(lsn, timeline, size)
    return None


@dataclass
class WalReport:
    target: str
    oldest_needed: str | None = None
    needed_by: str | None = None
    deleted: list[str] = field(default_factory=list)
    would_delete: list[str] = field(default_factory=list)
    locked: list[dict[str, str]] = field(default_factory=list)
    kept: int = 0
    bytes_freed: int = 0
    note: str = ""
    errors: list[str] = field(default_factory=list)
    unknown_bases: list[str] = field(default_factory=list)
    # (key, why) of objects under wal/<target>/ that are not WAL files strongroom wrote
    strays: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        gone = self.deleted or self.would_delete
        return {
            "target": self.target,
            "oldest_needed": self.oldest_needed,
            "needed_by": self.needed_by,
            "deleted": len(self.deleted),
            "would_delete": len(self.would_delete),
            "first_deleted": gone[0] if gone else None,
            "last_deleted": gone[-1] if gone else None,
            "locked": self.locked,
            "kept": self.kept,
            "bytes_freed": self.bytes_freed,
            "note": self.note,
            "errors": self.errors,
            "bases_without_start": self.unknown_bases,
            "not_wal_files": len(self.strays),
        }


def wal_targets(repo: Repository) -> list[str]:
    """Targets with a WAL folder under a name strongroom writes."""
    keys = (info.key for info in repo.list("wal/"))
    found = {key.split("/")[1] for key in keys if key.count("/") >= 3}
    return sorted(t for t in found if NAME_RE.fullmatch(t))


def owned_wal_name(key: str, target: str) -> str | None:
    """The WAL file name of ``key`` if it is exactly ``wal/<target>/<tli>/<name>`` with a
    WAL file name whose timeline is ``<tli>``; None otherwise."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "wal" or parts[1] != target:
        return None
    try:
        names.kind(parts[3])
    except names.WalNameError:
        return None
    return parts[3] if parts[2] == parts[3][:8] else None


def prune_wal(
    repo: Repository,
    store: ObjectStore,
    target: str,
    retained_bases: list[Manifest],
    *,
    dry_run: bool,
    now: dt.datetime,
    untrusted_bases: list[Manifest] | None = None,
) -> WalReport:
    """Drop the WAL of ``target`` older than the oldest retained base backup's start.
    ``untrusted_bases`` (listed but not trusted) only ever keep more."""
    report = WalReport(target=target)
    starts: list[tuple[tuple[int, int], str, str]] = []
    held: list[tuple[tuple[int, int], str, str]] = []
    for manifest, into in (
        *((m, starts) for m in retained_bases),
        *((m, held) for m in untrusted_bases or []),
    ):
        segment = base_start_segment(manifest)
        pos = segment_position(segment) if segment else None
        if segment is None or pos is None:
            report.unknown_bases.append(manifest.backup_id)
            continue
        into.append((pos, segment, manifest.backup_id))
    cut: tuple[int, int] | None = None
    if report.unknown_bases:
        report.note = (
            "base backup(s) without a start WAL position in their manifest: "
            "no WAL dropped (cannot tell what they need)"
        )
    elif not starts:
        report.note = "no retained base backup: no WAL dropped"
    else:
        cut, report.oldest_needed, report.needed_by = min([*starts, *held])
    # listed even when nothing can go: what is not a WAL file of this target is reported
    for info in repo.list(f"wal/{target}/"):
        name = owned_wal_name(info.key, target)
        if name is None:
            report.strays.append((info.key[:300], "not a WAL file strongroom archives: kept"))
            report.kept += 1
            continue
        pos = segment_position(name)
        if cut is None or HISTORY_RE.match(name) or pos is None or pos >= cut:
            report.kept += 1
            continue
        lock = store.lock(info.key) if store.supports_locks else None
        if lock is not None and lock.active(now):
            report.locked.append({"key": info.key, "locked": lock.describe()})
            report.kept += 1
            continue
        if dry_run:
            report.would_delete.append(info.key)
            report.bytes_freed += info.size
            continue
        try:
            store.remove(info.key)
        except Exception as exc:
            report.errors.append(f"{info.key}: {exc}")
            continue
        report.deleted.append(info.key)
        report.bytes_freed += info.size
    return report
