"""SR-DRILL-01, SR-VERIFY-01: the backups were read back and restored, recently.

A backup nobody has restored is a hope, not a backup: these controls read the restore
drill records (interval, result, restore time against the RTO) and the verification
records (deep verify, else verify runs in the audit trail) of every target.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from strongroom.compliance.check_common import finding, fmt_days, no_feature, target_finding
from strongroom.compliance.evidence import DrillRecord, Evidence
from strongroom.compliance.model import Finding, Status, TargetPolicy

# --------------------------------------------------------------------- drills


def check_drills(ev: Evidence) -> list[Finding]:
    if not ev.drills_feature:
        return no_feature("restore drills")
    findings = []
    max_age = dt.timedelta(days=ev.settings.drill_max_age_days)
    for target in ev.targets:
        records = ev.drills.get(target.key) or []
        if not records:
            findings.append(target_finding(target, "fail", "no restore drill on record"))
            continue
        last = records[-1]
        rto_obj = target.rto_minutes * 60
        data = {
            "drill": last.key,
            "at": last.at.isoformat() if last.at else None,
            "rto_s": last.rto_s,
            "rto_objective_s": rto_obj,
        }
        problems = []
        if last.at is None or ev.now - last.at > max_age:
            age = fmt_days(ev.now - last.at) if last.at else "unknown time"
            problems.append(
                f"last drill {age} ago, interval is {ev.settings.drill_max_age_days:g} days"
            )
        if last.ok is False:
            problems.append(f"last drill {last.key} failed")
        if last.rto_s is None:
            problems.append(f"last drill {last.key} records no restore time")
        elif last.rto_s > rto_obj:
            problems.append(
                f"last drill took {last.rto_s / 60:.1f} min, RTO is {target.rto_minutes:g} min"
            )
        pitr_note, pitr_data = _pitr_drill(ev, target, records)
        data.update(pitr_data)
        if problems:
            message = "; ".join(problems) + pitr_note
            findings.append(target_finding(target, "fail", message, **data))
        else:
            findings.append(
                target_finding(
                    target,
                    "pass",
                    f"drill {fmt_days(ev.now - last.at) if last.at else '?'} ago restored in "
                    f"{(last.rto_s or 0) / 60:.1f} min (RTO {target.rto_minutes:g} min)"
                    + pitr_note,
                    **data,
                )
            )
    return findings or [finding("warn", "targets", "no targets")]


def _pitr_drill(
    ev: Evidence, target: TargetPolicy, records: list[DrillRecord]
) -> tuple[str, dict[str, Any]]:
    """The newest PITR drill of a PITR target (strongroom.drills.pitr), for the drill
    finding: its point, RTO and measured RPO (a note and finding data)."""
    if not ev.is_pitr(target):
        return "", {}
    pitr = [r for r in records if r.raw.get("kind") == "pitr"]
    if not pitr:
        return "; no PITR drill on record", {"pitr_drill": None}
    last = pitr[-1]
    point = (last.raw.get("recovery") or {}).get("target", "?")
    rpo = last.rpo_s
    state = "passed" if last.ok else "FAILED"
    note = (
        f"; PITR drill to {point} {fmt_days(ev.now - last.at) if last.at else '?'} ago "
        f"{state}: RTO {last.rto_s if last.rto_s is not None else '?'} s, "
        f"RPO {rpo if rpo is not None else '?'} s"
    )
    return note, {
        "pitr_drill": last.key,
        "pitr_point": point,
        "pitr_rto_s": last.rto_s,
        "pitr_rpo_s": rpo,
        "pitr_ok": last.ok,
    }


# --------------------------------------------------------------- deep verify


def check_verification(ev: Evidence) -> list[Finding]:
    """Per target: every backup's most recent verification is clean, and the newest
    verification is recent. Deep-verify records when the feature exists; otherwise
    verify runs from the audit trail, which can only warn (not deep)."""
    deep = ev.deep_verify_feature
    if deep:
        source = ev.deep_verifications
        label = "deep verify"
    else:
        source = ev.audit_verifications
        label = "verify (audit trail)"
        if not source:
            return no_feature("deep verify")
    strict: Status = "fail" if deep else "warn"
    max_age = dt.timedelta(days=ev.settings.verify_max_age_days)
    unkeyed = source.get(("*", "*"), [])
    findings = []
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    for target in ev.targets:
        present = _ids(ev, target)
        records = source.get(target.key, []) + [
            r for r in unkeyed if any(b in r.backups for b in present)
        ]
        records.sort(key=lambda r: r.at or epoch)
        if not records:
            findings.append(target_finding(target, strict, f"no {label} on record"))
            continue
        latest_per_backup: dict[str, Any] = {}
        for r in records:
            for b in r.backups or ["?"]:
                latest_per_backup[b] = r
        failed = sorted(
            b for b, r in latest_per_backup.items() if r.ok is False and (b in present or b == "?")
        )
        last = records[-1]
        data = {
            "record": last.key,
            "at": last.at.isoformat() if last.at else None,
            "backups_verified": len(latest_per_backup),
            "failed": failed,
        }
        age = ev.now - last.at if last.at else None
        if failed:
            findings.append(
                target_finding(
                    target,
                    "fail",
                    f"latest {label} of {len(failed)} backup(s) found problems: "
                    + ", ".join(failed[:5]),
                    **data,
                )
            )
        elif last.ok is None:
            findings.append(
                target_finding(target, "warn", f"latest {label} records no result", **data)
            )
        elif age is None or age > max_age:
            findings.append(
                target_finding(
                    target,
                    strict,
                    f"newest {label} is {fmt_days(age) if age else 'of unknown age'}, expected "
                    f"every {ev.settings.verify_max_age_days:g} days",
                    **data,
                )
            )
        else:
            note = "" if deep else " (no deep-verify records: shallow verify only)"
            findings.append(
                target_finding(
                    target,
                    "pass" if deep else "warn",
                    f"{len(latest_per_backup)} backup(s) verified clean, newest {fmt_days(age)} "
                    f"ago{note}",
                    **data,
                )
            )
    return findings or [finding("warn", "targets", "no targets")]


def _ids(ev: Evidence, target: TargetPolicy) -> set[str]:
    return {m.backup_id for m in ev.manifests.get(target.key, [])}
