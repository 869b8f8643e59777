"""``copy_repository``: backups, WAL and evidence from one repository to another.

Any two backends behind the ``Repository`` interface (a local folder, an S3 bucket,
another bucket, region or provider). Phases, in order: backups (``backups``), the WAL
archive and the evidence records (``archive``). Every object is streamed with bounded
buffers (nothing is staged whole on disk or in memory except records capped at
``MAX_RECORD_SIZE``) and checked on the way; the destination's own object lock
applies. Idempotent: what the destination already holds identically is skipped.
Resumable: a killed copy leaves only committed objects visible (writers commit
atomically; an interrupted multipart upload or temp file is invisible and removed by
retention's cleanup of interrupted uploads), and the next run continues from them.
A backup becomes visible at the destination only when its manifest is written, after
all its artifacts.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from strongroom.catalog import Catalog, Manifest
from strongroom.config import RepositoryConfig
from strongroom.copying.archive import ArchiveCopier
from strongroom.copying.backups import (
    BackupCopier,
    PolicyFor,
    SourceBackup,
    read_signed_manifest,
    with_parents,
)
from strongroom.copying.report import CopyReport
from strongroom.errors import AccessDenied, InvalidInput, ServiceUnavailable, StrongroomError
from strongroom.ids import backup_id_time, check_backup_id
from strongroom.repository.base import Repository

log = logging.getLogger(__name__)


@dataclass
class CopyOptions:
    """What to copy. ``backup_ids``: only these backups (and the backups they build on);
    ``since``: only backups finished, and WAL/evidence stored, at or after it."""

    backups: bool = True
    wal: bool = True
    evidence: bool = True
    backup_ids: list[str] = field(default_factory=list)
    engine: str | None = None
    target: str | None = None
    since: dt.datetime | None = None
    jobs: int = 4
    # the destination's retention policy per (engine, target): its upload-time locks
    policy_for: PolicyFor | None = None


def _selected(
    catalog: Catalog, options: CopyOptions
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    entries = catalog.entries(options.engine, options.target)
    if not options.backup_ids:
        chosen = entries
        if options.since is not None:
            # ids sort by start time: a backup that started before ``since`` can still
            # have finished after it, so the manifest decides (below)
            margin = options.since - dt.timedelta(days=2)
            chosen = [e for e in entries if backup_id_time(e[2]) >= margin]
        return chosen, entries
    wanted = {check_backup_id(b) for b in options.backup_ids}
    chosen = [e for e in entries if e[2] in wanted]
    missing = wanted - {e[2] for e in chosen}
    if missing:
        raise InvalidInput(f"backup(s) not found in the source: {', '.join(sorted(missing))}")
    return chosen, entries


def copy_repository(
    source: Repository,
    destination: Repository,
    destination_config: RepositoryConfig,
    options: CopyOptions | None = None,
) -> CopyReport:
    """Copy what ``options`` selects from ``source`` to ``destination``; the report
    lists every object (``ok`` False when anything was refused or failed)."""
    opts = options or CopyOptions()
    if source.describe() == destination.describe():
        raise InvalidInput(f"source and destination are the same repository: {source.describe()}")
    now = dt.datetime.now(dt.UTC)
    report = CopyReport(source.describe(), destination.describe())
    if opts.backups:
        copy_backups(source, destination, destination_config, opts, report)
    archive = ArchiveCopier(
        source, destination, destination_config, report, jobs=opts.jobs, now=now
    )
    if opts.wal and opts.engine in (None, "postgresql"):
        archive.copy_wal(opts.target, opts.since)
    if opts.evidence:
        archive.copy_evidence(opts.since)
    log.info("copy %s -> %s: %s", report.source, report.destination, report.summary())
    return report


def copy_backups(
    source: Repository,
    destination: Repository,
    destination_config: RepositoryConfig,
    opts: CopyOptions,
    report: CopyReport,
) -> None:
    """The backups phase: each selected backup checked, then copied oldest first."""
    catalog = Catalog(source)
    chosen, entries = _selected(catalog, opts)
    checked: dict[tuple[str, str, str], SourceBackup | None] = {}

    def load(entry: tuple[str, str, str]) -> Manifest | None:
        if entry not in checked:
            try:
                checked[entry] = read_signed_manifest(source, *entry)
            except (ServiceUnavailable, AccessDenied):
                raise
            except StrongroomError as exc:
                checked[entry] = None
                report.backup(*entry, "refused", str(exc)[:500])
        found = checked[entry]
        return found.manifest if found is not None else None

    for finding in catalog.findings:
        report.add("backup", finding["key"], "refused", 0, finding["error"][:300])
    if opts.since is not None and not opts.backup_ids:
        since = opts.since
        chosen = [
            e for e in chosen if (m := load(e)) is None or m.finished_at.astimezone(dt.UTC) >= since
        ]
    copier = BackupCopier(
        source, destination, destination_config, report, policy_for=opts.policy_for, jobs=opts.jobs
    )
    wanted = set(with_parents(chosen, entries, load))
    for entry in sorted(wanted, key=lambda e: e[2]):
        backup = checked.get(entry)
        if backup is not None:
            copier.copy(backup)


def parse_since(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """``--since``: an ISO 8601 time (UTC unless it says otherwise) or an age such as
    ``36h``, ``7d`` or ``90m``."""
    if not text:
        return None
    value = text.strip()
    units = {"m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        seconds = float(value[:-1]) * units[value[-1]]
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"--since {value[:40]!r} is neither an ISO time nor an age like 36h or 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
