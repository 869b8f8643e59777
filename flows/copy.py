"""Prefect flow ``copy-backups``: copy backups, WAL and evidence to a second repository.

Orchestration only: load both repository blocks (and the destination's retention
policy, when named), run ``strongroom.copying.copy_repository`` as one task (retried on
transient storage errors: the copy is idempotent and resumes where it stopped), publish
the summary and per-backup table, fail the run when anything was refused.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.audit import AUDITED
from flows.common import TRANSIENT_TASK, human_size, load_repository, publish, secure_logging
from strongroom.config import RepositoryConfig
from strongroom.copying.engine import CopyOptions, copy_repository, parse_since
from strongroom.errors import IntegrityError
from strongroom.repository import Repository


@task(**TRANSIENT_TASK)
def run_copy(
    source: Repository,
    destination: Repository,
    destination_config: RepositoryConfig,
    options: CopyOptions,
) -> dict[str, Any]:
    return copy_repository(source, destination, destination_config, options).to_dict()


@flow(name="copy-backups", **AUDITED)
def copy_backups(
    repository: str = "default",
    destination: str = "offsite",
    backup_ids: list[str] | None = None,
    since: str | None = None,
    engine: str | None = None,
    target: str | None = None,
    wal: bool = True,
    evidence: bool = True,
    jobs: int = 4,
    destination_policy: str | None = None,
) -> dict[str, Any]:
    """Copy from the BackupRepository block ``repository`` to the block ``destination``:
    every backup (or ``backup_ids`` and what they build on, or those finished ``since``
    an ISO time or an age like ``36h``), the WAL archive and the evidence records.
    Signatures and checksums are checked on the way; the destination's own object lock
    applies (its ``retention_days``, or the RetentionPolicy block ``destination_policy``).
    """
    secure_logging()
    log = get_run_logger()
    source, _ = load_repository(repository)
    dest, dest_config = load_repository(destination)
    policy_for = None
    if destination_policy:
        from flows.policy_blocks import load_policy

        policy_for = load_policy(destination_policy).policy_for
    options = CopyOptions(
        backups=True,
        wal=wal,
        evidence=evidence,
        backup_ids=list(backup_ids or []),
        engine=engine,
        target=target,
        since=parse_since(since),
        jobs=jobs,
        policy_for=policy_for,
    )
    report = run_copy(source, dest, dest_config, options)
    s = report["summary"]
    lines = [
        f"- from `{report['source']}` to `{report['destination']}`",
        f"- backups: {s['backups_copied']} copied, {s['backups_skipped']} already there, "
        f"{s['backups_refused']} refused",
        f"- objects: {s['objects_copied']} copied ({human_size(s['bytes_copied'])}), "
        f"{s['objects_skipped']} identical, {s['objects_refused']} refused",
    ]
    if report["errors"]:
        lines.append(f"- **refused: {len(report['errors'])}**: {report['errors'][0][:300]}")
    rows = [
        {"backup": b["backup_id"], "target": f"{b['engine']}/{b['target']}", **b}
        for b in report["backups"]
    ]
    publish(
        f"Copy: {s['backups_copied']} backups, {human_size(s['bytes_copied'])}",
        f"copy-{destination}",
        lines,
        [{k: v for k, v in r.items() if k not in ("engine", "target", "backup_id")} for r in rows],
    )
    for error in report["errors"][:20]:
        log.error("not copied: %s", error)
    if not report["ok"]:
        raise IntegrityError(
            f"copy to {report['destination']} refused {len(report['errors'])} object(s): "
            f"{report['errors'][0][:300]}"
        )
    return {k: v for k, v in report.items() if k != "objects"}
