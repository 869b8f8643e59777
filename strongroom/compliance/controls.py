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

The checks live in one module per control family: ``check_backups`` (freshness,
encryption), ``check_storage`` (object lock, versioning, public access, retention
policy), ``check_integrity`` (drills, verification), ``check_wal``, ``check_audit``
(audit trail, evidence retention), ``check_transport``, ``check_signatures``,
``check_copies`` (off-site copies). This
module is the registry: ``CONTROLS`` in report order, and ``Control`` that runs one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from strongroom.compliance.check_audit import check_audit_chain, check_evidence_retention
from strongroom.compliance.check_backups import (
    check_client_encryption,
    check_encryption_at_rest,
    check_freshness,
)
from strongroom.compliance.check_copies import COPY_CONTROL, check_offsite_copies
from strongroom.compliance.check_integrity import check_drills, check_verification
from strongroom.compliance.check_signatures import SIGNATURE_CONTROL, check_signatures
from strongroom.compliance.check_storage import (
    check_object_lock,
    check_public_access,
    check_retention_policy,
    check_versioning,
)
from strongroom.compliance.check_transport import check_transport
from strongroom.compliance.check_wal import check_wal
from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import (
    HIPAA,
    ISO27001,
    SOC2,
    ControlResult,
    Finding,
    Status,
    worst,
)


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
    Control(*COPY_CONTROL, check_offsite_copies),
]

CONTROL_IDS = [c.id for c in CONTROLS]


def control(control_id: str) -> Control:
    for item in CONTROLS:
        if item.id == control_id:
            return item
    raise KeyError(control_id)
