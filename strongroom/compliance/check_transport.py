"""SR-TLS-01: how each target's data travels between its database and the backup runner.

Backups carry whole databases; a plaintext hop across a network exposes them to anyone on
the path. The connection models already refuse plaintext to a non-loopback host unless
the target block opts out (``strongroom.transport``); this control reports what each
target block really says, so an auditor sees the opt-outs and the unverified TLS.
"""

from __future__ import annotations

from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import Finding, Status, TargetPolicy

_STATUS: dict[str, tuple[Status, str]] = {
    "verified": ("pass", "TLS with the server certificate verified"),
    "local": ("pass", "loopback or unix socket: the data never crosses a network"),
    "encrypted": (
        "warn",
        "TLS without certificate verification: a man in the middle with any certificate "
        "can read it (PostgreSQL: sslmode=verify-full; ClickHouse: verify_tls)",
    ),
    "plaintext-by-opt-out": (
        "fail",
        "plaintext to a remote host (allow_plaintext: true in the target block)",
    ),
}


def _finding(target: TargetPolicy, status: Status, message: str) -> Finding:
    return Finding(
        status=status,
        subject=f"{target.engine}/{target.target}",
        message=message,
        engine=target.engine,
        target=target.target,
        data={"transport": target.transport, "source": target.source},
    )


def check_transport(ev: Evidence) -> list[Finding]:
    findings: list[Finding] = []
    for target in ev.targets:
        if target.transport is None:
            findings.append(
                _finding(target, "warn", "transport not known (target not read from a block)")
            )
            continue
        status, message = _STATUS.get(
            target.transport, ("warn", f"unknown transport {target.transport!r}")
        )
        findings.append(_finding(target, status, f"{target.transport}: {message}"))
    if not findings:
        findings.append(
            Finding(status="warn", subject="targets", message="no targets to report on", data={})
        )
    return findings
