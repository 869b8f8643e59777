"""The finding builders and formatting every control family shares.

The checks live in one module per control family (``check_*.py``); what they all
need (a finding about a target or a subject, "feature not present", durations, UTC
times, the note that only the newest objects were sampled) lives here so the families
do not import each other or the registry (``controls``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import Finding, Status, TargetPolicy
from strongroom.errors import Unsupported


def target_finding(target: TargetPolicy, status: Status, message: str, **data: Any) -> Finding:
    return Finding(
        status=status,
        subject=f"{target.engine}/{target.target}",
        message=message,
        engine=target.engine,
        target=target.target,
        data=data,
    )


def finding(status: Status, subject: str, message: str, **data: Any) -> Finding:
    return Finding(status=status, subject=subject, message=message, data=data)


def no_feature(feature: str) -> list[Finding]:
    return [
        finding(
            "warn",
            feature,
            f"warn: no evidence found (feature {feature} not present)",
            feature=feature,
        )
    ]


def unsupported_finding(subject: str, exc: Unsupported) -> Finding:
    """A warn: the store does not implement the bucket API this part of a control reads
    (the rest of the control is still evaluated)."""
    return finding(
        "warn",
        subject,
        f"not supported by this store ({exc.api}): cannot show this setting",
        api=exc.api,
    )


def fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def fmt_days(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.1f} days"


def as_utc(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, str):
        try:
            return as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def note_sampling(ev: Evidence, findings: list[Finding], checked: int) -> None:
    total = ev.backup_object_count()
    if checked < total:
        findings.append(
            finding(
                "warn",
                "objects",
                f"checked the newest {checked} of {total} objects (max_objects_checked)",
            )
        )
