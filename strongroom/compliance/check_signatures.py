"""SR-SIG-01: every backup in the repository is signed by a key its readers trust.

Anyone who can write to the bucket can publish a manifest that looks like a fresh
backup; only the Ed25519 signature (``strongroom.signing``) tells a genuine one from a
planted one. The catalog already skips untrusted manifests for every lenient reader;
this control makes each of them visible to an auditor (key and why), together with the
other signed records the evidence readers refused (``Evidence.untrusted_records``), and
fails when no trusted signer is configured at all (then nothing could be trusted).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import HIPAA, ISO27001, SOC2, Finding
from strongroom.ids import ENGINES, NAME_RE

# (id, title, description, frameworks, evidence) for ``controls.Control``
SIGNATURE_CONTROL: tuple[str, str, str, dict[str, list[str]], str] = (
    "SR-SIG-01",
    "Backups signed by a trusted key",
    "Every manifest in the repository (and every other signed record the evidence reads) "
    "is signed with Ed25519 by a key pinned in the repository's trusted_signers; an "
    "unsigned, foreign-signed or edited one is listed with why it is not trusted.",
    {
        SOC2: ["CC6.1", "CC7.2", "A1.2"],
        ISO27001: ["A.8.13", "A.8.24"],
        HIPAA: ["164.312(c)(1)", "164.312(c)(2)"],
    },
    "catalog/<engine>/<target>/*.json and their .sig; repository trusted_signers",
)


def target_of_key(key: str) -> tuple[str | None, str | None]:
    """(engine, target) of a ``catalog/<engine>/<target>/<id>.json`` key when both are
    names strongroom writes, else (None, None)."""
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == "catalog":
        engine, target = parts[1], parts[2]
        if engine in ENGINES and NAME_RE.fullmatch(target):
            return engine, target
    return None, None


def _untrusted(key: str, message: str, **data: Any) -> Finding:
    engine, target = target_of_key(key)
    return Finding(
        status="fail",
        subject=key[:200],
        message=message[:500],
        engine=engine,
        target=target,
        data={"key": key[:200], **data},
    )


def check_signatures(ev: Evidence) -> list[Finding]:
    findings: list[Finding] = []
    trusted_ids = ev.repo.trust.key_ids
    if not trusted_ids:
        findings.append(
            Finding(
                status="fail",
                subject="trusted signers",
                message="no trusted signers configured (repository trusted_signers is empty): "
                "no backup can be trusted",
                data={"trusted_signers": []},
            )
        )
    for item in ev.manifest_findings:
        key, status = str(item["key"]), str(item["status"])
        why = str(item["error"]).splitlines()[0] if item["error"] else status
        findings.append(_untrusted(key, f"{status}: {why}", status=status))
    for key, why in ev.untrusted_records:
        findings.append(_untrusted(key, f"record not trusted: {why}", status="record"))
    for (engine, target), manifests in sorted(ev.manifests.items()):
        signers = Counter(m.signed_by or "?" for m in manifests)
        findings.append(
            Finding(
                status="pass",
                subject=f"{engine}/{target}",
                message=f"{len(manifests)} backup(s), all signed by trusted key(s) "
                + ", ".join(sorted(signers)),
                engine=engine,
                target=target,
                data={"backups": len(manifests), "signed_by": dict(signers)},
            )
        )
    if not findings:
        findings.append(
            Finding(
                status="pass",
                subject="catalog",
                message="no manifests; trusted signers: " + ", ".join(trusted_ids),
                data={"trusted_signers": trusted_ids},
            )
        )
    return findings
