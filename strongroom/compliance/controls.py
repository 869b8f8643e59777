"""The controls: id, description, framework references, the evidence read, the check.

Framework references:

* SOC 2 (AICPA Trust Services Criteria 2017, rev. 2022): A1.2 (backup and
  recovery infrastructure), A1.3 (recovery plan testing), CC6.1 (logical access,
  encryption), CC7.2-CC7.5 (monitoring, evaluating events, response, recovery).
* ISO/IEC 27001:2022 Annex A: A.8.13 (information backup), A.8.24 (use of
  cryptography), A.8.15 (logging), A.5.33 (protection of records), A.5.30 (ICT
  readiness for business continuity), A.8.3 (information access restriction).
* HIPAA Security Rule (45 CFR): 164.308(a)(7)(ii)(A) data backup plan, (B) disaster
  recovery plan, (D) testing and revision; 164.312(a)(2)(iv) encryption;
  164.312(b) audit controls; 164.312(c)(1) integrity; 164.316(b)(2)(i)
  documentation kept 6 years.

A control passes when every finding passes, warns when the worst finding is a
warning (including "no evidence found: feature not present"), fails otherwise.
"""

from __future__ import annotations

import datetime as dt
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strongroom.compliance.check_signatures import SIGNATURE_CONTROL, check_signatures
from strongroom.compliance.check_transport import check_transport
from strongroom.compliance.evidence import Evidence, segment_name
from strongroom.compliance.model import (
    HIPAA,
    ISO27001,
    SOC2,
    ControlResult,
    Finding,
    Status,
    TargetPolicy,
    worst,
)

CLIENT_SIDE_ENCRYPTION = ("age-x25519", "age-scrypt", "age", "aes-256-gcm")
STRONG_SSE = ("aws:kms", "aws:kms:dsse", "AES256")


@dataclass(frozen=True)
class Control:
    id: str
    title: str
    description: str
    frameworks: dict[str, list[str]]
    evidence: str
    check: Callable[[Evidence], list[Finding]]

    def run(self, ev: Evidence) -> ControlResult:
        try:
            findings = self.check(ev)
        except Exception as exc:  # evidence that cannot be read is not evidence
            findings = [
                Finding(
                    status="fail",
                    subject="evaluation",
                    message=f"could not evaluate: {type(exc).__name__}: {exc}"[:500],
                )
            ]
        status = worst([f.status for f in findings]) if findings else "pass"
        return ControlResult(
            id=self.id,
            title=self.title,
            description=self.description,
            frameworks=self.frameworks,
            status=status,
            summary=_summary(status, findings),
            evidence=[self.evidence],
            findings=findings,
        )


def _summary(status: Status, findings: list[Finding]) -> str:
    if not findings:
        return "nothing to check"
    bad = [f for f in findings if f.status == status]
    if status == "pass":
        if len(findings) == 1:
            return findings[0].message
        shown = "; ".join(f"{f.subject}: {f.message}" for f in findings[:2])
        return shown + (f" (+{len(findings) - 2} more)" if len(findings) > 2 else "")
    first = bad[0].message
    more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"{first}{more}"


def _t(target: TargetPolicy, status: Status, message: str, **data: Any) -> Finding:
    return Finding(
        status=status,
        subject=f"{target.engine}/{target.target}",
        message=message,
        engine=target.engine,
        target=target.target,
        data=data,
    )


def _f(status: Status, subject: str, message: str, **data: Any) -> Finding:
    return Finding(status=status, subject=subject, message=message, data=data)


def _no_feature(feature: str) -> list[Finding]:
    return [
        _f(
            "warn",
            feature,
            f"warn: no evidence found (feature {feature} not present)",
            feature=feature,
        )
    ]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _days(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.1f} days"


def _utc(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, str):
        try:
            return _utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


# ------------------------------------------------------------------ freshness


def check_freshness(ev: Evidence) -> list[Finding]:
    findings = []
    for target in ev.targets:
        latest = ev.latest(target.key)
        rpo_s = target.rpo_hours * 3600
        if latest is None:
            findings.append(
                _t(target, "fail", "no backup in the catalog", rpo_hours=target.rpo_hours)
            )
            continue
        age = (ev.now - latest.finished_at.astimezone(dt.UTC)).total_seconds()
        data = {
            "backup_id": latest.backup_id,
            "finished_at": latest.finished_at.isoformat(),
            "age_hours": round(age / 3600, 3),
            "rpo_hours": target.rpo_hours,
        }
        if age > rpo_s:
            findings.append(
                _t(
                    target,
                    "fail",
                    f"latest backup {latest.backup_id} is {_hours(age)} old, "
                    f"RPO is {target.rpo_hours:g} h",
                    **data,
                )
            )
        else:
            findings.append(
                _t(
                    target,
                    "pass",
                    f"latest backup {_hours(age)} old (RPO {target.rpo_hours:g} h)",
                    **data,
                )
            )
    for key, why in ev.bad_manifests:
        findings.append(_f("fail", key, f"manifest unreadable: {why}"))
    if not findings:
        findings.append(_f("warn", "catalog", "no targets and no backups found"))
    return findings


# ----------------------------------------------------------------- encryption


def check_client_encryption(ev: Evidence) -> list[Finding]:
    findings = []
    for (engine, target), items in sorted(ev.manifests.items()):
        bad = []
        for m in items:
            for a in m.artifacts:
                if a.encryption not in CLIENT_SIDE_ENCRYPTION:
                    bad.append((m.backup_id, a.name, a.encryption))
                elif a.encryption.startswith("age") and not a.recipients:
                    bad.append((m.backup_id, a.name, f"{a.encryption} without recipients"))
        subject = f"{engine}/{target}"
        if bad:
            for backup_id, name, how in bad[:20]:
                findings.append(
                    Finding(
                        status="fail",
                        subject=f"{subject} {backup_id}/{name}",
                        message=f"artifact {backup_id}/{name} is not encrypted client-side "
                        f"(encryption: {how or 'none'})",
                        engine=engine,
                        target=target,
                    )
                )
        else:
            n = sum(len(m.artifacts) for m in items)
            findings.append(
                Finding(
                    status="pass",
                    subject=subject,
                    message=f"{n} artifact(s) in {len(items)} backup(s) encrypted with age",
                    engine=engine,
                    target=target,
                )
            )
    if not findings:
        findings.append(_f("warn", "catalog", "no backups to check"))
    return findings


def check_encryption_at_rest(ev: Evidence) -> list[Finding]:
    if not ev.is_s3:
        return [
            _f(
                "warn",
                ev.repo.describe(),
                "local folder: encryption at rest depends on the file system (not "
                "verifiable here); artifacts are encrypted client-side (SR-ENC-01)",
            )
        ]
    findings = []
    bucket = ev.bucket or {}
    enc = bucket.get("encryption") or {}
    algos = [
        str(r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm", ""))
        for r in enc.get("Rules", [])
    ]
    if any(a in STRONG_SSE for a in algos):
        findings.append(
            _f("pass", "bucket default encryption", f"default encryption {', '.join(algos)}")
        )
    else:
        findings.append(
            _f("fail", "bucket default encryption", "the bucket has no default encryption")
        )
    unencrypted = []
    objects = ev.backup_objects()
    for manifest, key in objects:
        head = ev.head(key)
        if head is None:
            findings.append(
                _f("fail", key, f"object {key} of backup {manifest.backup_id} is missing")
            )
            continue
        if head.get("ServerSideEncryption") not in STRONG_SSE:
            unencrypted.append((manifest, key))
    for manifest, key in unencrypted[:20]:
        findings.append(
            Finding(
                status="fail",
                subject=key,
                message=f"object {key} is not encrypted at rest (no SSE)",
                engine=manifest.engine,
                target=manifest.target,
            )
        )
    if len(unencrypted) > 20:
        findings.append(_f("fail", "objects", f"{len(unencrypted) - 20} more unencrypted objects"))
    if not unencrypted and objects:
        findings.append(
            _f("pass", "objects", f"{len(objects)} object(s) carry server-side encryption")
        )
    _note_sampling(ev, findings, len(objects))
    return findings


def _note_sampling(ev: Evidence, findings: list[Finding], checked: int) -> None:
    total = ev.backup_object_count()
    if checked < total:
        findings.append(
            _f(
                "warn",
                "objects",
                f"checked the newest {checked} of {total} objects (max_objects_checked)",
            )
        )


# ---------------------------------------------------------------- object lock


def _required_until(ev: Evidence, target: TargetPolicy, manifest: Any) -> tuple[dt.datetime, str]:
    """When the backup's objects must stay locked until, and which rule says so."""
    policy_fields = ev.retention_for(target)
    if policy_fields is not None:
        from strongroom.policy.retention import RetentionPolicy, upload_retain_until

        policy = RetentionPolicy(**policy_fields)
        earlier = [
            m.started_at
            for m in ev.manifests.get(target.key, [])
            if m.kind == manifest.kind and m.started_at < manifest.started_at
        ]
        found = upload_retain_until(policy, manifest.started_at, earlier)
        if found.retain_until is not None:
            return found.retain_until.astimezone(dt.UTC), f"retention rule {found.rule}"
    days = ev.settings.min_lock_days
    return (
        manifest.finished_at.astimezone(dt.UTC) + dt.timedelta(days=days),
        f"minimum lock {days:g} days",
    )


def check_object_lock(ev: Evidence) -> list[Finding]:
    if not ev.is_s3:
        return [
            _f(
                "fail",
                ev.repo.describe(),
                "a local folder cannot enforce object lock (WORM): backups can be deleted "
                "or overwritten; use an S3 repository with object lock",
            )
        ]
    findings = []
    lock_conf = (ev.bucket or {}).get("object_lock") or {}
    if lock_conf.get("ObjectLockEnabled") != "Enabled":
        findings.append(
            _f("fail", "bucket object lock", "object lock is not enabled on the bucket")
        )
    else:
        rule = (lock_conf.get("Rule") or {}).get("DefaultRetention") or {}
        detail = (
            f"default retention {rule.get('Mode')} {rule.get('Days') or rule.get('Years')} "
            f"{'days' if rule.get('Days') else 'years'}"
            if rule
            else "no default retention (per-object locks)"
        )
        findings.append(_f("pass", "bucket object lock", f"object lock enabled; {detail}"))
    targets = {t.key: t for t in ev.targets}
    short = []
    governance = 0
    objects = ev.backup_objects()
    for manifest, key in objects:
        target = targets.get((manifest.engine, manifest.target)) or TargetPolicy(
            engine=manifest.engine, target=manifest.target
        )
        head = ev.head(key)
        if head is None:
            continue  # reported as missing by SR-ENC-02
        mode = head.get("ObjectLockMode")
        until = _utc(head.get("ObjectLockRetainUntilDate"))
        required, why = _required_until(ev, target, manifest)
        if not mode or until is None:
            short.append(_t(target, "fail", f"object {key} is not locked", key=key))
        elif until + dt.timedelta(minutes=5) < required:
            short.append(
                _t(
                    target,
                    "fail",
                    f"object {key} is locked until {until:%Y-%m-%d}, {why} needs "
                    f"{required:%Y-%m-%d} ({_days(required - until)} short)",
                    key=key,
                    retain_until=until.isoformat(),
                    required_until=required.isoformat(),
                )
            )
        elif mode != "COMPLIANCE":
            governance += 1
    findings.extend(short[:20])
    if len(short) > 20:
        findings.append(_f("fail", "objects", f"{len(short) - 20} more objects locked too short"))
    if governance:
        findings.append(
            _f(
                "warn" if ev.settings.require_compliance_mode else "pass",
                "lock mode",
                f"{governance} object(s) locked in GOVERNANCE mode (can be bypassed by "
                "privileged users); COMPLIANCE mode cannot",
            )
        )
    if objects and not short:
        findings.append(
            _f("pass", "objects", f"{len(objects)} object(s) locked as the retention needs")
        )
    _note_sampling(ev, findings, len(objects))
    return findings


# ------------------------------------------------------ versioning and access


def check_versioning(ev: Evidence) -> list[Finding]:
    if not ev.is_s3:
        return [
            _f(
                "warn",
                ev.repo.describe(),
                "not applicable to a local folder: there are no object versions; "
                "overwrites and deletions cannot be undone",
            )
        ]
    bucket = ev.bucket or {}
    status = bucket.get("versioning")
    findings = []
    if status == "Enabled":
        findings.append(_f("pass", "bucket versioning", "versioning enabled"))
    else:
        findings.append(
            _f("fail", "bucket versioning", f"versioning is {status or 'off (never enabled)'}")
        )
    if bucket.get("mfa_delete") == "Enabled":
        findings.append(_f("pass", "MFA delete", "MFA delete enabled"))
    return findings


_PAB_FLAGS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")


def check_public_access(ev: Evidence) -> list[Finding]:
    if ev.is_local:
        return _check_local_permissions(ev)
    if not ev.is_s3:
        return [_f("warn", ev.repo.describe(), "repository type not supported by this check")]
    pab = (ev.bucket or {}).get("public_access_block")
    if not pab:
        return [_f("fail", "public access block", "the bucket has no public access block")]
    off = [flag for flag in _PAB_FLAGS if not pab.get(flag)]
    if off:
        return [
            _f(
                "fail",
                "public access block",
                f"public access block incomplete: {', '.join(off)} off",
            )
        ]
    return [_f("pass", "public access block", "all four public access block settings on")]


def _check_local_permissions(ev: Evidence) -> list[Finding]:
    """The local analogue: nobody but the owner (and group, for folders) may read
    backup files; nobody else may write the folders."""
    root = ev.repo.root  # type: ignore[attr-defined]
    findings: list[Finding] = []
    if not root.exists():
        return [_f("warn", str(root), "repository folder does not exist yet")]
    loose_files = []
    loose_dirs = []
    checked = 0
    for path in [root, *root.rglob("*")]:
        if checked >= ev.settings.max_objects_checked:
            break
        checked += 1
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode) and mode & stat.S_IWOTH:
            loose_dirs.append(str(path.relative_to(root)) or ".")
        elif stat.S_ISREG(mode) and mode & (stat.S_IROTH | stat.S_IWOTH):
            loose_files.append(str(path.relative_to(root)))
    for rel in loose_dirs[:10]:
        findings.append(_f("fail", rel, f"folder {rel} is writable by every user"))
    for rel in loose_files[:10]:
        findings.append(_f("fail", rel, f"file {rel} is readable or writable by every user"))
    if not findings:
        findings.append(
            _f(
                "pass",
                str(root),
                f"{checked} path(s): no file readable by other users, no folder writable by them",
            )
        )
    return findings


# ------------------------------------------------------------------ retention


def check_retention_policy(ev: Evidence) -> list[Finding]:
    from strongroom.compliance.evidence import feature_present

    if not feature_present("retention policy"):
        return _no_feature("retention policy")
    from strongroom.policy.retention import RetentionPolicy

    floor_years = ev.settings.retention_floor_years
    findings = []
    for target in ev.targets:
        fields = ev.retention_for(target)
        if fields is None:
            findings.append(
                _t(
                    target,
                    "warn",
                    "no retention policy configured: nothing is pruned, and nothing says the "
                    f"yearly copies are kept {floor_years:g} years",
                )
            )
            continue
        policy = RetentionPolicy(**fields)
        yearly_years = float(policy.yearly)
        kept_years = max(float(policy.compliance_floor_years), yearly_years)
        if kept_years + 1e-9 < floor_years:
            findings.append(
                _t(
                    target,
                    "fail",
                    f"policy keeps yearly copies {kept_years:g} years, the compliance floor "
                    f"is {floor_years:g} ({policy.describe()})",
                    policy=fields,
                )
            )
        else:
            findings.append(
                _t(
                    target,
                    "pass",
                    f"yearly copies kept {kept_years:g} years ({policy.describe()})",
                    policy=fields,
                )
            )
    if not findings:
        findings.append(_f("warn", "targets", "no targets"))
    return findings


# --------------------------------------------------------------------- drills


def check_drills(ev: Evidence) -> list[Finding]:
    if not ev.drills_feature:
        return _no_feature("restore drills")
    findings = []
    max_age = dt.timedelta(days=ev.settings.drill_max_age_days)
    for target in ev.targets:
        records = ev.drills.get(target.key) or []
        if not records:
            findings.append(_t(target, "fail", "no restore drill on record"))
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
            age = _days(ev.now - last.at) if last.at else "unknown time"
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
        if problems:
            findings.append(_t(target, "fail", "; ".join(problems), **data))
        else:
            findings.append(
                _t(
                    target,
                    "pass",
                    f"drill {_days(ev.now - last.at) if last.at else '?'} ago restored in "
                    f"{(last.rto_s or 0) / 60:.1f} min (RTO {target.rto_minutes:g} min)",
                    **data,
                )
            )
    return findings or [_f("warn", "targets", "no targets")]


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
            return _no_feature("deep verify")
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
            findings.append(_t(target, strict, f"no {label} on record"))
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
                _t(
                    target,
                    "fail",
                    f"latest {label} of {len(failed)} backup(s) found problems: "
                    + ", ".join(failed[:5]),
                    **data,
                )
            )
        elif last.ok is None:
            findings.append(_t(target, "warn", f"latest {label} records no result", **data))
        elif age is None or age > max_age:
            findings.append(
                _t(
                    target,
                    strict,
                    f"newest {label} is {_days(age) if age else 'of unknown age'}, expected "
                    f"every {ev.settings.verify_max_age_days:g} days",
                    **data,
                )
            )
        else:
            note = "" if deep else " (no deep-verify records: shallow verify only)"
            findings.append(
                _t(
                    target,
                    "pass" if deep else "warn",
                    f"{len(latest_per_backup)} backup(s) verified clean, newest {_days(age)} "
                    f"ago{note}",
                    **data,
                )
            )
    return findings or [_f("warn", "targets", "no targets")]


def _ids(ev: Evidence, target: TargetPolicy) -> set[str]:
    return {m.backup_id for m in ev.manifests.get(target.key, [])}


# ------------------------------------------------------------------------ WAL


_WAL_CHECK_FIELDS = ("timeline", "start_lsn", "stop_lsn", "stop_time", "start_wal")


def _engine_wal_check(ev: Evidence, target: TargetPolicy) -> dict[str, Any] | None:
    """The PITR engine's own continuity report (strongroom.engines.postgres.wal.check), when it
    is installed and the base backups carry the details it reads; else None."""
    from strongroom.compliance.evidence import PITR_KINDS, module_present

    if not module_present("strongroom.engines.postgres.wal.check"):
        return None
    bases = [m for m in ev.manifests.get(target.key, []) if m.kind in PITR_KINDS]
    if not bases or not all(all(k in m.details for k in _WAL_CHECK_FIELDS) for m in bases):
        return None
    from strongroom.engines.postgres.wal.check import wal_check

    report: dict[str, Any] = wal_check(ev.repo, target.target, bases, untrusted=[])  # SR-SIG-01
    return report


def check_wal(ev: Evidence) -> list[Finding]:
    pitr_targets = [t for t in ev.targets if ev.is_pitr(t)]
    if not ev.pitr_feature:
        return _no_feature("PITR (WAL archiving)")
    if not pitr_targets:
        return [_f("pass", "targets", "no PITR targets: nothing to check")]
    findings = []
    for target in pitr_targets:
        archive = ev.wal.get(target.target)
        if archive is None or not archive.segments:
            findings.append(_t(target, "fail", "PITR target without any archived WAL"))
            continue
        newest = archive.newest
        assert newest is not None
        lag = (ev.now - max(s.modified for s in archive.segments)).total_seconds()
        engine_report = _engine_wal_check(ev, target)
        if engine_report is not None:
            window = engine_report.get("window") or {}
            data = {
                "source": "pg_wal_check",
                "problems": engine_report.get("problems", []),
                "gaps": engine_report.get("gaps", [])[:20],
                "window": {k: window.get(k) for k in ("timeline", "earliest", "latest")},
            }
            if not engine_report.get("ok"):
                findings.append(
                    _t(
                        target,
                        "fail",
                        "WAL check: " + "; ".join(engine_report.get("problems") or ["failed"]),
                        **data,
                    )
                )
                continue
            earliest = (window.get("earliest") or {}).get("time")
            latest = (window.get("latest") or {}).get("time")
            summary = f"WAL continuous; recoverable {earliest} .. {latest}"
        else:
            start = ev.base_start_segno(target)
            gaps = archive.gaps(start)
            data = {
                "source": "archive listing",
                "segments": len(archive.segments),
                "timelines": sorted({s.timeline for s in archive.segments}),
                "newest": newest.name,
                "gaps": [
                    [segment_name(newest.timeline, a), segment_name(newest.timeline, b)]
                    for a, b in gaps[:20]
                ],
            }
            if gaps:
                missing = sum(b - a + 1 for a, b in gaps)
                findings.append(
                    _t(
                        target,
                        "fail",
                        f"WAL archive has {len(gaps)} gap(s), {missing} segment(s) missing, "
                        f"first {segment_name(newest.timeline, gaps[0][0])}: recovery cannot "
                        "pass it",
                        **data,
                    )
                )
                continue
            summary = f"{len(archive.segments)} segments continuous" + (
                " from the oldest base backup" if start is not None else ""
            )
        if lag > target.rpo_hours * 3600 * ev.settings.wal_stale_factor:
            findings.append(
                _t(
                    target,
                    "warn",
                    f"{summary}, but the newest segment was archived {_hours(lag)} ago "
                    f"(RPO {target.rpo_hours:g} h): is archiving running?",
                    **data,
                )
            )
        else:
            findings.append(
                _t(target, "pass", f"{summary}; newest archived {_hours(lag)} ago", **data)
            )
    return findings


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
            _f("fail", f"audit/{p.seq}" if p.seq else "audit/", f"{p.kind}: {p.detail}", **data)
            for p in chain.problems[:30]
        ]
    if chain.events == 0:
        return [_f("warn", "audit/", "no audit events recorded yet", **data)]
    extra = []
    if chain.anchors_checked:
        extra.append(f"{chain.anchors_checked} anchor(s) from earlier reports match")
    if chain.versions_checked:
        extra.append("no audit object overwritten or deleted (bucket versions)")
    return [
        _f(
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
            _f(
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
        until = _utc(head.get("ObjectLockRetainUntilDate"))
        created = _utc(head.get("LastModified")) or info.modified
        if until is None or until + dt.timedelta(minutes=5) < created + floor:
            short.append((info.key, until))
    for key, until in short[:20]:
        findings.append(
            _f(
                "fail",
                key,
                f"evidence {key} "
                + (f"is locked only until {until:%Y-%m-%d}" if until else "is not locked")
                + f": must be kept {years:g} years",
            )
        )
    if len(short) > 20:
        findings.append(_f("fail", "evidence", f"{len(short) - 20} more evidence objects"))
    if not objects:
        cfg = ev.config
        days = cfg.retention_days if cfg is not None and cfg.lock_mode else 0
        status: Status = "pass" if days >= ev.settings.evidence_floor_days else "warn"
        findings.append(
            _f(
                status,
                "evidence",
                f"no evidence objects yet; the repository locks new objects {days} days",
            )
        )
    elif not short:
        findings.append(
            _f("pass", "evidence", f"{len(objects)} evidence object(s) locked >= {years:g} years")
        )
    return findings


# ------------------------------------------------------------------ registry

_A_8_13 = "A.8.13"
CONTROLS: list[Control] = [
    Control(
        "SR-FRESH-01",
        "Backup freshness within RPO",
        "Every target has a completed backup (a manifest in the catalog) younger than its "
        "recovery point objective.",
        {SOC2: ["A1.2", "CC7.2"], ISO27001: [_A_8_13], HIPAA: ["164.308(a)(7)(ii)(A)"]},
        "catalog/<engine>/<target>/*.json (finished_at); target RPO from its block",
        check_freshness,
    ),
    Control(
        "SR-ENC-01",
        "Backups encrypted client-side",
        "Every artifact of every backup is encrypted before it leaves the host (age, "
        "X25519), with the recipients recorded and no key material in the manifest.",
        {
            SOC2: ["CC6.1", "A1.2"],
            ISO27001: [_A_8_13, "A.8.24"],
            HIPAA: ["164.312(a)(2)(iv)", "164.308(a)(7)(ii)(A)"],
        },
        "manifests: artifacts[].encryption, recipients",
        check_client_encryption,
    ),
    Control(
        "SR-ENC-02",
        "Encryption at rest in the repository",
        "The bucket has default encryption (SSE-KMS or SSE-S3) and every backup object "
        "carries server-side encryption.",
        {
            SOC2: ["CC6.1", "A1.2"],
            ISO27001: [_A_8_13, "A.8.24"],
            HIPAA: ["164.312(a)(2)(iv)"],
        },
        "GetBucketEncryption; HeadObject ServerSideEncryption of manifests and artifacts",
        check_encryption_at_rest,
    ),
    Control(
        "SR-LOCK-01",
        "Object lock covers the retention policy",
        "Object lock is enabled on the bucket and every backup object is locked (COMPLIANCE "
        "mode preferred) at least until the retention policy would release it.",
        {
            SOC2: ["A1.2", "CC7.5"],
            ISO27001: [_A_8_13],
            HIPAA: ["164.308(a)(7)(ii)(A)", "164.312(c)(1)"],
        },
        "GetObjectLockConfiguration; HeadObject ObjectLockMode/RetainUntilDate; retention "
        "policy (strongroom.policy.retention.upload_retain_until)",
        check_object_lock,
    ),
    Control(
        "SR-VERS-01",
        "Bucket versioning enabled",
        "Versioning keeps every overwritten or deleted object version recoverable.",
        {SOC2: ["A1.2"], ISO27001: [_A_8_13], HIPAA: ["164.308(a)(7)(ii)(A)", "164.312(c)(1)"]},
        "GetBucketVersioning",
        check_versioning,
    ),
    Control(
        "SR-PAB-01",
        "Public access blocked",
        "The bucket blocks every form of public access (a local repository: no file "
        "readable by other users, no folder writable by them).",
        {SOC2: ["CC6.1", "CC6.6"], ISO27001: [_A_8_13, "A.8.3"], HIPAA: ["164.312(a)(1)"]},
        "GetPublicAccessBlock (or file modes of a local repository)",
        check_public_access,
    ),
    Control(
        "SR-RET-01",
        "Retention policy meets the compliance floor",
        "Each target's retention policy keeps yearly copies at least as long as the "
        "compliance floor (7 years by default).",
        {
            SOC2: ["A1.2"],
            ISO27001: [_A_8_13, "A.5.33"],
            HIPAA: ["164.308(a)(7)(ii)(A)", "164.316(b)(2)(i)"],
        },
        "retention policy per target (RetentionPolicy fields)",
        check_retention_policy,
    ),
    Control(
        "SR-DRILL-01",
        "Restore drills within interval and under RTO",
        "Every target was restored by a drill within the drill interval, the drill passed "
        "its checks, and the restore took less than the target's RTO.",
        {
            SOC2: ["A1.3", "CC7.5"],
            ISO27001: [_A_8_13, "A.5.30"],
            HIPAA: ["164.308(a)(7)(ii)(B)", "164.308(a)(7)(ii)(D)"],
        },
        "drills/<engine>/<target>/*.json",
        check_drills,
    ),
    Control(
        "SR-VERIFY-01",
        "Latest deep verify clean",
        "Every target's backups were read back recently (checksums, decryption, "
        "decompression, structure) and the latest verification found no problem.",
        {
            SOC2: ["A1.3", "CC7.2"],
            ISO27001: [_A_8_13],
            HIPAA: ["164.308(a)(7)(ii)(D)", "164.312(c)(1)"],
        },
        "deep-verify records; else verify runs in the audit trail",
        check_verification,
    ),
    Control(
        "SR-WAL-01",
        "WAL continuity for PITR targets",
        "Every PITR target's WAL archive is continuous from its oldest base backup to the "
        "newest segment, so any point in the window can be recovered.",
        {
            SOC2: ["A1.2", "A1.3"],
            ISO27001: [_A_8_13],
            HIPAA: ["164.308(a)(7)(ii)(A)", "164.308(a)(7)(ii)(B)"],
        },
        "wal/<target>/<timeline>/<segment>; base backup manifests (start segment)",
        check_wal,
    ),
    Control(
        "SR-AUDIT-01",
        "Audit trail intact",
        "The hash-chained audit trail has no removed, reordered or edited event, its head "
        "matches the anchor the previous report recorded, and (versioned buckets) no "
        "audit object was overwritten or deleted.",
        {
            SOC2: ["CC7.2", "CC7.3"],
            ISO27001: ["A.8.15", _A_8_13],
            HIPAA: ["164.312(b)", "164.312(c)(1)"],
        },
        "audit/<seq>.json; reports/compliance/*.json (audit_head); ListObjectVersions",
        check_audit_chain,
    ),
    Control(
        "SR-DOC-01",
        "Evidence retained at least 6 years",
        "Audit events, drill and verification records and compliance reports are locked "
        "for at least the documentation retention period (6 years by default).",
        {
            SOC2: ["CC7.3", "A1.2"],
            ISO27001: ["A.5.33", "A.8.15"],
            HIPAA: ["164.316(b)(2)(i)"],
        },
        "HeadObject of audit/, drills/, reports/ and verification objects",
        check_evidence_retention,
    ),
    Control(
        "SR-TLS-01",
        "Database traffic encrypted in transit",
        "Every target's connection from its database to the backup runner is TLS with the "
        "server certificate verified, or stays on the host (loopback, unix socket); "
        "plaintext to a remote host is only possible by an explicit opt-out, reported here.",
        {
            SOC2: ["CC6.7"],
            ISO27001: ["A.8.20", "A.8.24"],
            HIPAA: ["164.312(e)(1)", "164.312(e)(2)(ii)"],
        },
        "target blocks: host, sslmode / secure + verify_tls / tls, allow_plaintext",
        check_transport,
    ),
    Control(*SIGNATURE_CONTROL, check_signatures),
]

CONTROL_IDS = [c.id for c in CONTROLS]


def control(control_id: str) -> Control:
    for item in CONTROLS:
        if item.id == control_id:
            return item
    raise KeyError(control_id)
