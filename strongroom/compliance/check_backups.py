"""SR-FRESH-01, SR-ENC-01, SR-ENC-02: the backups themselves are fresh and encrypted.

A backup older than the recovery point objective, or one readable by whoever holds the
bucket, fails the promise a backup makes before any restore is tried. These controls
read the catalog (finished_at, each artifact's encryption and recipients) and the
bucket (default encryption, each object's server-side encryption).
"""

from __future__ import annotations

import datetime as dt

from strongroom.catalog import Manifest
from strongroom.compliance.check_common import (
    finding,
    fmt_hours,
    note_sampling,
    target_finding,
    unsupported_finding,
)
from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import Finding
from strongroom.errors import Unsupported

CLIENT_SIDE_ENCRYPTION = ("age-x25519", "age-scrypt", "age", "aes-256-gcm")
STRONG_SSE = ("aws:kms", "aws:kms:dsse", "AES256")
# manifests whose objects a database server wrote itself (ClickHouse BACKUP ... TO S3)
SERVER_WRITTEN_KIND = "native"


# ------------------------------------------------------------------ freshness


def check_freshness(ev: Evidence) -> list[Finding]:
    findings = []
    for target in ev.targets:
        latest = ev.latest(target.key)
        rpo_s = target.rpo_hours * 3600
        if latest is None:
            findings.append(
                target_finding(
                    target, "fail", "no backup in the catalog", rpo_hours=target.rpo_hours
                )
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
                target_finding(
                    target,
                    "fail",
                    f"latest backup {latest.backup_id} is {fmt_hours(age)} old, "
                    f"RPO is {target.rpo_hours:g} h",
                    **data,
                )
            )
        else:
            findings.append(
                target_finding(
                    target,
                    "pass",
                    f"latest backup {fmt_hours(age)} old (RPO {target.rpo_hours:g} h)",
                    **data,
                )
            )
    for key, why in ev.bad_manifests:
        findings.append(finding("fail", key, f"manifest unreadable: {why}"))
    if not findings:
        findings.append(finding("warn", "catalog", "no targets and no backups found"))
    return findings


# ----------------------------------------------------------------- encryption


def check_client_encryption(ev: Evidence) -> list[Finding]:
    findings = []
    for (engine, target), items in sorted(ev.manifests.items()):
        bad = []
        for m in items:
            if m.kind == SERVER_WRITTEN_KIND:
                findings.append(_server_written(engine, target, m))
                continue
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
        elif any(m.kind != SERVER_WRITTEN_KIND for m in items):
            n = sum(len(m.artifacts) for m in items if m.kind != SERVER_WRITTEN_KIND)
            findings.append(
                Finding(
                    status="pass",
                    subject=subject,
                    message=f"{n} artifact(s) in "
                    f"{sum(m.kind != SERVER_WRITTEN_KIND for m in items)} backup(s) "
                    "encrypted with age",
                    engine=engine,
                    target=target,
                )
            )
    if not findings:
        findings.append(finding("warn", "catalog", "no backups to check"))
    return findings


def _server_written(engine: str, target: str, m: Manifest) -> Finding:
    """A ClickHouse ``native`` backup: the server wrote it into the bucket, no age. Said
    as it is (a failure of this control, never counted as encrypted client-side)."""
    sse = sorted({str(a.meta.get("server_side_encryption", "unknown")) for a in m.artifacts})
    return Finding(
        status="fail",
        subject=f"{engine}/{target} {m.backup_id}",
        message=f"backup {m.backup_id} is a native (server-written) backup: its "
        f"{len(m.artifacts)} object(s) are encrypted server-side only (SSE: {', '.join(sse)}), "
        "not client-side with age; use method logical for client-side encryption",
        engine=engine,
        target=target,
        data={"kind": m.kind, "encryption": "server-side only", "sse": sse},
    )


def check_encryption_at_rest(ev: Evidence) -> list[Finding]:
    if not ev.is_s3:
        return [
            finding(
                "warn",
                ev.repo.describe(),
                "local folder: encryption at rest depends on the file system (not "
                "verifiable here); artifacts are encrypted client-side (SR-ENC-01)",
            )
        ]
    findings = []
    try:
        enc = ev.bucket_setting("encryption") or {}
    except Unsupported as exc:  # each object's own SSE is still checked below
        findings.append(unsupported_finding("bucket default encryption", exc))
        enc = None
    algos = [
        str(r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm", ""))
        for r in (enc or {}).get("Rules", [])
    ]
    if enc is None:
        pass
    elif any(a in STRONG_SSE for a in algos):
        findings.append(
            finding("pass", "bucket default encryption", f"default encryption {', '.join(algos)}")
        )
    else:
        findings.append(
            finding("fail", "bucket default encryption", "the bucket has no default encryption")
        )
    unencrypted = []
    objects = ev.backup_objects()
    for manifest, key in objects:
        head = ev.head(key)
        if head is None:
            findings.append(
                finding("fail", key, f"object {key} of backup {manifest.backup_id} is missing")
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
        findings.append(
            finding("fail", "objects", f"{len(unencrypted) - 20} more unencrypted objects")
        )
    if not unencrypted and objects:
        findings.append(
            finding("pass", "objects", f"{len(objects)} object(s) carry server-side encryption")
        )
    note_sampling(ev, findings, len(objects))
    return findings
