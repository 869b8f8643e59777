"""Failing a base backup fast when the cluster's ``archive_command`` fails.

A base backup is done only when its WAL is archived. When ``archive_command`` is
wrong (a typo, a missing binary, a bad configuration file) the WAL never arrives,
but PostgreSQL says so from the first attempt. ``ArchiverWatch`` reads it from a
thread for the whole backup (``pg_basebackup`` itself waits in the server for the WAL
to be archived) and stops pg_basebackup with a ``ToolFailed`` naming the command
(secrets redacted) and the best error it can read. That is a configuration error, not
a transient one: flows do not retry it. Two signatures:

* A command that runs and fails: ``pg_stat_archiver`` counts the failures and names
  the file; ``FAILURES`` failures since the backup started (the archiver tries each
  file three times, a second apart) with nothing archived since the last one.
* A command PostgreSQL cannot run at all (exit 126: not executable, 127: not found):
  the archiver exits FATAL before it counts anything and the postmaster restarts it
  every 10 s, so ``pg_stat_archiver`` stays still. Then the watch needs a file waiting
  (the oldest ``.ready`` in ``archive_status`` via ``pg_ls_archive_statusdir()``, or
  a finished segment newer than the last archived one) for ``STALL_S`` with nothing
  archived and the archiver process missing or restarted in ``pg_stat_activity``.
  Seeing that process and listing ``archive_status`` needs superuser or
  ``pg_monitor``; without them the watch cannot tell a dead archiver from a slow one
  and waits ``BLIND_STALL_S`` of no progress instead. The server log's archiver line
  is quoted when the role may read it (``pg_read_file``, a logging collector).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from strongroom.config import PostgresConnection
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.wal import names
from strongroom.errors import ToolFailed
from strongroom.redact import scrub

FAILURES = 3
POLL_S = 1.0
STALL_S = 10.0
BLIND_STALL_S = 20.0
LOG_TAIL = 256 * 1024
_SECRETISH = re.compile(
    r"(?i)((?:password|passwd|secret|token|key|credential)[\w.-]*\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)"
)
_URL_AUTH = re.compile(r"(?i)(\w+://)[^/\s:@]+:[^/\s@]+@")
_LOG_FAILED = re.compile(r"archive command (failed with exit code \d+|was terminated by .*)")
_LOG_PREFIXED = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d")


def redact_command(command: str) -> str:
    """``archive_command`` as it may be shown: registered secrets, ``key=value`` pairs
    that look secret and credentials in URLs replaced."""
    text = scrub(command)
    text = _SECRETISH.sub(lambda m: m.group(1) + "***", text)
    return _URL_AUTH.sub(r"\1***@", text)[:500]


@dataclass(frozen=True)
class _Sample:
    failed: int
    failed_wal: str | None
    failed_at: Any
    archived: int
    archived_at: Any
    archived_wal: str | None
    current_wal: str | None
    archiver_pid: int | None
    ready: str | None = None
    ready_age_s: float | None = None


def _sample(c: psycopg.Connection[Any], lists_status: bool) -> _Sample:
    row = c.execute(
        "SELECT failed_count, last_failed_wal, last_failed_time, archived_count,"
        " last_archived_time, last_archived_wal,"
        " CASE WHEN pg_is_in_recovery() THEN NULL"
        "  ELSE pg_walfile_name(pg_current_wal_lsn()) END,"
        " (SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver' LIMIT 1)"
        " FROM pg_stat_archiver"
    ).fetchone()
    assert row is not None
    ready: tuple[Any, ...] | None = None
    if lists_status:
        ready = c.execute(
            "SELECT name, extract(epoch FROM now() - modification)::float8"
            " FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
            " ORDER BY modification, name LIMIT 1"
        ).fetchone()
    return _Sample(
        int(row[0]),
        row[1],
        row[2],
        int(row[3]),
        row[4],
        row[5],
        row[6],
        row[7],
        ready[0].removesuffix(".ready") if ready else None,
        float(ready[1]) if ready else None,
    )


def _segno(name: str | None, segment_size: int) -> int | None:
    if name is None or len(name) < 24 or not names.is_segment(name[:24]):
        return None
    return names.segno_of(name[:24], segment_size)


def _log_line(c: psycopg.Connection[Any]) -> str | None:
    """The server log's last archiver failure (the command's own output, PostgreSQL's
    line and its DETAIL), when a logging collector writes a file the role may read."""
    try:
        with c.transaction():
            row = c.execute(
                "SELECT f, (pg_stat_file(f)).size FROM pg_current_logfile() AS f"
                " WHERE f IS NOT NULL"
            ).fetchone()
            if row is None:
                return None
            start = max(int(row[1]) - LOG_TAIL, 0)
            text = c.execute("SELECT pg_read_file(%s, %s, %s)", (row[0], start, LOG_TAIL))
            tail = text.fetchone()
    except psycopg.Error:
        return None  # no collector, or not allowed (superuser / pg_read_server_files)
    lines = str(tail[0] if tail else "").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if _LOG_FAILED.search(lines[i]):
            first = i
            while first > 0 and i - first < 3 and not _LOG_PREFIXED.match(lines[first - 1]):
                first -= 1  # the command's stderr, written unprefixed before it
            last = i + 1 if i + 1 < len(lines) and "DETAIL:" in lines[i + 1] else i
            return redact_command(" / ".join(line.strip() for line in lines[first : last + 1]))
    return None


@dataclass
class ArchiverWatch:
    """Baseline taken before the backup; ``start`` polls from a thread and calls
    ``on_failure`` once archiving is failing; ``error`` is then the ToolFailed."""

    conn: PostgresConnection
    archive_command: str
    segment_size: int = names.DEFAULT_SEGMENT_SIZE
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    error: ToolFailed | None = None
    sees_archiver: bool = False
    lists_status: bool = False
    _base: _Sample | None = None
    _last: _Sample | None = None
    _progress_at: float = field(default_factory=time.monotonic)
    _pending_at: float | None = None
    _pids: set[int] = field(default_factory=set)
    _absent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        with connect(self.conn) as c:
            row = c.execute(
                "SELECT current_setting('is_superuser') = 'on'"
                " OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),"
                " has_function_privilege('pg_ls_archive_statusdir()', 'EXECUTE')"
            ).fetchone()
            assert row is not None
            self.sees_archiver, self.lists_status = bool(row[0]), bool(row[1])
            self._base = _sample(c, False)
        self._last = self._base

    def check(self) -> ToolFailed | None:
        """The error to stop the backup with, when the archiver is failing now."""
        with connect(self.conn) as c:
            s = _sample(c, self.lists_status)
            error = self._counted(s) or self._stalled(s)
            if error is None:
                return None
            line = _log_line(c)
        if line:
            error = f"{error}; server log: {line}"
        return ToolFailed(
            f"{error}; archive_command = {redact_command(self.archive_command)!r}. Fix the "
            "command (see `strongroom wal-config`) and take the base backup again"
        )

    def _counted(self, s: _Sample) -> str | None:
        assert self._base is not None
        failures = s.failed - self._base.failed
        if failures < FAILURES or s.failed_wal is None or s.failed_at is None:
            return None
        if s.failed_at < self.started - dt.timedelta(seconds=1):
            return None
        if s.archived_at is not None and s.archived_at > s.failed_at:
            return None  # it recovered: a passing hiccup, not a broken command
        return (
            "archive_command is failing, so the base backup's WAL cannot be archived: "
            f"pg_stat_archiver counts {failures} failures since the backup started, the last "
            f"on {s.failed_wal} at {s.failed_at.isoformat(timespec='seconds')} (the command's "
            "output is in the server log)"
        )

    def _stalled(self, s: _Sample) -> str | None:
        """A command PostgreSQL cannot run: nothing archived, nothing counted, a file
        waiting, and (when visible) the archiver process dying and restarting."""
        now = time.monotonic()
        last = self._last or s
        if (s.archived, s.failed) != (last.archived, last.failed):
            self._progress_at, self._pending_at = now, None
        self._last = s
        if s.archiver_pid is None:
            self._absent += 1
        else:
            self._pids.add(s.archiver_pid)
        waiting, age = self._waiting(s, now)
        crashing = self._absent >= 2 or len(self._pids) >= 2
        stall = STALL_S if self.sees_archiver else BLIND_STALL_S
        idle = now - self._progress_at
        if waiting is None or age < stall or idle < stall:
            return None
        if self.sees_archiver and not crashing:
            return None  # alive and busy: a slow command, left to the WAL timeout
        assert self._base is not None
        if self.sees_archiver:
            why = (
                f"the archiver process is {'restarting' if len(self._pids) >= 2 else 'not running'}"
                f" (missing from pg_stat_activity on {self._absent} polls, "
                f"{len(self._pids)} process id(s) seen)"
            )
        else:
            why = (
                "this role sees neither the archiver process nor archive_status (grant it "
                "pg_monitor for a precise diagnosis)"
            )
        return (
            "archive_command cannot be run, so the base backup's WAL cannot be archived: "
            f"{waiting} waits to be archived since {age:.0f} s, nothing was archived for "
            f"{idle:.0f} s and pg_stat_archiver counts no failure ({s.archived} archived, "
            f"{s.failed} failed, last archived {s.archived_wal or 'none'}); {why}. PostgreSQL "
            "stops its archiver (FATAL) before counting a failure when the shell cannot run "
            "the command at all: exit 126 (not executable) or 127 (not found)"
        )

    def _waiting(self, s: _Sample, now: float) -> tuple[str | None, float]:
        """The file waiting for the archiver and for how long (seconds)."""
        if self.lists_status:
            return s.ready, s.ready_age_s or 0.0
        assert self._base is not None
        current = _segno(s.current_wal, self.segment_size)
        first = _segno(self._base.current_wal, self.segment_size)
        done = _segno(s.archived_wal, self.segment_size)
        if current is None or first is None or s.current_wal is None:
            return None, 0.0
        oldest = max(first, done + 1 if done is not None else first)
        if oldest >= current:  # every finished segment since the backup began is archived
            self._pending_at = None
            return None, 0.0
        if self._pending_at is None:
            self._pending_at = now
        name = names.segment_name(names.timeline_of(s.current_wal[:24]), oldest, self.segment_size)
        return f"WAL segment {name}", now - self._pending_at

    def start(self, on_failure: Callable[[], None]) -> None:
        def run() -> None:
            while not self._stop.wait(POLL_S):
                try:
                    error = self.check()
                except Exception:  # noqa: S112 (the backup's own connection reports outages)
                    continue
                if error is not None:
                    self.error = error
                    on_failure()
                    return

        self._thread = threading.Thread(target=run, name="archiver-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ArchiverWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
