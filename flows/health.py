"""The ``backup-health`` flow: backup freshness against each target's RPO.

Runs often (every 15 minutes by default), reads only the catalog, and emits one
``strongroom.backup.stale`` Prefect event per target whose newest backup is
older than its RPO (or that has none); the automations route those to Slack.
A manifest not signed by a trusted key (``strongroom.signing``: e.g. planted by a
bucket writer to fake a fresh backup) never counts as a backup; each one is reported
as a ``strongroom.manifest.untrusted`` event on its target and in the result.
The run itself succeeds: a stale backup is an alert, not a failed health check
(a failed run would page twice through the failed-run automation).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from flows.audit import discover_targets, load_policy_block, settings_from_policy
from flows.common import load_repository, publish, secure_logging
from strongroom.compliance.evaluate import health_rows
from strongroom.compliance.model import ComplianceSettings, TargetPolicy
from strongroom.repository import Repository

STALE_EVENT = "strongroom.backup.stale"
UNTRUSTED_EVENT = "strongroom.manifest.untrusted"


@task(cache_policy=NO_CACHE)
def check_freshness(
    repo: Repository, targets: list[TargetPolicy], settings: ComplianceSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every target's freshness, the catalog entries not trusted)."""
    rows, _stale, untrusted = health_rows(repo, targets, settings=settings)
    return rows, untrusted


def _related(engine: str | None, repository: str) -> list[dict[str, str]]:
    tags = ["strongroom", *([engine] if engine else [])]
    return [
        *(
            {"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"}
            for t in tags
        ),
        {
            "prefect.resource.id": f"strongroom.repository.{repository}",
            "prefect.resource.role": "repository",
        },
    ]


def emit_untrusted(row: dict[str, Any], repository: str) -> None:
    named = f"{row['engine']}/{row['target']}" if row["engine"] else "catalog"
    emit_event(
        event=UNTRUSTED_EVENT,
        resource={
            "prefect.resource.id": row["resource_id"],
            "prefect.resource.name": named,
            "strongroom.engine": row["engine"] or "",
            "strongroom.target": row["target"] or "",
        },
        related=_related(row["engine"], repository),
        payload={
            "key": row["key"],
            "status": row["status"],
            "detail": row["error"],
            "repository": repository,
        },
    )


def emit_stale(row: dict[str, Any], repository: str) -> None:
    emit_event(
        event=STALE_EVENT,
        resource={
            "prefect.resource.id": row["resource_id"],
            "prefect.resource.name": f"{row['engine']}/{row['target']}",
            "strongroom.engine": row["engine"],
            "strongroom.target": row["target"],
        },
        related=[
            {"prefect.resource.id": "prefect.tag.strongroom", "prefect.resource.role": "tag"},
            {"prefect.resource.id": f"prefect.tag.{row['engine']}", "prefect.resource.role": "tag"},
            {
                "prefect.resource.id": f"strongroom.repository.{repository}",
                "prefect.resource.role": "repository",
            },
        ],
        payload={
            "engine": row["engine"],
            "target": row["target"],
            "rpo_hours": row["rpo_hours"],
            "age_hours": row["age_hours"],
            "last_backup_id": row["backup_id"],
            "last_backup_at": row["finished_at"],
            "detail": row["message"],
            "repository": repository,
        },
    )


@flow(name="backup-health")
def backup_health(
    repository: str = "default",
    targets: list[dict[str, Any]] | None = None,
    discover: bool = True,
    default_rpo_hours: float | None = None,
    policy: str | None = "default",
) -> dict[str, Any]:
    """Check every target's newest backup against its RPO; emit strongroom.backup.stale
    for each stale one. ``targets`` (TargetPolicy fields) add to the target blocks.
    Targets without an RPO of their own get ``default_rpo_hours``, else the policy
    block's default, else 24 h."""
    secure_logging()
    logger = get_run_logger()
    repo, _ = load_repository(repository)
    overrides = {"default_rpo_hours": default_rpo_hours} if default_rpo_hours else {}
    settings = settings_from_policy(load_policy_block(policy), overrides)
    found = {t.key: t for t in (discover_targets(settings) if discover else [])}
    for item in targets or []:
        t = TargetPolicy(**{**item, "source": item.get("source", "flow parameter")})
        found[t.key] = t
    rows, untrusted = check_freshness(repo, list(found.values()), settings)
    stale = [r for r in rows if r["stale"]]
    for row in stale:
        emit_stale(row, repository)
        logger.warning("stale: %s/%s: %s", row["engine"], row["target"], row["message"])
    for bad in untrusted:
        emit_untrusted(bad, repository)
        logger.warning("not trusted, not counted as a backup: %s: %s", bad["key"], bad["error"])
    publish(
        f"Backup health: {len(stale)} of {len(rows)} target(s) stale, "
        f"{len(untrusted)} manifest(s) not trusted",
        "backup-health",
        [f"- {r['engine']}/{r['target']}: {r['message']}" for r in rows]
        + [f"- NOT TRUSTED {u['key']}: {u['error']}" for u in untrusted]
        or ["- no targets"],
        [
            {
                "target": f"{r['engine']}/{r['target']}",
                "stale": r["stale"],
                "age_hours": r["age_hours"],
                "rpo_hours": r["rpo_hours"],
                "backup_id": r["backup_id"] or "",
            }
            for r in rows
        ],
    )
    return {
        "ok": not stale and not untrusted,
        "targets": rows,
        "stale": [f"{r['engine']}/{r['target']}" for r in stale],
        "untrusted": [{k: u[k] for k in ("key", "status", "error")} for u in untrusted],
    }
