"""Failing a base backup fast when the cluster's ``archive_command`` fails.

A base backup is done only when its WAL is archived. When ``archive_command`` is
wrong (a typo, a missing binary, a bad configuration file) the WAL never arrives,
but PostgreSQL says so from the first attempt: ``pg_stat_archiver`` counts the
failures and names the file. ``ArchiverWatch`` reads it from a thread for the whole
backup (``pg_basebackup`` itself waits in the server for the WAL to be archived);
once the archiver failed ``FAILURES`` times since the backup started (it retries each
file three times, a second apart) and has archived nothing since its last failure,
pg_basebackup is stopped and the backup ends with a
``ToolFailed`` naming the command (secrets redacted) and the archiver's last
failure. That is a configuration error, not a transient one: flows do not retry it.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from strongroom.config import PostgresConnection
from strongroom.engines.postgres.connect import connect
from strongroom.errors import ToolFailed
from strongroom.redact import scrub

FAILURES = 3
POLL_S = 1.0
_SECRETISH = re.compile(
    r"(?i)((?:password|passwd|secret|token|key|credential)[\w.-]*\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)"
)
_URL_AUTH = re.compile(r"(?i)(\w+://)[^/\s:@]+:[^/\s@]+@")


def redact_command(command: str) -> str:
    """``archive_command`` as it may be shown: registered secrets, ``key=value`` pairs
    that look secret and credentials in URLs replaced."""
    text = scrub(command)
    text = _SECRETISH.sub(lambda m: m.group(1) + "***", text)
    return _URL_AUTH.sub(r"\1***@", text)[:500]


def _archiver(conn: PostgresConnection) -> tuple[int, str | None, Any, Any]:
    with connect(conn) as c:
        row = c.execute(
            "SELECT failed_count, last_failed_wal, last_failed_time, last_archived_time"
            " FROM pg_stat_archiver"
        ).fetchone()
    assert row is not None
    return int(row[0]), row[1], row[2], row[3]


@dataclass
class ArchiverWatch:
    """Baseline taken before the backup; ``start`` polls from a thread and calls
    ``on_failure`` once archiving is failing; ``error`` is then the ToolFailed."""

    conn: PostgresConnection
    archive_command: str
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    error: ToolFailed | None = None
    _base_failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._base_failures = _archiver(self.conn)[0]

    def check(self) -> ToolFailed | None:
        """The error to stop the backup with, when the archiver is failing now."""
        failures, wal, failed_at, archived_at = _archiver(self.conn)
        if failures - self._base_failures < FAILURES or wal is None or failed_at is None:
            return None
        if failed_at < self.started - dt.timedelta(seconds=1):
            return None
        if archived_at is not None and archived_at > failed_at:
            return None  # it recovered: a passing hiccup, not a broken command
        return ToolFailed(
            f"archive_command is failing, so the base backup's WAL cannot be archived: "
            f"pg_stat_archiver counts {failures - self._base_failures} failures since the "
            f"backup started, the last on {wal} at {failed_at.isoformat(timespec='seconds')}; "
            f"archive_command = {redact_command(self.archive_command)!r} (its output is in "
            "the server log). Fix the command (see `strongroom wal-config`) and take the "
            "base backup again"
        )

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
