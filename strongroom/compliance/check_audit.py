"""SR-AUDIT-01, SR-DOC-01: the evidence an auditor reads is intact and kept long enough.

The other controls are only as good as their records: these check the hash-chained
audit trail (no event removed, reordered or edited; the head matches earlier reports'
anchors) and that audit events, drill and verification records and reports are locked
for the documentation retention period.
"""

from __future__ import annotations

import datetime as dt

from strongroom.compliance.check_common import as_utc, finding
from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import Finding, Status

# ---------------------------------------------------------------- audit chain


def check_audit_chain(ev: Evidence) -> list[Finding]:
    chain = ev.chain
    data = {
        "events": chain.events,
        "head_seq": chain.head_seq,
        "head_sha256": chain.head_sha256,
        "anchors_checked": chain.anchors_checked,
        "versions_checked": chain.versions_checked,
    }
    if chain.problems:
        return [
            finding(
                "fail", f"audit/{p.seq}" if p.seq else "audit/", f"{p.kind}: {p.detail}", **data
            )
            for p in chain.problems[:30]
        ]
    if chain.events == 0:
        return [finding("warn", "audit/", "no audit events recorded yet", **data)]
    extra = []
    if chain.anchors_checked:
        extra.append(f"{chain.anchors_checked} anchor(s) from earlier reports match")
    if chain.versions_checked:
        extra.append("no audit object overwritten or deleted (bucket versions)")
    return [
        finding(
            "pass",
            "audit/",
            f"{chain.events} events chained, head {chain.head_seq} "
            f"{chain.head_sha256[:12]}" + (f"; {'; '.join(extra)}" if extra else ""),
            **data,
        )
    ]


# ------------------------------------------------------- evidence retention


def check_evidence_retention(ev: Evidence) -> list[Finding]:
    years = ev.settings.evidence_floor_years
    if not ev.is_s3:
        return [
            finding(
                "fail",
                ev.repo.describe(),
                f"a local folder cannot guarantee evidence is kept {years:g} years (no "
                "retention lock); use an S3 repository with object lock",
            )
        ]
    floor = dt.timedelta(days=ev.settings.evidence_floor_days)
    objects = ev.evidence_objects()[: ev.settings.max_objects_checked]
    findings = []
    short = []
    for info in objects:
        head = ev.head(info.key)
        if head is None:
            continue
        until = as_utc(head.get("ObjectLockRetainUntilDate"))
        created = as_utc(head.get("LastModified")) or info.modified
        if until is None or until + dt.timedelta(minutes=5) < created + floor:
            short.append((info.key, until))
    for key, until in short[:20]:
        findings.append(
            finding(
                "fail",
                key,
                f"evidence {key} "
                + (f"is locked only until {until:%Y-%m-%d}" if until else "is not locked")
                + f": must be kept {years:g} years",
            )
        )
    if len(short) > 20:
        findings.append(finding("fail", "evidence", f"{len(short) - 20} more evidence objects"))
    if not objects:
        cfg = ev.config
        days = cfg.retention_days if cfg is not None and cfg.lock_mode else 0
        status: Status = "pass" if days >= ev.settings.evidence_floor_days else "warn"
        findings.append(
            finding(
                status,
                "evidence",
                f"no evidence objects yet; the repository locks new objects {days} days",
            )
        )
    elif not short:
        findings.append(
            finding(
                "pass", "evidence", f"{len(objects)} evidence object(s) locked >= {years:g} years"
            )
        )
    return findings
