"""SR-WAL-01: every PITR target's WAL archive is continuous, so any point can be recovered.

One missing segment ends point-in-time recovery there. The PITR engine's own check
(``strongroom.engines.postgres.wal.check``) is used when it is installed and the base
backups carry what it reads; otherwise the archive listing is checked for gaps.
"""

from __future__ import annotations

from typing import Any

from strongroom.compliance.check_common import finding, fmt_hours, no_feature, target_finding
from strongroom.compliance.evidence import Evidence, segment_name
from strongroom.compliance.model import Finding, TargetPolicy

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
        return no_feature("PITR (WAL archiving)")
    if not pitr_targets:
        return [finding("pass", "targets", "no PITR targets: nothing to check")]
    findings = []
    for target in pitr_targets:
        archive = ev.wal.get(target.target)
        if archive is None or not archive.segments:
            findings.append(target_finding(target, "fail", "PITR target without any archived WAL"))
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
                    target_finding(
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
                    target_finding(
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
                target_finding(
                    target,
                    "warn",
                    f"{summary}, but the newest segment was archived {fmt_hours(lag)} ago "
                    f"(RPO {target.rpo_hours:g} h): is archiving running?",
                    **data,
                )
            )
        else:
            findings.append(
                target_finding(
                    target, "pass", f"{summary}; newest archived {fmt_hours(lag)} ago", **data
                )
            )
    return findings
