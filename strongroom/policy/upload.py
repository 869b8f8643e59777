"""Upload-time object lock: how long to lock a new backup's objects.

The retain-until is the latest keep-until among the policy's time-based rules
that will keep the backup (GFS period, compliance floor for the first backup of
a year, recovery window), and at least the repository's ``retention_days``.
Because GFS keeps the *first* backup of each period, whether a new backup is a
daily/weekly/monthly/yearly copy is known when it starts: it is if no earlier
backup of the same series falls in that period. Retention later keeps the
backup at least until this date, so the lock never fights the policy.

Engines call ``upload_settings`` once per backup, with the backup's start time,
and pass the result to every ``store_artifact`` / ``open_write`` (and the
manifest write) of that backup.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from strongroom.catalog import Catalog
from strongroom.config import RepositoryConfig
from strongroom.errors import StrongroomError
from strongroom.ids import BACKUP_ID_RE, backup_id_time, check_engine, check_name
from strongroom.policy.retention import (
    RetentionPolicy,
    UploadRetention,
    _utc,
    _week_index,
    _week_start,
    upload_retain_until,
)
from strongroom.repository.base import Repository, StorageSettings


@dataclass(frozen=True)
class UploadLock:
    retain_until: dt.datetime | None
    rule: str | None

    def settings(self) -> StorageSettings:
        return StorageSettings(retain_until=self.retain_until)


def _previous_same_kind(
    repo: Repository, engine: str, target: str, kind: str, started: dt.datetime
) -> dt.datetime | None:
    """Start time of the latest earlier backup of the same series within the periods
    that matter (this year and this ISO week), or None."""
    horizon = min(dt.datetime(started.year, 1, 1, tzinfo=dt.UTC), _week_start(_week_index(started)))
    prefix = f"catalog/{check_engine(engine)}/{check_name(target, 'target name')}/"
    ids = sorted(
        (
            info.key[len(prefix) : -len(".json")]
            for info in repo.list(prefix)
            if info.key.endswith(".json") and info.key.count("/") == 3
        ),
        reverse=True,
    )
    catalog = Catalog(repo)
    for bid in ids:
        if not BACKUP_ID_RE.fullmatch(bid):
            continue
        when = backup_id_time(bid)
        if when > started:
            continue
        if when < horizon - dt.timedelta(seconds=1):
            return None
        try:
            manifest = catalog.load(engine, target, bid)
        except StrongroomError:
            continue
        if manifest.kind == kind and _utc(manifest.started_at) < started:
            return _utc(manifest.started_at)
    return None


def retain_until_for_backup(
    repo: Repository,
    engine: str,
    target: str,
    started_at: dt.datetime,
    policy: RetentionPolicy | None,
    *,
    kind: str = "logical",
    retention_days: int = 0,
) -> UploadLock:
    """The retain-until for a backup of ``engine/target`` starting at ``started_at``."""
    started = _utc(started_at)
    candidates: list[tuple[dt.datetime, str]] = []
    if retention_days > 0:
        candidates.append(
            (started + dt.timedelta(days=retention_days), f"repository retention {retention_days}d")
        )
    if policy is not None:
        previous = _previous_same_kind(repo, engine, target, kind, started)
        result: UploadRetention = upload_retain_until(
            policy, started, [previous] if previous else []
        )
        if result.retain_until is not None and result.rule is not None:
            candidates.append((result.retain_until, result.rule))
    if not candidates:
        return UploadLock(None, None)
    until, rule = max(candidates, key=lambda c: c[0])
    return UploadLock(until, rule)


def upload_settings(
    repo: Repository,
    repo_config: RepositoryConfig,
    engine: str,
    target: str,
    started_at: dt.datetime,
    policy: RetentionPolicy | None = None,
    *,
    kind: str = "logical",
) -> StorageSettings:
    """``StorageSettings`` for every object of a new backup (see the module docstring).

    Without object lock on the repository this is ``StorageSettings()`` (no lookups).
    """
    if not repo_config.lock_mode:
        return StorageSettings(
            retain_until=started_at + dt.timedelta(days=repo_config.retention_days)
            if repo_config.retention_days
            else None
        )
    lock = retain_until_for_backup(
        repo,
        engine,
        target,
        started_at,
        policy,
        kind=kind,
        retention_days=repo_config.retention_days,
    )
    return lock.settings()
