"""Run every control against a repository and build the report (JSON + HTML).

``evaluate`` is pure reading; ``write_report`` stores the JSON and HTML under
``reports/compliance/<report_id>.{json,html}`` in the repository (never
overwriting; both signed) and, optionally, in a local folder. The report records the audit
chain head it saw (``audit_head``): the next evaluation uses it as an anchor,
so an edited or truncated tail of the chain is detected (only a report signed by a
trusted key provides that anchor).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from strongroom.compliance.controls import CONTROLS, Control
from strongroom.compliance.evidence import REPORTS_PREFIX, Evidence
from strongroom.compliance.model import (
    ComplianceSettings,
    ControlResult,
    ControlsFailed,
    TargetPolicy,
    worst,
)
from strongroom.config import RepositoryConfig
from strongroom.repository.base import Repository

REPORT_FORMAT = 1

__all__ = [
    "ComplianceReport",
    "ComplianceSettings",
    "ControlsFailed",
    "TargetPolicy",
    "Violation",
    "evaluate",
    "health_rows",
    "stale_targets",
    "write_report",
]


class Violation(BaseModel):
    """A failed finding, as sent in a ``strongroom.compliance.violation`` event."""

    control_id: str
    control_title: str
    frameworks: dict[str, list[str]]
    subject: str
    message: str
    engine: str | None = None
    target: str | None = None

    def resource_id(self, repository: str) -> str:
        """``strongroom.target.<engine>.<target>``, or for repository-wide findings
        (bucket settings, audit chain) ``strongroom.repository.<repository>``."""
        if self.engine and self.target:
            return f"strongroom.target.{self.engine}.{self.target}"
        return f"strongroom.repository.{repository}"


class ComplianceReport(BaseModel):
    format_version: int = REPORT_FORMAT
    report_id: str
    generated_at: dt.datetime
    repository: str
    repository_kind: str
    settings: ComplianceSettings
    targets: list[TargetPolicy]
    controls: list[ControlResult]
    audit_head: dict[str, Any] = Field(default_factory=dict)
    series: dict[str, Any] = Field(default_factory=dict, description="chart data")
    locations: dict[str, str] = Field(default_factory=dict, description="where it was written")

    @property
    def status(self) -> str:
        return worst([c.status for c in self.controls])

    def summary(self) -> dict[str, Any]:
        counts = {
            s: sum(1 for c in self.controls if c.status == s) for s in ("pass", "warn", "fail")
        }
        return {
            "status": self.status,
            "controls": len(self.controls),
            **counts,
            "failed": [c.id for c in self.controls if c.status == "fail"],
            "warned": [c.id for c in self.controls if c.status == "warn"],
            "report_id": self.report_id,
        }

    def violations(self) -> list[Violation]:
        found = []
        for c in self.controls:
            for f in c.findings:
                if f.status == "fail":
                    found.append(
                        Violation(
                            control_id=c.id,
                            control_title=c.title,
                            frameworks=c.frameworks,
                            subject=f.subject,
                            message=f.message,
                            engine=f.engine,
                            target=f.target,
                        )
                    )
        return found

    def markdown(self) -> str:
        s = self.summary()
        lines = [
            f"# Compliance audit: **{s['status'].upper()}**",
            "",
            f"- repository: `{self.repository}`",
            f"- generated: {self.generated_at.isoformat(timespec='seconds')}",
            f"- controls: {s['pass']} pass, {s['warn']} warn, {s['fail']} fail",
            f"- audit chain head: {self.audit_head.get('seq')} "
            f"`{str(self.audit_head.get('sha256', ''))[:16]}`",
        ]
        if self.locations:
            lines.append(f"- report: `{self.locations.get('html', '')}`")
        lines += [
            "",
            "| control | status | title | frameworks | summary |",
            "|---|---|---|---|---|",
        ]
        for c in self.controls:
            refs = "; ".join(f"{k} {', '.join(v)}" for k, v in c.frameworks.items())
            summary = c.summary.replace("|", "\\|")
            lines.append(f"| {c.id} | {c.status.upper()} | {c.title} | {refs} | {summary} |")
        return "\n".join(lines)


def _new_report_id(now: dt.datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def evaluate(
    repo: Repository,
    *,
    config: RepositoryConfig | None = None,
    targets: list[TargetPolicy] | None = None,
    settings: ComplianceSettings | None = None,
    retention: dict[str, Any] | None = None,
    retention_for: Callable[[str, str], dict[str, Any] | None] | None = None,
    anchors: dict[int, str] | None = None,
    now: dt.datetime | None = None,
    controls: list[Control] | None = None,
) -> ComplianceReport:
    """Evaluate ``controls`` (all by default) against the repository's evidence.

    ``targets`` carry each target's RPO/RTO (from its block); targets found only in
    the repository get the default objectives. ``retention`` is the default retention
    policy (RetentionPolicy fields) for targets that have none of their own;
    ``retention_for(engine, target)`` is asked first (e.g. a RetentionPolicyBlock's
    per-target overrides).
    """
    ev = Evidence(
        repo,
        config=config,
        targets=targets,
        settings=settings,
        now=now,
        retention=retention,
        retention_for=retention_for,
        anchors=anchors,
    )
    results = [c.run(ev) for c in (controls or CONTROLS)]
    chain = ev.chain
    return ComplianceReport(
        report_id=_new_report_id(ev.now),
        generated_at=ev.now,
        repository=repo.describe(),
        repository_kind="s3" if ev.is_s3 else "local" if ev.is_local else "other",
        settings=ev.settings,
        targets=ev.targets,
        controls=results,
        audit_head={"seq": chain.head_seq, "sha256": chain.head_sha256, "ok": chain.ok},
        series=chart_series(ev),
    )


def chart_series(ev: Evidence) -> dict[str, Any]:
    """What the charts draw: backups over time, freshness vs RPO, drill RTO history."""
    backups: dict[str, list[dict[str, Any]]] = {}
    for (engine, target), items in sorted(ev.manifests.items()):
        backups[f"{engine}/{target}"] = [
            {
                "backup_id": m.backup_id,
                "finished_at": m.finished_at.isoformat(),
                "stored_size": m.stored_size,
                "raw_size": m.raw_size,
                "duration_s": round(m.duration_s, 3),
            }
            for m in items
        ]
    freshness = []
    for t in ev.targets:
        latest = ev.latest(t.key)
        age = (ev.now - latest.finished_at).total_seconds() / 3600 if latest else None
        freshness.append(
            {
                "target": f"{t.engine}/{t.target}",
                "age_hours": round(age, 3) if age is not None else None,
                "rpo_hours": t.rpo_hours,
                "stale": age is None or age > t.rpo_hours,
            }
        )
    drills: dict[str, list[dict[str, Any]]] = {}
    objectives: dict[str, float] = {}
    for t in ev.targets:
        objectives[f"{t.engine}/{t.target}"] = t.rto_minutes * 60
    for (engine, target), records in sorted(ev.drills.items()):
        drills[f"{engine}/{target}"] = [
            {
                "at": r.at.isoformat() if r.at else None,
                "rto_s": r.rto_s,
                "rpo_s": r.rpo_s,
                "kind": r.raw.get("kind") or "logical",
                "ok": r.ok,
                "key": r.key,
            }
            for r in records
            if r.at is not None and r.rto_s is not None
        ]
    return {
        "backups": backups,
        "freshness": freshness,
        "drills": drills,
        "rto_objectives_s": objectives,
    }


def stale_targets(
    repo: Repository,
    targets: list[TargetPolicy] | None = None,
    *,
    settings: ComplianceSettings | None = None,
    now: dt.datetime | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every target's freshness, the stale ones) for the backup-health flow."""
    rows, stale, _untrusted = health_rows(repo, targets, settings=settings, now=now)
    return rows, stale


def untrusted_rows(ev: Evidence) -> list[dict[str, Any]]:
    """The catalog entries that do not count as backups (not signed by a trusted key,
    malformed, misplaced): key, status, error and the target resource named by the key."""
    from strongroom.compliance.check_signatures import target_of_key

    rows = []
    for item in ev.manifest_findings:
        key = str(item["key"])
        engine, target = target_of_key(key)
        rows.append(
            {
                "key": key,
                "status": str(item["status"]),
                "error": str(item["error"]).splitlines()[0][:300] if item["error"] else "",
                "engine": engine,
                "target": target,
                "resource_id": f"strongroom.target.{engine}.{target}"
                if engine and target
                else "strongroom.catalog",
            }
        )
    return rows


def health_rows(
    repo: Repository,
    targets: list[TargetPolicy] | None = None,
    *,
    settings: ComplianceSettings | None = None,
    now: dt.datetime | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(every target's freshness, the stale ones, the untrusted catalog entries): an
    untrusted manifest never counts as a backup, so never as a fresh one."""
    from strongroom.compliance.controls import check_freshness

    ev = Evidence(repo, targets=targets, settings=settings, now=now)
    rows: list[dict[str, Any]] = []
    by_key = {t.key: t for t in ev.targets}
    for f in check_freshness(ev):
        if f.engine is None or f.target is None:
            continue
        t = by_key[(f.engine, f.target)]
        rows.append(
            {
                "engine": f.engine,
                "target": f.target,
                "stale": f.status == "fail",
                "rpo_hours": t.rpo_hours,
                "age_hours": f.data.get("age_hours"),
                "backup_id": f.data.get("backup_id"),
                "finished_at": f.data.get("finished_at"),
                "message": f.message,
                "resource_id": t.resource_id,
            }
        )
    return rows, [r for r in rows if r["stale"]], untrusted_rows(ev)


def write_report(
    repo: Repository,
    report: ComplianceReport,
    *,
    local_dir: Path | str | None = None,
) -> dict[str, str]:
    """Store ``<report_id>.json`` and ``.html`` under reports/compliance/ in the repository
    (no overwrite), each signed (``.sig``: the next evaluation takes its audit anchor
    only from a trusted report, and an auditor can check them offline with
    ``strongroom verify-signature``), and in ``local_dir`` if given. Returns the keys
    and paths written."""
    from strongroom.compliance.report_html import render_html
    from strongroom.signing import put_signed

    repo.trust.require_signer("a compliance report")

    base = f"{REPORTS_PREFIX}{report.report_id}"
    keys = {"json_key": f"{base}.json", "html_key": f"{base}.html"}
    written = dict(keys)
    if local_dir is not None:
        folder = Path(local_dir)
        written["json"] = str((folder / f"compliance-{report.report_id}.json").absolute())
        written["html"] = str((folder / f"compliance-{report.report_id}.html").absolute())
    else:
        written["json"] = f"{repo.describe().rstrip('/')}/{keys['json_key']}"
        written["html"] = f"{repo.describe().rstrip('/')}/{keys['html_key']}"
    report.locations = written
    body = report.model_dump_json(indent=2).encode()
    html = render_html(report).encode()
    put_signed(repo, keys["json_key"], body, overwrite=False)
    put_signed(repo, keys["html_key"], html, overwrite=False)
    if local_dir is not None:
        folder = Path(local_dir)
        folder.mkdir(parents=True, exist_ok=True)
        Path(written["json"]).write_bytes(body)
        Path(written["html"]).write_bytes(html)
    return written


def failed_message(report: ComplianceReport) -> str:
    s = report.summary()
    return (
        f"{s['fail']} of {s['controls']} compliance controls failed: {', '.join(s['failed'])}"
        f" (report {report.locations.get('html', report.report_id)})"
    )


def finding_rows(report: ComplianceReport) -> list[dict[str, Any]]:
    """One row per finding, for a Prefect table artifact."""
    rows = []
    for c in report.controls:
        for f in c.findings:
            rows.append(
                {
                    "control": c.id,
                    "status": f.status,
                    "subject": f.subject,
                    "message": f.message,
                }
            )
    return rows
