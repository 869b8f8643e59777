"""Prefect flows for PostgreSQL point-in-time recovery (orchestration only).

- ``base-backup-postgresql``: pg_basebackup streamed into the repository; done
  only when the WAL it needs is archived. (Re)writes the WAL configuration file
  ``strongroom-wal`` reads where the target block's ``wal_config_path`` says.
- ``files-backup-postgresql``: file-level copy of the data directory (full / diff /
  incr, docs/physical.md), for a worker that can read it (the target block's
  ``data_directory``); done only when the WAL it needs is archived.
- ``wal-check-postgresql``: continuity of the WAL archive and the recoverable
  window, as JSON; fails (so automations alert) when there is a gap.
- ``pitr-restore-postgresql``: restore to a time / LSN / xid / restore point /
  immediate / latest, into an empty data directory; optionally start, wait, verify.
- ``create-restore-point-postgresql``: a named restore point, archived and recorded.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks import PostgresTarget
from flows.audit import AUDITED
from flows.common import (
    TRANSIENT_TASK,
    human_size,
    load_key,
    load_repository,
    publish,
    secure_logging,
)
from flows.engine_runs import load_target, open_backup
from strongroom import progress
from strongroom.catalog import Manifest, artifact_totals
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.pitr.basebackup import base_backup_postgres, base_backups
from strongroom.engines.postgres.pitr.files.backup import files_backup_postgres
from strongroom.engines.postgres.pitr.files.backup import summary as files_summary
from strongroom.engines.postgres.pitr.plan import PitrRequest
from strongroom.engines.postgres.pitr.points import create_restore_point
from strongroom.engines.postgres.pitr.restore import pitr_restore
from strongroom.engines.postgres.wal.check import wal_check
from strongroom.engines.postgres.wal.config import write_wal_config
from strongroom.errors import IntegrityError, InvalidInput
from strongroom.repository import Repository


def write_wal_config_from_blocks(
    target: str,
    path: str,
    *,
    repository: str = "default",
    encryption_key: str = "default",
    identity_file: str | None = None,
    owner: str | None = "postgres",
    system_identifier: int | None = None,
    push: dict[str, Any] | None = None,
    fetch: dict[str, Any] | None = None,
) -> str:
    """Write the TOML ``strongroom-wal`` reads, from the repository and key blocks
    (only the public recipients; the identity stays in its block unless
    ``identity_file`` is written separately for a restore host)."""
    _, repo_config = load_repository(repository)
    enc = load_key(encryption_key)
    written = write_wal_config(
        path,
        target=target,
        repository=repo_config,
        recipients=enc.recipients,
        identity_file=identity_file,
        system_identifier=system_identifier,
        push=push,
        fetch=fetch,
        owner=owner,
    )
    return str(written)


@task(**TRANSIENT_TASK)
def take_base_backup(
    conn: PostgresConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    labels: dict[str, str],
    manifest_checksums: str,
    wal_timeout_s: float,
) -> dict[str, Any]:
    reporter = progress.current()
    manifest = base_backup_postgres(
        conn,
        repo,
        repo_config,
        enc,
        labels=labels,
        progress=reporter("base.tar", None) if reporter else None,
        manifest_checksums=manifest_checksums,
        wal_timeout_s=wal_timeout_s,
    )
    return manifest.model_dump(mode="json")


@task(**TRANSIENT_TASK)
def take_files_backup(
    conn: PostgresConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    labels: dict[str, str],
    backup_type: str,
    checksum: bool,
    wal_timeout_s: float,
    jobs: int = 1,
) -> dict[str, Any]:
    if not conn.data_directory:
        raise InvalidInput(
            f"target {conn.name} has no data_directory: file-level backups need a worker "
            "that can read the data directory (set it in the PostgresTarget block)"
        )
    reporter = progress.current()
    manifest = files_backup_postgres(
        conn,
        repo,
        repo_config,
        enc,
        data_directory=conn.data_directory,
        backup_type=backup_type,
        checksum=checksum,
        labels=labels,
        progress=reporter("data directory", None) if reporter else None,
        wal_timeout_s=wal_timeout_s,
        jobs=jobs,
        primary=conn.primary_connection(),  # a standby's primary (PostgresTarget primary_host)
    )
    return manifest.model_dump(mode="json")


@flow(name="files-backup-postgresql", **AUDITED)
def files_backup_postgresql(
    target: str,
    backup_type: Literal["full", "diff", "incr"] = "incr",
    checksum: bool = False,
    repository: str = "default",
    encryption_key: str = "default",
    labels: dict[str, str] | None = None,
    wal_timeout_s: float = 300.0,
    jobs: int = 2,
) -> dict[str, Any]:
    """File-level physical backup of ``target`` (its block's ``data_directory``): a full
    one, or only the files changed since the last full (``diff``) or the last backup
    (``incr``); a diff/incr without a usable prior is a full and says why. A block with
    ``primary_host`` is a streaming standby: its files are read, its primary archives and
    switches the WAL (docs/physical.md, "Backup from a standby")."""
    secure_logging()
    run = open_backup(
        PostgresTarget, "postgresql", target, repository, encryption_key, kind="files"
    )
    log = get_run_logger()
    log.info(
        "%s files backup of PostgreSQL target %s into %s", backup_type, target, run.repo.describe()
    )
    with run.locked():
        manifest = take_files_backup(
            run.conn,
            run.repo,
            run.repo_config,
            run.enc,
            labels or {},
            backup_type,
            checksum,
            wal_timeout_s,
            jobs,
        )
    d = manifest["details"]
    stored = files_summary(Manifest.model_validate(manifest))["stored_bytes"]
    publish(
        f"PostgreSQL {d['backup_type']} files backup {manifest['backup_id']}",
        f"files-backup-postgresql-{target}",
        [
            f"- target: `{target}`, system {d['system_identifier']}, timeline {d['timeline']}",
            f"- type: {d['backup_type']}"
            + (f" on {d['base_backup_id']}" if d.get("base_backup_id") else "")
            + (f" ({d['full_reason']})" if d.get("full_reason") else ""),
            f"- files: {d['files']} ({d['files_copied']} copied, {d['files_referenced']} "
            f"referenced, {d.get('files_mapped', 0)} by changed blocks), "
            f"{human_size(d.get('copied_bytes', 0))} copied, stored {human_size(stored)}, "
            f"{d.get('jobs', 1)} job(s)",
            f"- WAL: {d['start_wal']} (start {d['start_lsn']}) to stop {d['stop_lsn']}",
        ],
        [
            {"field": key, "value": str(d.get(key))}
            for key in ("backup_type", "base_backup_id", "start_lsn", "stop_lsn", "timeline")
        ],
    )
    if backup_type != "full" and d.get("full_reason"):
        log.warning(
            "a %s backup was asked for, a full one was taken: %s", backup_type, d["full_reason"]
        )
    log.info("files backup %s complete: %s stored", manifest["backup_id"], human_size(stored))
    return manifest


@flow(name="base-backup-postgresql", **AUDITED)
def base_backup_postgresql(
    target: str,
    repository: str = "default",
    encryption_key: str = "default",
    labels: dict[str, str] | None = None,
    manifest_checksums: str = "SHA256",
    wal_timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Physical base backup of ``target`` (pg_basebackup tar, streamed and encrypted).

    When the target block sets ``wal_config_path``, the flow first writes there the
    configuration file that ``archive_command = 'strongroom-wal push %p'`` reads on
    the database host, chowned to the block's ``wal_config_owner``. Path and owner are
    block fields, not flow parameters: whoever may start a run must not make a root
    worker write the repository secret anywhere and hand it to any user.
    """
    secure_logging()
    run = open_backup(PostgresTarget, "postgresql", target, repository, encryption_key, kind="base")
    log = get_run_logger()
    if run.conn.wal_config_path:
        written = write_wal_config_from_blocks(
            target,
            run.conn.wal_config_path,
            repository=repository,
            encryption_key=encryption_key,
            owner=run.conn.wal_config_owner,
        )
        log.info("wrote the WAL configuration %s", written)
    log.info("base backup of PostgreSQL target %s into %s", target, run.repo.describe())
    with run.locked():
        manifest = take_base_backup(
            run.conn,
            run.repo,
            run.repo_config,
            run.enc,
            labels or {},
            manifest_checksums,
            wal_timeout_s,
        )
    d = manifest["details"]
    raw, stored = artifact_totals(manifest)
    publish(
        f"PostgreSQL base backup {manifest['backup_id']}",
        f"base-backup-postgresql-{target}",
        [
            f"- target: `{target}` ({manifest['server']['version']}), system "
            f"{d['system_identifier']}, timeline {d['timeline']}",
            f"- WAL: {d['start_wal']} (start {d['start_lsn']}) to stop {d['stop_lsn']}, "
            f"{len(d['archived_wal'])} file(s) confirmed archived",
            f"- size: {human_size(raw)} tar, stored {human_size(stored)}",
            f"- finished: {manifest['finished_at']}",
        ],
        [
            {"field": key, "value": str(d[key])}
            for key in ("start_lsn", "stop_lsn", "start_wal", "stop_wal", "timeline", "next_xid")
        ],
    )
    log.info("base backup %s complete: %s stored", manifest["backup_id"], human_size(stored))
    return manifest


@flow(name="wal-check-postgresql", **AUDITED)
def wal_check_postgresql(
    target: str, repository: str = "default", fail_on_problem: bool = True
) -> dict[str, Any]:
    """WAL continuity and recoverable window of ``target``; fails on gaps when asked."""
    secure_logging()
    repo, _ = load_repository(repository)
    report = wal_check(repo, target, base_backups(repo, target))
    window = report.get("window") or {}
    publish(
        f"WAL continuity of {target}: {'ok' if report['ok'] else 'PROBLEMS'}",
        f"wal-check-postgresql-{target}",
        [
            f"- timelines: {[t['timeline'] for t in report['timelines']]}",
            f"- base backups: {len(report['backups'])}",
            f"- recoverable window: {window.get('earliest', {}).get('time', '-')} to "
            f"{window.get('latest', {}).get('time', '-')}",
            f"- problems: {', '.join(report['problems']) or 'none'}",
        ],
        report["gaps"] or [{"gaps": "none"}],
    )
    if fail_on_problem and not report["ok"]:
        raise IntegrityError(f"WAL archive of {target}: {'; '.join(report['problems'])}")
    return report


@task(cache_policy=NO_CACHE)
def run_pitr(
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    req: PitrRequest,
    password: str | None,
) -> dict[str, Any]:
    reporter = progress.current()
    return pitr_restore(
        repo,
        repo_config,
        enc,
        req,
        progress=reporter("base.tar", None) if reporter else None,
        password=password,
    )


@flow(name="pitr-restore-postgresql", **AUDITED)
def pitr_restore_postgresql(
    target: str,
    data_dir: str,
    backup_id: str = "auto",
    recovery_target: Literal["latest", "immediate", "time", "lsn", "xid", "name"] = "latest",
    target_time: dt.datetime | None = None,
    target_lsn: str | None = None,
    target_xid: int | None = None,
    target_name: str | None = None,
    inclusive: bool = True,
    target_timeline: str = "latest",
    action: Literal["promote", "pause", "shutdown"] = "promote",
    start: bool = False,
    port: int | None = None,
    wait_timeout_s: float = 1800.0,
    verify_query: str | None = None,
    verify_database: str = "postgres",
    verify_expect: str | None = None,
    db_user: str = "postgres",
    archive_after: str | None = None,
    prefetch: int = 8,
    dry_run: bool = False,
    repository: str = "default",
    encryption_key: str = "default",
    delta: bool = False,
    jobs: int = 2,
) -> dict[str, Any]:
    """Point-in-time recovery of ``target`` into the empty ``data_dir`` (or, from a files
    backup with ``delta``, onto a stale copy of the same cluster there).

    The base backup is chosen automatically for the target; a target outside the
    recoverable window is refused with the window in the error. The OS user is the
    data directory's owner (``postgres`` for a new one) and the socket folder a fresh
    ``mkdtemp`` one: no flow parameter can make a root worker chown a folder.
    """
    secure_logging()
    req = PitrRequest(
        target=target,
        data_dir=data_dir,
        backup_id=backup_id,
        recovery_target=recovery_target,
        target_time=target_time,
        target_lsn=target_lsn,
        target_xid=target_xid,
        target_name=target_name,
        inclusive=inclusive,
        target_timeline=target_timeline,
        action=action,
        start=start,
        port=port,
        wait_timeout_s=wait_timeout_s,
        verify_query=verify_query,
        verify_database=verify_database,
        verify_expect=verify_expect,
        db_user=db_user,
        archive_after=archive_after,
        prefetch=prefetch,
        dry_run=dry_run,
        delta=delta,
        jobs=jobs,
    )
    repo, repo_config = load_repository(repository)
    enc = load_key(encryption_key)
    log = get_run_logger()
    report = run_pitr(repo, repo_config, enc, req, None)
    plan = report["plan"]
    recovery = report.get("recovery") or {}
    lines = [
        f"- target `{target}` -> `{report['data_dir']}` ({recovery_target}"
        f"{': ' + str(plan['recovery_settings']) if recovery_target != 'latest' else ''})",
        f"- base backup `{plan['backup']['backup_id']}` (timeline {plan['backup']['timeline']},"
        f" stop {plan['backup']['stop_lsn']}), recovering along timeline {plan['timeline']}",
    ]
    if report.get("dry_run"):
        lines.append("- dry run: nothing was changed")
    if recovery:
        lines.append(
            f"- server {recovery['state']} in {recovery['seconds']} s on timeline "
            f"{recovery.get('timeline', '?')}, at {recovery.get('replay_lsn', '?')}"
        )
        if recovery.get("verify"):
            lines.append(f"- verification: `{recovery['verify']['output'][:200]}`")
    lines.extend(f"- note: {n}" for n in plan.get("notes", []))
    publish(
        f"PostgreSQL PITR of {target}",
        f"pitr-restore-postgresql-{target}",
        lines,
        plan["window"],
    )
    log.info("PITR of %s into %s: %s", target, report["data_dir"], recovery.get("state", "ready"))
    return report


@task(**TRANSIENT_TASK)
def make_restore_point(
    conn: PostgresConnection, repo: Repository, name: str, wait_s: float
) -> dict[str, Any]:
    return create_restore_point(conn, repo, name, wait_s=wait_s)


@flow(name="create-restore-point-postgresql", **AUDITED)
def create_restore_point_postgresql(
    target: str, name: str, repository: str = "default", wait_s: float = 120.0
) -> dict[str, Any]:
    """Create a named restore point on ``target`` and wait until its WAL is archived."""
    secure_logging()
    conn = load_target(PostgresTarget, target)
    repo, _ = load_repository(repository)
    record = make_restore_point(conn, repo, name, wait_s)
    publish(
        f"Restore point {name} on {target}",
        f"restore-point-{target}-{name}",
        [f"- `{name}` at LSN {record['lsn']} (timeline {record['timeline']}), {record['time']}"],
        [record],
    )
    return record
