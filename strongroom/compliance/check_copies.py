"""SR-COPY-01: an off-site copy of each backup within N hours of it.

Reads the signed copy records (``strongroom.copying.records``) in the audited
repository: ``strongroom copy`` writes one into the source (and the destination) once a
backup's manifest is committed at the destination. Per backup finished within the
last ``offsite_copy_lookback_days``:

* pass: a trusted record names another repository and the copy was made within
  ``offsite_copy_hours`` of the backup finishing; or the backup is younger than that
  (not due yet); or this repository is itself the copy (a record naming it as the
  destination);
* warn: copied, but later than ``offsite_copy_hours``;
* fail: older than ``offsite_copy_hours`` and no copy; an untrusted copy record.

No copy record at all: a fail when ``offsite_copy_required`` is set (what an
auditor of ISO 27001 A.8.13 / SOC 2 A1.2 expects: set it once copies are scheduled),
otherwise a pass that says no copy is required, so a repository that does not use
copies is judged by the other controls alone.
"""

from __future__ import annotations

import datetime as dt

from strongroom.compliance.check_common import finding, fmt_hours, target_finding
from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import HIPAA, ISO27001, SOC2, Finding, Status
from strongroom.copying.records import copies_by_backup, list_copies

COPY_CONTROL = (
    "SR-COPY-01",
    "Off-site copy within its window",
    "Every backup is copied to a second repository (another bucket, region or provider) "
    "within the off-site window (24 h by default), checked and signed on the way.",
    {
        SOC2: ["A1.2", "CC7.5"],
        ISO27001: ["A.8.13", "A.5.30"],
        HIPAA: ["164.308(a)(7)(ii)(A)", "164.308(a)(7)(ii)(B)"],
    },
    "copies/<engine>/<target>/<backup_id>/<repository id>.json (signed copy records)",
)


def check_offsite_copies(ev: Evidence) -> list[Finding]:
    settings = ev.settings
    window_s = settings.offsite_copy_hours * 3600
    here = ev.repo.describe()
    records, skipped = list_copies(ev.repo)
    findings = [
        finding("fail", str(s["key"]), f"copy record not trusted: {s['error']}"[:300])
        for s in skipped
    ]
    if not records:
        if settings.offsite_copy_required:
            return [*findings, finding("fail", "copies", "no off-site copy recorded")]
        return findings or [
            finding(
                "pass",
                "copies",
                "no off-site copy recorded; not required (offsite_copy_required is off)",
            )
        ]
    by_backup = copies_by_backup(records)
    horizon = ev.now - dt.timedelta(days=settings.offsite_copy_lookback_days)
    for target in ev.targets:
        for manifest in ev.manifests.get(target.key, []):
            finished = manifest.finished_at.astimezone(dt.UTC)
            if finished < horizon:
                continue
            bid = manifest.backup_id
            mine = by_backup.get(bid, [])
            if any(r.destination == here for r in mine):
                findings.append(
                    target_finding(target, "pass", f"{bid} is a copy held here", backup_id=bid)
                )
                continue
            away = [r for r in mine if r.destination != here]
            age = (ev.now - finished).total_seconds()
            if not away:
                status: Status = "pass" if age <= window_s else "fail"
                what = "not copied yet, within" if status == "pass" else "no off-site copy after"
                findings.append(
                    target_finding(
                        target,
                        status,
                        f"{bid}: {what} {fmt_hours(age)} (window {fmt_hours(window_s)})",
                        backup_id=bid,
                        age_hours=round(age / 3600, 3),
                    )
                )
                continue
            first = min(away, key=lambda r: r.copied_at)
            delay = (first.copied_at - finished).total_seconds()
            status = "pass" if delay <= window_s else "warn"
            findings.append(
                target_finding(
                    target,
                    status,
                    f"{bid} copied to {first.destination} after {fmt_hours(delay)}"
                    + ("" if status == "pass" else f" (window {fmt_hours(window_s)})"),
                    backup_id=bid,
                    destinations=sorted({r.destination for r in away}),
                    delay_hours=round(delay / 3600, 3),
                )
            )
    if not findings:
        findings.append(finding("warn", "catalog", "no backups in the look-back window"))
    return findings
