"""Prefect flow ``apply-retention``: keep exactly what the policy says, respecting object lock."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger, task

from flows.audit import AUDITED
from flows.common import (
    TRANSIENT_TASK,
    human_size,
    load_repository,
    publish,
    secure_logging,
)
from flows.policy_blocks import load_policy
from strongroom.errors import StrongroomError
from strongroom.policy.prune import prune
from strongroom.repository import Repository


@task(**TRANSIENT_TASK)
def run_prune(
    repo: Repository,
    block: Any,
    engine: str | None,
    target: str | None,
    dry_run: bool,
    orphan_grace_hours: float,
    clean_orphans: bool,
    prune_wal: bool,
) -> dict[str, Any]:
    report = prune(
        repo,
        block.policy_for,
        engine=engine,
        target=target,
        dry_run=dry_run,
        orphan_grace=dt.timedelta(hours=orphan_grace_hours),
        clean_orphans=clean_orphans,
        prune_wal_archive=prune_wal,
    )
    return report.to_dict()


@flow(name="apply-retention", **AUDITED)
def apply_retention(
    policy: str = "default",
    repository: str = "default",
    engine: str | None = None,
    target: str | None = None,
    dry_run: bool = False,
    orphan_grace_hours: float | None = None,
    clean_orphans: bool = True,
    prune_wal: bool = True,
) -> dict[str, Any]:
    """Apply the RetentionPolicyBlock ``policy`` to every backup (or one engine/target).

    Deletes manifest first, then data; never touches a locked object (reported as
    "locked until ..."); cleans orphans and interrupted uploads older than the grace
    period; drops PITR WAL older than the oldest retained base backup. ``dry_run``
    reports what would go and which rule keeps the rest, changing nothing.
    """
    secure_logging()
    log = get_run_logger()
    block = load_policy(policy)
    repo, _ = load_repository(repository)
    grace = block.orphan_grace_hours if orphan_grace_hours is None else orphan_grace_hours
    report = run_prune(repo, block, engine, target, dry_run, grace, clean_orphans, prune_wal)
    s = report["summary"]
    verb = "would delete" if dry_run else "deleted"
    gone = s["would_delete"] if dry_run else s["deleted"]
    lines = [
        f"- repository: `{repo.describe()}`"
        + (" (**dry run**: nothing changed)" if dry_run else ""),
        *(f"- policy for `{k}`: {v}" for k, v in report["policies"].items()),
        f"- backups: {s['backups']}, kept {s['kept']}, {verb} {gone}, locked {s['locked']}",
        f"- space {'that would be freed' if dry_run else 'freed'}: {human_size(s['bytes_freed'])}",
        f"- orphans: {s['orphans']}; interrupted uploads removed: "
        f"{report['incomplete_uploads_removed']}",
        f"- WAL segments {verb}: "
        f"{s['wal_segments_would_delete'] if dry_run else s['wal_segments_deleted']}",
    ]
    if report["dangling"]:
        lines.append(f"- **manifests with missing data: {len(report['dangling'])}**")
    if report["findings"]:  # counts only: the keys come from the bucket
        pins = sum(1 for f in report["findings"] if f["reason"] == "untrusted-pin")
        lines.append(
            f"- **not trusted, left alone: {len(report['findings'])}** (of which {pins} "
            "pins not signed by a trusted key: they still protect their backups)"
        )
    if report["errors"]:
        lines.append(f"- **errors: {len(report['errors'])}**: {report['errors'][0]}")
    rows = [
        {
            "backup": b["backup_id"],
            "target": f"{b['engine']}/{b['target']}",
            "kind": b["kind"],
            "action": b["action"],
            "rule": b["rule"] or "",
            "why": b["detail"],
        }
        for b in report["backups"]
    ]
    publish(
        f"Retention {'plan' if dry_run else 'applied'}: {gone} {verb}, {s['locked']} locked",
        f"retention-{engine or 'all'}-{target or 'all'}",
        lines,
        rows,
    )
    for b in report["backups"]:
        if b["action"] in ("deleted", "would-delete", "locked", "error"):
            log.info("%s %s: %s", b["action"], b["backup_id"], b["detail"])
    if not report["ok"]:
        errors = report["errors"] or [
            f"{b['backup_id']}: {b['detail']}" for b in report["backups"] if b["action"] == "error"
        ]
        raise StrongroomError(f"retention finished with errors: {errors[0]}")
    return report
