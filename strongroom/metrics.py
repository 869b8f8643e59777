"""Prometheus exporter: backup, WAL and drill state of a repository, read at scrape time.

``strongroom metrics --port 9187`` serves ``/metrics`` on 127.0.0.1. Each scrape
reads the repository (catalog, audit trail, WAL listing, drill records, newest
compliance report), at most once per ``cache_seconds``: listing a large bucket
on every 15 s scrape would cost more than it tells.

Metrics (labels ``engine``, ``target``):

* ``strongroom_backup_last_success_timestamp_seconds``: newest backup's finish time
* ``strongroom_backup_last_size_bytes`` (stored) / ``..._last_raw_size_bytes`` (dump)
* ``strongroom_backup_last_duration_seconds``
* ``strongroom_backup_age_seconds``: now minus the newest backup's finish time
* ``strongroom_backups_in_catalog``: trusted backups only (signed by a trusted key)
* ``strongroom_untrusted_manifests``: catalog entries not counted as backups (not signed
  by a trusted key, malformed, misplaced: ``strongroom.signing``); labels empty when the
  key names no valid engine/target
* ``strongroom_backup_runs_total{result="success|failure"}``: backup runs recorded in
  the audit trail (successes fall back to the catalog count while the trail has no
  backup events for the target)
* ``strongroom_wal_last_archived_timestamp_seconds`` / ``strongroom_wal_archive_lag_seconds``
  (``target``): newest archived WAL segment and its age
* ``strongroom_wal_segments``
* ``strongroom_drill_rto_seconds`` / ``strongroom_drill_last_timestamp_seconds`` /
  ``strongroom_drill_last_success``: the newest restore drill
* ``strongroom_compliance_control_status{control, status}``: 1 for the newest
  report's status of each control
* ``strongroom_scrape_success`` / ``strongroom_scrape_duration_seconds``
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from strongroom.repository.base import Repository

log = logging.getLogger(__name__)

DEFAULT_PORT = 9187


@dataclass
class Snapshot:
    """Everything one scrape exports."""

    taken_at: float
    ok: bool = True
    error: str = ""
    duration_s: float = 0.0
    backups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    runs: dict[tuple[str, str, str], int] = field(default_factory=dict)
    wal: dict[str, dict[str, Any]] = field(default_factory=dict)
    drills: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    controls: dict[str, str] = field(default_factory=dict)
    untrusted: dict[tuple[str, str], int] = field(default_factory=dict)


def take_snapshot(repo: Repository, now: dt.datetime | None = None) -> Snapshot:
    """Read the repository once and compute every value."""
    from strongroom.audit import read_events
    from strongroom.compliance.evidence import REPORTS_PREFIX, Evidence

    started = time.monotonic()
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    snap = Snapshot(taken_at=moment.timestamp())
    ev = Evidence(repo, now=moment)
    for key, items in ev.manifests.items():
        last = items[-1]
        snap.backups[key] = {
            "finished": last.finished_at.timestamp(),
            "stored": last.stored_size,
            "raw": last.raw_size,
            "duration": last.duration_s,
            "count": len(items),
        }
    from strongroom.compliance.check_signatures import target_of_key

    for finding in ev.manifest_findings:
        engine, target = target_of_key(str(finding["key"]))
        where = (engine or "", target or "")
        snap.untrusted[where] = snap.untrusted.get(where, 0) + 1
    audit_counted: set[tuple[str, str]] = set()
    for event in read_events(repo):
        if event.action != "backup" or not event.engine or not event.target:
            continue
        result = "success" if event.result == "success" else "failure"
        k = (event.engine, event.target, result)
        snap.runs[k] = snap.runs.get(k, 0) + 1
        audit_counted.add((event.engine, event.target))
    for key, info in snap.backups.items():
        if key not in audit_counted:
            snap.runs[(*key, "success")] = info["count"]
    for target, archive in ev.wal.items():
        newest = max(archive.segments, key=lambda s: s.modified, default=None)
        snap.wal[target] = {
            "segments": len(archive.segments),
            "newest": newest.modified.timestamp() if newest else None,
        }
    for key, records in ev.drills.items():
        if records:
            last_drill = records[-1]
            snap.drills[key] = {
                "rto": last_drill.rto_s,
                "at": last_drill.at.timestamp() if last_drill.at else None,
                "ok": last_drill.ok,
            }
    reports = sorted(info.key for info in repo.list(REPORTS_PREFIX) if info.key.endswith(".json"))
    if reports:
        try:
            data = json.loads(repo.get_bytes(reports[-1]))
            for c in data.get("controls", []):
                snap.controls[str(c["id"])] = str(c["status"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("newest compliance report unreadable: %s", exc)
    snap.duration_s = time.monotonic() - started
    return snap


class RepositoryCollector(Collector):
    """A prometheus-client collector over one repository, cached ``cache_seconds``."""

    def __init__(
        self,
        repo: Repository | Callable[[], Repository],
        *,
        cache_seconds: float = 30.0,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self._repo = repo
        self._cache_seconds = cache_seconds
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._fetched = 0.0

    def _repository(self) -> Repository:
        return self._repo if isinstance(self._repo, Repository) else self._repo()

    def snapshot(self) -> Snapshot:
        with self._lock:
            fresh = time.monotonic() - self._fetched < self._cache_seconds
            if self._snapshot is not None and fresh:
                return self._snapshot
            try:
                snap = take_snapshot(self._repository(), self._clock())
            except Exception as exc:
                log.error("metrics scrape failed: %s", exc)
                from strongroom.redact import scrub

                snap = self._snapshot or Snapshot(taken_at=self._clock().timestamp())
                snap = Snapshot(**{**snap.__dict__, "ok": False, "error": scrub(str(exc))[:200]})
            self._snapshot = snap
            self._fetched = time.monotonic()
            return snap

    def describe(self) -> list[Metric]:
        return []  # dynamic: do not call collect() at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        now = self._clock().timestamp()
        labels = ["engine", "target"]

        def gauge(name: str, doc: str, names: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=names if names is not None else labels)

        last_ok = gauge(
            "strongroom_backup_last_success_timestamp_seconds",
            "Unix time the newest backup (manifest in the catalog) finished.",
        )
        age = gauge("strongroom_backup_age_seconds", "Seconds since the newest backup finished.")
        size = gauge("strongroom_backup_last_size_bytes", "Stored bytes of the newest backup.")
        raw = gauge(
            "strongroom_backup_last_raw_size_bytes", "Dump (plaintext) bytes of the newest backup."
        )
        duration = gauge(
            "strongroom_backup_last_duration_seconds", "Duration of the newest backup."
        )
        count = gauge("strongroom_backups_in_catalog", "Backups in the catalog.")
        for (engine, target), b in sorted(snap.backups.items()):
            values = [engine, target]
            last_ok.add_metric(values, b["finished"])
            age.add_metric(values, max(0.0, now - b["finished"]))
            size.add_metric(values, b["stored"])
            raw.add_metric(values, b["raw"])
            duration.add_metric(values, b["duration"])
            count.add_metric(values, b["count"])
        untrusted = gauge(
            "strongroom_untrusted_manifests",
            "Manifests not counted as backups: not signed by a trusted key (or malformed).",
        )
        for (engine, target), n in sorted(snap.untrusted.items()):
            untrusted.add_metric([engine, target], n)
        for engine, target in sorted(snap.backups):
            if (engine, target) not in snap.untrusted:
                untrusted.add_metric([engine, target], 0)
        runs = CounterMetricFamily(
            "strongroom_backup_runs",
            "Backup runs by result (audit trail; catalog count while the trail has none).",
            labels=["engine", "target", "result"],
        )
        for (engine, target, result), n in sorted(snap.runs.items()):
            runs.add_metric([engine, target, result], n)
        for engine, target in sorted(snap.backups):
            for result in ("success", "failure"):
                if (engine, target, result) not in snap.runs:
                    runs.add_metric([engine, target, result], 0)
        wal_last = gauge(
            "strongroom_wal_last_archived_timestamp_seconds",
            "Unix time the newest WAL segment was archived.",
            ["target"],
        )
        wal_lag = gauge(
            "strongroom_wal_archive_lag_seconds",
            "Seconds since the newest WAL segment was archived.",
            ["target"],
        )
        wal_segments = gauge("strongroom_wal_segments", "Archived WAL segments.", ["target"])
        for target, w in sorted(snap.wal.items()):
            wal_segments.add_metric([target], w["segments"])
            if w["newest"] is not None:
                wal_last.add_metric([target], w["newest"])
                wal_lag.add_metric([target], max(0.0, now - w["newest"]))
        rto = gauge("strongroom_drill_rto_seconds", "Restore time measured by the newest drill.")
        drill_at = gauge(
            "strongroom_drill_last_timestamp_seconds", "Unix time of the newest restore drill."
        )
        drill_ok = gauge(
            "strongroom_drill_last_success", "1 if the newest restore drill passed, else 0."
        )
        for (engine, target), d in sorted(snap.drills.items()):
            if d["rto"] is not None:
                rto.add_metric([engine, target], d["rto"])
            if d["at"] is not None:
                drill_at.add_metric([engine, target], d["at"])
            drill_ok.add_metric([engine, target], 1.0 if d["ok"] else 0.0)
        controls = gauge(
            "strongroom_compliance_control_status",
            "1 for each control's status in the newest compliance report.",
            ["control", "status"],
        )
        for control_id, status in sorted(snap.controls.items()):
            for option in ("pass", "warn", "fail"):
                controls.add_metric([control_id, option], 1.0 if status == option else 0.0)
        ok = gauge("strongroom_scrape_success", "1 if the repository could be read.", [])
        ok.add_metric([], 1.0 if snap.ok else 0.0)
        took = gauge("strongroom_scrape_duration_seconds", "Seconds reading the repository.", [])
        took.add_metric([], snap.duration_s)
        yield from (
            last_ok,
            age,
            size,
            raw,
            duration,
            count,
            untrusted,
            runs,
            wal_last,
            wal_lag,
            wal_segments,
            rto,
            drill_at,
            drill_ok,
            controls,
            ok,
            took,
        )


def make_registry(repo: Repository | Callable[[], Repository], **kwargs: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RepositoryCollector(repo, **kwargs))
    return registry


def serve(
    repo: Repository | Callable[[], Repository],
    *,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    cache_seconds: float = 30.0,
) -> tuple[Any, threading.Thread]:
    """Start the HTTP exporter in a daemon thread; returns (server, thread).
    ``server.shutdown()`` stops it."""
    from prometheus_client import start_http_server

    registry = make_registry(repo, cache_seconds=cache_seconds)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread
