"""WAL continuity: what is archived per timeline, where the gaps are, and the
recoverable window of each base backup and of the target.

Works from the repository listing, the base backup manifests and the clear
header line of archived history files: no decryption key is needed, so an
auditor can run it.

PostgreSQL reads segment ``n`` of a recovery along timeline ``T`` from the
newest timeline in ``T``'s history whose first segment is at or before ``n``
(``XLogFileReadAnyTLI``); ``walk`` follows the same rule, so a gap is reported
exactly where a recovery would stop.

Only base backups signed by a trusted key count (``strongroom.signing``): a manifest a
bucket writer planted could otherwise claim a window the archive does not hold. The
manifests of the target that are not trusted are ignored, listed under ``untrusted``
and reported as a problem.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from strongroom.catalog import Manifest
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.store import archived_files, read_stored_header, wal_key
from strongroom.errors import IntegrityError, NotFound
from strongroom.repository.base import ObjectInfo, Repository
from strongroom.signing import Verdict


@dataclass
class ArchiveIndex:
    """The archived WAL of one target."""

    target: str
    segment_size: int
    segments: dict[int, dict[int, ObjectInfo]] = field(default_factory=dict)
    histories: dict[int, list[names.HistoryEntry]] = field(default_factory=dict)
    partials: dict[int, list[str]] = field(default_factory=dict)
    # partials whose segment is not archived: timeline -> segno -> (object, raw size)
    partial_ends: dict[int, dict[int, tuple[ObjectInfo, int]]] = field(default_factory=dict)
    backup_files: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def timelines(self) -> list[int]:
        return sorted(set(self.segments) | set(self.histories) | {1})

    def newest_timeline(self) -> int:
        return max(self.timelines())

    def path(self, tli: int) -> list[names.TimelineSpan]:
        return names.timeline_path(tli, self.histories.get(tli, []))

    def has(self, tli: int, segno: int) -> bool:
        return segno in self.segments.get(tli, {})

    def info(self, tli: int, segno: int) -> ObjectInfo:
        return self.segments[tli][segno]

    def partial(self, tli: int, segno: int) -> tuple[ObjectInfo, int] | None:
        """The archived partial of a segment that is not archived itself (a completed
        segment supersedes its partial), with its raw size."""
        return self.partial_ends.get(tli, {}).get(segno)


def load_index(
    repo: Repository, target: str, segment_size: int = names.DEFAULT_SEGMENT_SIZE
) -> ArchiveIndex:
    index = ArchiveIndex(target, segment_size)
    partial_infos: dict[str, ObjectInfo] = {}
    for info, name, kind in archived_files(repo, target):
        tli = names.timeline_of(name)
        if kind == "segment":
            index.segments.setdefault(tli, {})[names.segno_of(name, segment_size)] = info
        elif kind == "partial":
            index.partials.setdefault(tli, []).append(name)
            partial_infos[name] = info
        elif kind == "backup":
            index.backup_files.append(name)
        else:
            try:
                header = read_stored_header(repo, wal_key(target, name))
            except (IntegrityError, NotFound):
                index.unreadable.append(name)
                continue
            index.histories[tli] = header.history or []
    for tli, found in index.partials.items():
        for name in found:
            segno = names.segno_of(name, segment_size)
            if index.has(tli, segno):
                continue  # superseded by the completed segment
            try:
                header = read_stored_header(repo, wal_key(target, name))
            except (IntegrityError, NotFound):
                index.unreadable.append(name)
                continue
            index.partial_ends.setdefault(tli, {})[segno] = (partial_infos[name], header.raw_size)
    return index


def _ranges(tli: int, segnos: list[int], size: int) -> list[dict[str, Any]]:
    """Consecutive runs of segment numbers as {from, to, count} with names."""
    runs: list[dict[str, Any]] = []
    for n in sorted(segnos):
        if runs and runs[-1]["_last"] == n - 1:
            runs[-1]["_last"] = n
            runs[-1]["count"] += 1
        else:
            runs.append({"_first": n, "_last": n, "count": 1})
    return [
        {
            "timeline": tli,
            "from": names.segment_name(tli, r["_first"], size),
            "to": names.segment_name(tli, r["_last"], size),
            "count": r["count"],
        }
        for r in runs
    ]


def timeline_report(index: ArchiveIndex) -> list[dict[str, Any]]:
    size = index.segment_size
    report = []
    for tli in index.timelines():
        segs = index.segments.get(tli, {})
        history = index.histories.get(tli)
        entry: dict[str, Any] = {
            "timeline": tli,
            "parent": history[-1].parent if history else None,
            "switchpoint": names.format_lsn(history[-1].switchpoint) if history else None,
            "history_archived": tli == 1 or tli in index.histories,
            "segments": len(segs),
            "first": names.segment_name(tli, min(segs), size) if segs else None,
            "last": names.segment_name(tli, max(segs), size) if segs else None,
            "partial": sorted(index.partials.get(tli, [])),
        }
        if segs:
            lo, hi = min(segs), max(segs)
            entry["gaps"] = _ranges(tli, [n for n in range(lo, hi + 1) if n not in segs], size)
            entry["newest_archived_at"] = segs[hi].modified.isoformat()
        else:
            entry["gaps"] = []
        report.append(entry)
    return report


@dataclass
class Reach:
    """How far WAL replay from a base backup gets along one timeline path."""

    timeline: int  # the path followed
    start_segno: int
    stop_segno: int  # the backup is consistent once this segment is replayed
    consistent: bool
    end_tli: int | None  # where the contiguous WAL ends (None: not even the first segment)
    end_segno: int | None
    gaps: list[dict[str, Any]]
    partial_size: int | None = None  # the end segment is a partial of this many bytes

    def end_lsn(self, size: int) -> int | None:
        if self.end_segno is None:
            return None
        if self.partial_size is not None:
            return self.end_segno * size + self.partial_size
        return (self.end_segno + 1) * size


def on_path(details: dict[str, Any], path: list[names.TimelineSpan]) -> bool:
    """Whether a backup (its timeline and stop LSN) lies on a timeline path."""
    tli = int(details["timeline"])
    stop = names.parse_lsn(details["stop_lsn"])
    for span in path:
        if span.tli == tli:
            return span.end is None or stop <= span.end
    return False


def walk(index: ArchiveIndex, details: dict[str, Any], timeline: int) -> Reach:
    """Follow timeline ``timeline``'s path from a backup's start segment."""
    size = index.segment_size
    path = index.path(timeline)
    start = names.segno_of_lsn(names.parse_lsn(details["start_lsn"]), size)
    stop = names.segno_of_lsn(names.parse_lsn(details["stop_lsn"]) - 1, size)
    newest = start
    for span in path:  # a parent timeline counts only up to where the path leaves it
        limit = None if span.end is None else names.segno_of_lsn(span.end, size)
        held = [n for n in index.segments.get(span.tli, {}) if limit is None or n <= limit]
        newest = max([newest, *held])
    top = max(newest, start)
    end_tli: int | None = None
    end_segno: int | None = None
    partial_size: int | None = None
    contiguous = True
    missing: dict[int, list[int]] = {}
    for segno in range(start, top + 2):
        span = names.span_for_segno(path, segno, size)
        if segno <= top and index.has(span.tli, segno):
            if contiguous:
                end_tli, end_segno = span.tli, segno
            continue
        tail = index.partial(span.tli, segno)
        if contiguous and tail is not None and segno >= top:
            # the receiver's newest partial right after the last segment: not a gap
            end_tli, end_segno, partial_size = span.tli, segno, tail[1]
            break
        if segno <= top:
            contiguous = False
            missing.setdefault(span.tli, []).append(segno)
    gaps = [g for tli, segs in missing.items() for g in _ranges(tli, segs, size)]
    if partial_size is not None and end_segno is not None:
        # consistent only if the partial reaches the backup's stop LSN
        end = end_segno * size + partial_size
        consistent = end_segno > stop or (
            end_segno == stop and end >= names.parse_lsn(details["stop_lsn"])
        )
    else:
        consistent = end_segno is not None and end_segno >= stop
    return Reach(timeline, start, stop, consistent, end_tli, end_segno, gaps, partial_size)


@dataclass
class Interval:
    """A span that recovery can stop anywhere in: from a backup's consistency point to
    the end of the contiguous WAL after it."""

    backup_id: str
    timeline: int
    earliest_lsn: int
    earliest_time: dt.datetime
    latest_lsn: int
    latest_time: dt.datetime
    latest_segment: str
    gaps_after: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "timeline": self.timeline,
            "earliest": {
                "lsn": names.format_lsn(self.earliest_lsn),
                "time": self.earliest_time.isoformat(),
            },
            "latest": {
                "lsn": names.format_lsn(self.latest_lsn),
                "time": self.latest_time.isoformat(),
                "segment": self.latest_segment,
            },
            "gap_after": self.gaps_after,
        }

    def describe(self) -> str:
        return (
            f"timeline {self.timeline}: {self.earliest_time.isoformat()} "
            f"(LSN {names.format_lsn(self.earliest_lsn)}, backup {self.backup_id}) to "
            f"{self.latest_time.isoformat()} (LSN {names.format_lsn(self.latest_lsn)}, "
            f"segment {self.latest_segment}{', then a gap' if self.gaps_after else ''})"
        )


def interval(index: ArchiveIndex, manifest: Manifest, reach: Reach) -> Interval | None:
    if not reach.consistent or reach.end_segno is None or reach.end_tli is None:
        return None
    details = manifest.details
    size = index.segment_size
    segment = names.segment_name(reach.end_tli, reach.end_segno, size)
    tail = index.partial(reach.end_tli, reach.end_segno) if reach.partial_size is not None else None
    last = tail[0] if tail is not None else index.info(reach.end_tli, reach.end_segno)
    stop_time = dt.datetime.fromisoformat(details["stop_time"])
    end_lsn = reach.end_lsn(size)
    return Interval(
        backup_id=manifest.backup_id,
        timeline=reach.timeline,
        earliest_lsn=names.parse_lsn(details["stop_lsn"]),
        earliest_time=stop_time,
        latest_lsn=end_lsn if end_lsn is not None else (reach.end_segno + 1) * size,
        latest_time=max(last.modified, stop_time),
        latest_segment=names.partial_name(segment) if tail is not None else segment,
        gaps_after=bool(reach.gaps),
    )


def best_timeline(index: ArchiveIndex, details: dict[str, Any]) -> int:
    """The newest timeline whose path contains the backup."""
    for tli in sorted(index.timelines(), reverse=True):
        if on_path(details, index.path(tli)):
            return tli
    return int(details["timeline"])


def windows(
    index: ArchiveIndex, backups: list[Manifest], timeline: int
) -> list[tuple[Manifest, Reach, Interval | None]]:
    """For each backup on ``timeline``'s path: its reach and recoverable interval."""
    path = index.path(timeline)
    found = []
    for manifest in backups:
        if not on_path(manifest.details, path):
            continue
        reach = walk(index, manifest.details, timeline)
        found.append((manifest, reach, interval(index, manifest, reach)))
    return found


def _verdict(manifest: Manifest) -> Verdict | None:
    """The signature verdict recorded when ``manifest`` was loaded (None: not loaded from
    a repository)."""
    from strongroom.seal import origin_of

    origin = origin_of(manifest)
    return origin.verdict if origin is not None else None


def untrusted_manifests(repo: Repository, target: str) -> list[dict[str, Any]]:
    """The catalog entries of ``postgresql/<target>`` not trusted (``catalog_finding``)."""
    from strongroom.catalog import Catalog

    catalog = Catalog(repo)
    catalog.list("postgresql", target)
    return list(catalog.findings)


def wal_check(
    repo: Repository,
    target: str,
    backups: list[Manifest],
    untrusted: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The continuity report for ``target`` (JSON-ready). ``backups`` are trusted base
    backups; ``untrusted`` the target's catalog entries that were skipped (None: read
    them from the catalog here), reported and never used."""
    if untrusted is None:
        untrusted = untrusted_manifests(repo, target)
    # a caller handing over leniently loaded manifests: the untrusted ones are ignored too
    ignored = [v.finding() for m in backups if (v := _verdict(m)) is not None and not v.trusted]
    backups = [m for m in backups if (v := _verdict(m)) is None or v.trusted]
    known = {str(u["key"]) for u in untrusted}
    untrusted = [*untrusted, *(i for i in ignored if i["key"] not in known)]
    size = int(backups[-1].details.get("wal_segment_size", 0)) if backups else 0
    index = load_index(repo, target, size or names.DEFAULT_SEGMENT_SIZE)
    timelines = timeline_report(index)
    backup_rows = []
    all_gaps: list[dict[str, Any]] = []
    for manifest in backups:
        tli = best_timeline(index, manifest.details)
        reach = walk(index, manifest.details, tli)
        span = interval(index, manifest, reach)
        backup_rows.append(
            {
                "backup_id": manifest.backup_id,
                "timeline": manifest.details["timeline"],
                "start_wal": manifest.details["start_wal"],
                "start_lsn": manifest.details["start_lsn"],
                "stop_lsn": manifest.details["stop_lsn"],
                "stop_time": manifest.details["stop_time"],
                "follows_timeline": tli,
                "consistent": reach.consistent,
                "recoverable": span.as_dict() if span else None,
                "gaps": reach.gaps,
            }
        )
        for gap in reach.gaps:
            if gap not in all_gaps:
                all_gaps.append(gap)
    for row in timelines:
        for gap in row["gaps"]:
            if gap not in all_gaps:
                all_gaps.append(gap)
    newest = index.newest_timeline()
    spans = [s for _, _, s in windows(index, backups, newest) if s is not None]
    window = None
    if spans:
        window = {
            "timeline": newest,
            "earliest": min(spans, key=lambda s: s.earliest_lsn).as_dict()["earliest"],
            "latest": max(spans, key=lambda s: s.latest_lsn).as_dict()["latest"],
            "intervals": [s.as_dict() for s in spans],
        }
    problems = []
    if not backups:
        problems.append("no base backup")
    elif not any(r["consistent"] for r in backup_rows):
        problems.append("no base backup has the WAL it needs to become consistent")
    if all_gaps:
        problems.append(f"{sum(g['count'] for g in all_gaps)} missing segment(s)")
    missing_history = [t["timeline"] for t in timelines if not t["history_archived"]]
    if missing_history:
        problems.append(f"history file missing for timeline(s) {missing_history}")
    if index.unreadable:
        problems.append(f"unreadable history file(s) {index.unreadable}")
    if untrusted:
        shown = ", ".join(str(u["key"]) for u in untrusted[:3])
        more = f" and {len(untrusted) - 3} more" if len(untrusted) > 3 else ""
        problems.append(
            f"{len(untrusted)} manifest(s) not signed by a trusted key, ignored: {shown}{more}"
        )
    return {
        "target": target,
        "ok": not problems,
        "problems": problems,
        "segment_size": index.segment_size,
        "timelines": timelines,
        "gaps": all_gaps,
        "backups": backup_rows,
        "window": window,
        "untrusted": [
            {"key": u["key"], "status": u["status"], "error": u["error"]} for u in untrusted
        ],
        "checked_at": dt.datetime.now(dt.UTC).isoformat(),
    }
