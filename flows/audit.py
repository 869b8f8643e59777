"""The ``compliance-audit`` flow, and the audit-trail hook for every other flow.

``compliance_audit`` evaluates every control (``strongroom.compliance``)
against the repository and its bucket, writes the JSON and the self-contained
HTML report to ``reports/compliance/`` in the repository and to a local
folder, publishes a markdown and a table artifact, emits one
``strongroom.compliance.violation`` Prefect event per failed finding, appends
an audit event holding the report's SHA-256, and fails the run when a control
fails.

``audit_hook`` is a flow state hook for every strongroom flow::

    @flow(name="backup-postgresql", on_completion=[audit_hook],
          on_failure=[audit_hook], on_crashed=[audit_hook])
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from blocks import TARGET_BLOCK_SLUGS
from flows.alerts import alert_hook, related_resources
from flows.common import load_repository, publish, secure_logging
from strongroom.audit import build_hook, record_event
from strongroom.compliance.evaluate import (
    ComplianceReport,
    Violation,
    evaluate,
    failed_message,
    finding_rows,
    write_report,
)
from strongroom.compliance.model import ComplianceSettings, ControlsFailed, TargetPolicy
from strongroom.config import RepositoryConfig
from strongroom.repository import Repository
from strongroom.transport import transport_of

log = logging.getLogger(__name__)

VIOLATION_EVENT = "strongroom.compliance.violation"
REPORT_DIR_ENV = "STRONGROOM_REPORT_DIR"
DEFAULT_REPORT_DIR = "strongroom-reports"

# Target block type slug -> the engine whose targets it holds.
TARGET_BLOCK_TYPES = {slug: engine for engine, slug in TARGET_BLOCK_SLUGS.items()}


def _open_repo(name: str) -> Repository:
    return load_repository(name)[0]


_hook = build_hook(_open_repo)


def audit_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect flow state hook: one audit event per finished run (who, what, target,
    backup id, checksums, result) in the run's ``repository``. Never raises."""
    _hook(flow, flow_run, state)


# flow options for every operation flow: one audit event per finished run
# The alert hook runs first, so its event goes out even when the audit write then hangs
# on the same dead storage that failed the run.
AUDITED: dict[str, Any] = {
    "on_completion": [audit_hook],
    "on_failure": [alert_hook, audit_hook],
    "on_crashed": [alert_hook, audit_hook],
}


def discover_targets(settings: ComplianceSettings | None = None) -> list[TargetPolicy]:
    """Every target block registered with the Prefect API, with its RPO/RTO."""
    from prefect.client.orchestration import get_client

    s = settings or ComplianceSettings()
    found: list[TargetPolicy] = []
    with get_client(sync_client=True) as client:
        for slug, engine in TARGET_BLOCK_TYPES.items():
            try:
                docs = client.read_block_documents_by_type(slug, include_secrets=False)
            except Exception as exc:  # type not registered on this server: no such targets
                log.debug("no %s blocks: %s", slug, exc)
                continue
            for doc in docs:
                if not doc.name or doc.is_anonymous:
                    continue
                data = doc.data or {}
                retention = data.get("retention")
                found.append(
                    TargetPolicy(
                        engine=engine,
                        target=doc.name,
                        rpo_hours=float(data.get("rpo_hours") or s.default_rpo_hours),
                        rto_minutes=float(data.get("rto_minutes") or s.default_rto_minutes),
                        pitr=data.get("pitr") if isinstance(data.get("pitr"), bool) else None,
                        retention=retention if isinstance(retention, dict) else None,
                        source=f"block {slug}/{doc.name}",
                        transport=transport_of(engine, data),
                    )
                )
    return found


def load_policy_block(name: str | None) -> Any | None:
    """The RetentionPolicyBlock ``name`` (flows/retention.py), or None if there is none."""
    if not name:
        return None
    try:
        from flows.policy_blocks import try_load_policy
    except ImportError:  # retention feature not installed
        return None
    return try_load_policy(name)


def settings_from_policy(block: Any | None, overrides: dict[str, Any] | None) -> ComplianceSettings:
    """Thresholds: the policy block's drill interval (+1 day of slack for a weekly
    schedule) and default objectives, then explicit ``overrides``."""
    base: dict[str, Any] = {}
    if block is not None:
        base["drill_max_age_days"] = float(block.drill_interval_days) + 1.0
        if getattr(block, "default_rpo_hours", None):
            base["default_rpo_hours"] = float(block.default_rpo_hours)
        if getattr(block, "default_rto_minutes", None):
            base["default_rto_minutes"] = float(block.default_rto_minutes)
    return ComplianceSettings(**{**base, **(overrides or {})})


@task(cache_policy=NO_CACHE)
def evaluate_controls(
    repo: Repository,
    repo_config: RepositoryConfig | None,
    targets: list[TargetPolicy],
    settings: ComplianceSettings,
    retention: dict[str, Any] | None,
    policy_block: Any | None = None,
) -> ComplianceReport:
    retention_for = None
    if policy_block is not None:

        def retention_for(engine: str, target: str) -> dict[str, Any]:
            return dict(policy_block.policy_for(engine, target).model_dump())

    return evaluate(
        repo,
        config=repo_config,
        targets=targets,
        settings=settings,
        retention=retention,
        retention_for=retention_for,
    )


@task(cache_policy=NO_CACHE)
def store_report(
    repo: Repository, report: ComplianceReport, output_dir: str | None
) -> dict[str, str]:
    local: Path | None = Path(output_dir) if output_dir else None
    try:
        return write_report(repo, report, local_dir=local)
    except OSError as exc:  # e.g. a read-only root file system: the repository copy counts
        get_run_logger().warning("could not write the local report copy (%s): %s", local, exc)
        return write_report(repo, report, local_dir=None)


def emit_violations(report: ComplianceReport, repository: str) -> int:
    """One ``strongroom.compliance.violation`` event per failed finding."""
    sent = 0
    for v in report.violations():
        emit_event(
            event=VIOLATION_EVENT,
            resource=_violation_resource(v, repository),
            related=_related(v, repository),
            payload={
                "control": v.control_id,
                "control_title": v.control_title,
                "framework": "; ".join(f"{k} {', '.join(r)}" for k, r in v.frameworks.items()),
                "frameworks": v.frameworks,
                "subject": v.subject,
                "detail": v.message,
                "engine": v.engine,
                "target": v.target,
                "repository": repository,
                "report_id": report.report_id,
                "report": report.locations.get("html", ""),
            },
        )
        sent += 1
    return sent


def _violation_resource(v: Violation, repository: str) -> dict[str, str]:
    resource = {
        "prefect.resource.id": v.resource_id(repository),
        "prefect.resource.name": f"{v.engine}/{v.target}" if v.target else repository,
        "strongroom.control": v.control_id,
    }
    if v.engine and v.target:
        resource["strongroom.engine"] = v.engine
        resource["strongroom.target"] = v.target
    return resource


def _related(
    v: Violation | None, repository: str, engine: str | None = None
) -> list[dict[str, str]]:
    engine = engine or (v.engine if v else None)
    related = related_resources(repository, engine, "compliance")
    if v is not None:
        related.append(
            {
                "prefect.resource.id": f"strongroom.control.{v.control_id}",
                "prefect.resource.role": "control",
            }
        )
    return related


def default_report_dir() -> str:
    return os.environ.get(REPORT_DIR_ENV, DEFAULT_REPORT_DIR)


@flow(name="compliance-audit")
def compliance_audit(
    repository: str = "default",
    output_dir: str | None = None,
    targets: list[dict[str, Any]] | None = None,
    retention: dict[str, Any] | None = None,
    policy: str | None = "default",
    settings: dict[str, Any] | None = None,
    discover: bool = True,
    fail_on_violation: bool = True,
) -> dict[str, Any]:
    """Evaluate every compliance control; write the JSON and HTML report; publish an
    artifact; emit an event per violation; fail the run if a control fails.

    ``targets`` (TargetPolicy fields) add to or override the target blocks found on the
    Prefect API (``discover``). The retention policy per target comes from the
    RetentionPolicyBlock ``policy`` (with its per-target overrides, drill interval and
    default objectives) when it exists; ``retention`` (RetentionPolicy fields) is used
    for targets it does not cover. ``settings`` override ComplianceSettings thresholds;
    ``output_dir`` gets a local copy (default ``$STRONGROOM_REPORT_DIR`` or
    ``./strongroom-reports``).
    """
    secure_logging()
    logger = get_run_logger()
    repo, repo_config = load_repository(repository)
    block = load_policy_block(policy)
    cfg = settings_from_policy(block, settings)
    found = {t.key: t for t in (discover_targets(cfg) if discover else [])}
    for item in targets or []:
        t = TargetPolicy(**{**item, "source": item.get("source", "flow parameter")})
        found[t.key] = t
    report = evaluate_controls(repo, repo_config, list(found.values()), cfg, retention, block)
    keys = store_report(repo, report, output_dir or default_report_dir())
    summary = report.summary()
    publish(
        f"Compliance audit: {summary['status'].upper()}",
        "compliance-audit",
        report.markdown().split("\n", 2)[2].splitlines(),
        finding_rows(report),
    )
    sent = emit_violations(report, repository)
    report_sha = hashlib.sha256(report.model_dump_json(indent=2).encode()).hexdigest()
    record_event(
        repo,
        action="compliance-audit",
        engine=None,
        target=None,
        backup_id=None,
        result=summary["status"],
        details={
            "report_id": report.report_id,
            "report_keys": {k: v for k, v in keys.items() if k.endswith("_key")},
            "summary": summary,
            "audit_head_seen": report.audit_head,
            "violations": sent,
        },
        checksums={keys["json_key"]: report_sha},
    )
    logger.info(
        "compliance audit: %s pass, %s warn, %s fail; report %s",
        summary["pass"],
        summary["warn"],
        summary["fail"],
        keys.get("html"),
    )
    result = {
        "ok": summary["fail"] == 0,
        "summary": summary,
        "paths": keys,
        "violations": sent,
        "audit_head": report.audit_head,
        "controls": [
            {"id": c.id, "status": c.status, "title": c.title, "summary": c.summary}
            for c in report.controls
        ],
    }
    if summary["fail"] and fail_on_violation:
        logger.error("%s", failed_message(report))
        raise ControlsFailed(failed_message(report), result)
    return result


def write_compliance_report(
    repository: str = "default",
    output_dir: str | Path | None = None,
    **kwargs: Any,
) -> tuple[Path, dict[str, Any]]:
    """For ``make demo``: run the compliance-audit flow without failing the run, and
    return (local HTML report path, summary dict with pass/warn/fail counts and ids)."""
    result = compliance_audit(
        repository=repository,
        output_dir=str(output_dir) if output_dir is not None else None,
        fail_on_violation=False,
        **kwargs,
    )
    return Path(result["paths"]["html"]), {**result["summary"], "controls": result["controls"]}
