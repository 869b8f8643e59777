"""SR-LOCK-01, SR-VERS-01, SR-PAB-01, SR-RET-01: the repository keeps backups as long as
promised and shows them to nobody else.

Who can write to or read the bucket decides whether a backup survives a compromised
host or leaks: these controls read the bucket settings (object lock, versioning, public
access block; a local folder's file modes) and each object's lock against the retention
policy, and check the retention policy itself against the compliance floor.
"""

from __future__ import annotations

import datetime as dt
import stat
from typing import Any

from strongroom.compliance.check_common import (
    as_utc,
    finding,
    fmt_days,
    no_feature,
    note_sampling,
    target_finding,
    unsupported_finding,
)
from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import Finding, TargetPolicy
from strongroom.errors import Unsupported

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
            finding(
                "fail",
                ev.repo.describe(),
                "a local folder cannot enforce object lock (WORM): backups can be deleted "
                "or overwritten; use an S3 repository with object lock",
            )
        ]
    findings = []
    try:
        lock_conf = ev.bucket_setting("object_lock") or {}
    except Unsupported as exc:
        findings.append(unsupported_finding("bucket object lock", exc))
        lock_conf = None
    if lock_conf is None:
        pass  # the objects' own locks are still checked below
    elif lock_conf.get("ObjectLockEnabled") != "Enabled":
        findings.append(
            finding("fail", "bucket object lock", "object lock is not enabled on the bucket")
        )
    else:
        rule = (lock_conf.get("Rule") or {}).get("DefaultRetention") or {}
        detail = (
            f"default retention {rule.get('Mode')} {rule.get('Days') or rule.get('Years')} "
            f"{'days' if rule.get('Days') else 'years'}"
            if rule
            else "no default retention (per-object locks)"
        )
        findings.append(finding("pass", "bucket object lock", f"object lock enabled; {detail}"))
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
        until = as_utc(head.get("ObjectLockRetainUntilDate"))
        required, why = _required_until(ev, target, manifest)
        if not mode or until is None:
            short.append(target_finding(target, "fail", f"object {key} is not locked", key=key))
        elif until + dt.timedelta(minutes=5) < required:
            short.append(
                target_finding(
                    target,
                    "fail",
                    f"object {key} is locked until {until:%Y-%m-%d}, {why} needs "
                    f"{required:%Y-%m-%d} ({fmt_days(required - until)} short)",
                    key=key,
                    retain_until=until.isoformat(),
                    required_until=required.isoformat(),
                )
            )
        elif mode != "COMPLIANCE":
            governance += 1
    findings.extend(short[:20])
    if len(short) > 20:
        findings.append(
            finding("fail", "objects", f"{len(short) - 20} more objects locked too short")
        )
    if governance:
        findings.append(
            finding(
                "warn" if ev.settings.require_compliance_mode else "pass",
                "lock mode",
                f"{governance} object(s) locked in GOVERNANCE mode (can be bypassed by "
                "privileged users); COMPLIANCE mode cannot",
            )
        )
    if objects and not short:
        findings.append(
            finding("pass", "objects", f"{len(objects)} object(s) locked as the retention needs")
        )
    note_sampling(ev, findings, len(objects))
    return findings


# ------------------------------------------------------ versioning and access


def check_versioning(ev: Evidence) -> list[Finding]:
    if not ev.is_s3:
        return [
            finding(
                "warn",
                ev.repo.describe(),
                "not applicable to a local folder: there are no object versions; "
                "overwrites and deletions cannot be undone",
            )
        ]
    try:
        versioning = ev.bucket_setting("versioning") or {}
    except Unsupported as exc:
        return [unsupported_finding("bucket versioning", exc)]
    status = versioning.get("Status")
    findings = []
    if status == "Enabled":
        findings.append(finding("pass", "bucket versioning", "versioning enabled"))
    else:
        findings.append(
            finding("fail", "bucket versioning", f"versioning is {status or 'off (never enabled)'}")
        )
    if versioning.get("MFADelete") == "Enabled":
        findings.append(finding("pass", "MFA delete", "MFA delete enabled"))
    return findings


_PAB_FLAGS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")


def check_public_access(ev: Evidence) -> list[Finding]:
    if ev.is_local:
        return _check_local_permissions(ev)
    if not ev.is_s3:
        return [finding("warn", ev.repo.describe(), "repository type not supported by this check")]
    try:
        pab = ev.bucket_setting("public_access_block")
    except Unsupported as exc:
        return [unsupported_finding("public access block", exc)]
    if not pab:
        return [finding("fail", "public access block", "the bucket has no public access block")]
    off = [flag for flag in _PAB_FLAGS if not pab.get(flag)]
    if off:
        return [
            finding(
                "fail",
                "public access block",
                f"public access block incomplete: {', '.join(off)} off",
            )
        ]
    return [finding("pass", "public access block", "all four public access block settings on")]


def _check_local_permissions(ev: Evidence) -> list[Finding]:
    """The local analogue: nobody but the owner (and group, for folders) may read
    backup files; nobody else may write the folders."""
    root = ev.repo.root  # type: ignore[attr-defined]
    findings: list[Finding] = []
    if not root.exists():
        return [finding("warn", str(root), "repository folder does not exist yet")]
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
        findings.append(finding("fail", rel, f"folder {rel} is writable by every user"))
    for rel in loose_files[:10]:
        findings.append(finding("fail", rel, f"file {rel} is readable or writable by every user"))
    if not findings:
        findings.append(
            finding(
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
        return no_feature("retention policy")
    from strongroom.policy.retention import RetentionPolicy

    floor_years = ev.settings.retention_floor_years
    findings = []
    for target in ev.targets:
        fields = ev.retention_for(target)
        if fields is None:
            findings.append(
                target_finding(
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
                target_finding(
                    target,
                    "fail",
                    f"policy keeps yearly copies {kept_years:g} years, the compliance floor "
                    f"is {floor_years:g} ({policy.describe()})",
                    policy=fields,
                )
            )
        else:
            findings.append(
                target_finding(
                    target,
                    "pass",
                    f"yearly copies kept {kept_years:g} years ({policy.describe()})",
                    policy=fields,
                )
            )
    if not findings:
        findings.append(finding("warn", "targets", "no targets"))
    return findings
