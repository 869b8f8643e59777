"""Data shapes shared by the controls, the evaluation and the reports."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from strongroom.errors import StrongroomError

Status = Literal["pass", "warn", "fail"]
_RANK = {"pass": 0, "warn": 1, "fail": 2}

# Framework names as they appear in reports.
SOC2 = "SOC 2"
ISO27001 = "ISO/IEC 27001:2022"
HIPAA = "HIPAA"


def worst(statuses: list[Status] | list[str], default: Status = "pass") -> Status:
    found: Status = default
    for status in statuses:
        if _RANK[status] > _RANK[found]:
            found = status  # type: ignore[assignment]
    return found


def years_to_days(years: float) -> int:
    return math.ceil(years * 365.25)


class ComplianceSettings(BaseModel):
    """Thresholds the controls apply. Defaults follow DESIGN.md and the issue."""

    retention_floor_years: float = Field(
        default=7, description="yearly copies must be kept (and locked) at least this long"
    )
    evidence_floor_years: float = Field(
        default=6, description="audit, drill, verification and report evidence kept this long"
    )
    default_rpo_hours: float = 24.0
    default_rto_minutes: float = 60.0
    drill_max_age_days: float = Field(
        default=8.0, description="a restore drill per target at least this often (weekly + 1d)"
    )
    verify_max_age_days: float = Field(
        default=8.0, description="a clean deep verify per target at least this often"
    )
    min_lock_days: float = Field(
        default=30.0,
        description="without a retention policy: every backup object locked at least this "
        "long after it finished",
    )
    require_compliance_mode: bool = Field(
        default=True, description="GOVERNANCE-mode locks (bypassable) are a warning"
    )
    max_objects_checked: int = Field(
        default=5000, ge=1, description="HEAD requests per control at most (newest first)"
    )
    wal_stale_factor: float = Field(
        default=1.0, description="newest archived WAL older than RPO x this is a warning"
    )
    offsite_copy_hours: float = Field(
        default=24.0, gt=0, description="each backup copied off-site within this many hours"
    )
    offsite_copy_required: bool = Field(
        default=False, description="no copy record at all fails SR-COPY-01 (else a warning)"
    )
    offsite_copy_lookback_days: float = Field(
        default=35.0, gt=0, description="SR-COPY-01 checks the backups finished this recently"
    )

    @property
    def retention_floor_days(self) -> int:
        return years_to_days(self.retention_floor_years)

    @property
    def evidence_floor_days(self) -> int:
        return years_to_days(self.evidence_floor_years)


class TargetPolicy(BaseModel):
    """One backed-up target and its objectives."""

    engine: str
    target: str
    rpo_hours: float = 24.0
    rto_minutes: float = 60.0
    pitr: bool | None = Field(default=None, description="None: detected from the repository")
    retention: dict[str, Any] | None = Field(
        default=None, description="RetentionPolicy fields (strongroom.policy.retention)"
    )
    source: str = Field(default="given", description="where the objectives came from")
    transport: str | None = Field(
        default=None,
        description="local | encrypted | verified | plaintext-by-opt-out (strongroom.transport"
        ".transport_of, from the target block); None: not known (target not from a block)",
    )

    @property
    def key(self) -> tuple[str, str]:
        return (self.engine, self.target)

    @property
    def resource_id(self) -> str:
        return f"strongroom.target.{self.engine}.{self.target}"


class Finding(BaseModel):
    """One observation of a control about one subject (a target, an object, a setting)."""

    status: Status
    subject: str
    message: str
    engine: str | None = None
    target: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class ControlResult(BaseModel):
    id: str
    title: str
    description: str
    frameworks: dict[str, list[str]]
    status: Status
    summary: str
    evidence: list[str] = Field(default_factory=list, description="what the control read")
    findings: list[Finding] = Field(default_factory=list)


class ControlsFailed(StrongroomError):
    """At least one compliance control failed (the report was still written)."""

    exit_code = 10

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``summary`` through pickling
        return (type(self), (str(self), self.summary))
