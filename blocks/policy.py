"""Prefect block type for retention, deep-verify sampling and restore-drill defaults."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import BaseModel, Field

from strongroom.drills.core import Objectives
from strongroom.policy.retention import RetentionPolicy
from strongroom.policy.verification import SamplingPolicy


class RetentionRules(BaseModel):
    """Per-target override of the retention rules (every field as in the block)."""

    keep_last: int = Field(default=0, ge=0)
    recovery_window_days: float = Field(default=0, ge=0)
    daily: int = Field(default=0, ge=0)
    weekly: int = Field(default=0, ge=0)
    monthly: int = Field(default=0, ge=0)
    yearly: int = Field(default=0, ge=0)
    min_redundancy: int = Field(default=1, ge=1)
    compliance_floor_years: int = Field(default=7, ge=0)


class RetentionPolicyBlock(Block):
    """What to keep (retention), how much to re-read (deep verify), and how often and
    how well restores must work (drills)."""

    _block_type_name = "strongroom retention policy"
    _block_type_slug = "strongroom-retention-policy"
    _description = (
        "Retention rules (keep-last, recovery window, GFS, redundancy and compliance floors), "
        "deep-verify sampling and restore-drill defaults for strongroom."
    )

    keep_last: int = Field(default=0, ge=0, description="Keep the N newest backups.")
    recovery_window_days: float = Field(
        default=35, ge=0, description="Keep what restores any point of the last W days."
    )
    daily: int = Field(default=7, ge=0, description="First backup of each of the last N days.")
    weekly: int = Field(default=5, ge=0, description="First backup of each of the last N weeks.")
    monthly: int = Field(default=12, ge=0, description="First backup of the last N months.")
    yearly: int = Field(default=7, ge=0, description="First backup of each of the last N years.")
    min_redundancy: int = Field(default=2, ge=1, description="Never fewer backups than this.")
    compliance_floor_years: int = Field(
        default=7, ge=0, description="Each year's first backup is kept at least this long."
    )
    overrides: dict[str, RetentionRules] = Field(
        default_factory=dict,
        description="Rules per target: key 'engine/target' or 'target'.",
    )
    orphan_grace_hours: float = Field(
        default=24,
        ge=0,
        description="Data without a manifest (and uploads) younger than this are left alone; "
        "must exceed the longest backup's duration.",
    )

    verify_newest_per_target: int = Field(default=1, ge=0)
    verify_reverify_after_days: float = Field(default=30, ge=0)
    verify_sample_fraction: float = Field(default=0.1, ge=0, le=1)
    verify_max_backups: int | None = Field(default=None, ge=1)
    verify_max_gib: float | None = Field(default=None, gt=0)

    drill_interval_days: float = Field(
        default=7, gt=0, description="A target needs a passing drill at least this often."
    )
    default_rpo_hours: float | None = Field(
        default=24, gt=0, description="RPO for targets whose block sets none."
    )
    default_rto_minutes: float | None = Field(
        default=60, gt=0, description="RTO for targets whose block sets none."
    )

    def policy_for(self, engine: str, target: str) -> RetentionPolicy:
        rules = self.overrides.get(f"{engine}/{target}") or self.overrides.get(target)
        if rules is not None:
            return RetentionPolicy(**rules.model_dump())
        return RetentionPolicy(
            keep_last=self.keep_last,
            recovery_window_days=self.recovery_window_days,
            daily=self.daily,
            weekly=self.weekly,
            monthly=self.monthly,
            yearly=self.yearly,
            min_redundancy=self.min_redundancy,
            compliance_floor_years=self.compliance_floor_years,
        )

    def sampling(self, seed: int | None = None) -> SamplingPolicy:
        return SamplingPolicy(
            newest_per_target=self.verify_newest_per_target,
            reverify_after_days=self.verify_reverify_after_days,
            sample_fraction=self.verify_sample_fraction,
            max_backups=self.verify_max_backups,
            max_bytes=int(self.verify_max_gib * 1024**3) if self.verify_max_gib else None,
            seed=seed,
        )

    def default_objectives(self) -> Objectives:
        return Objectives(rpo_hours=self.default_rpo_hours, rto_minutes=self.default_rto_minutes)
