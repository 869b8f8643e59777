"""Retention policy evaluation: pure functions, no storage access.

Given the backups of one series (one engine, target and kind) and a policy,
``evaluate`` returns a keep/delete decision per backup together with every
rule that keeps it. Rules, all combinable:

* ``keep-last``: the N newest backups.
* ``recovery-window``: every backup taken within the last W days, plus the
  newest one taken before the window (the *anchor*: without it the start of
  the window could not be restored).
* ``gfs-daily/weekly/monthly/yearly``: for each of the last N calendar
  periods (UTC days, ISO weeks, months, years; the current one included), the
  **first** backup of that period. First, not last: a past backup's GFS status
  then never changes as new backups arrive, so the time it will be kept is
  known when it is uploaded, and the object-lock retain-until set at upload
  (``upload_retain_until``) always agrees with what retention later decides.
* ``compliance-floor``: the first backup of every calendar year (the yearly
  copy) is kept at least ``compliance_floor_years`` (default 7) after it was
  taken, whatever the GFS counts say.
* ``pinned``: kept forever (until unpinned).
* ``object-lock``: a backup the storage still locks is kept (and reported as
  "locked until ..."), never deleted.
* ``min-redundancy``: the newest M backups are always kept (a floor under
  every other rule); the newest backup is always kept (``newest``).
* ``dependency``: a backup another kept backup depends on (an incremental's
  parent) is kept too.

A backup's time for the policy is when it started (the time in its id), so
the decision for a backup can already be computed while it is being uploaded.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from strongroom.errors import InvalidInput, invalid_input

# Rule names (the first word of every rule string).
PINNED = "pinned"
OBJECT_LOCK = "object-lock"
COMPLIANCE = "compliance-floor"
YEARLY = "gfs-yearly"
MONTHLY = "gfs-monthly"
WEEKLY = "gfs-weekly"
DAILY = "gfs-daily"
WINDOW = "recovery-window"
WINDOW_ANCHOR = "recovery-window-anchor"
KEEP_LAST = "keep-last"
MIN_REDUNDANCY = "min-redundancy"
NEWEST = "newest"
DEPENDENCY = "dependency"
FUTURE = "future-dated"

# Which rule is named as "the" reason when several keep a backup: the most durable first.
_PRIORITY = [
    PINNED,
    OBJECT_LOCK,
    COMPLIANCE,
    YEARLY,
    MONTHLY,
    WEEKLY,
    DAILY,
    WINDOW,
    WINDOW_ANCHOR,
    KEEP_LAST,
    DEPENDENCY,
    MIN_REDUNDANCY,
    NEWEST,
    FUTURE,
]


class RetentionPolicy(BaseModel):
    """What to keep. Every rule is optional; a backup is kept if any rule keeps it."""

    # Upper bounds keep every rule inside the calendar (100 years), so no rule can overflow
    # a date; anything beyond them is a typo, refused as InvalidInput.
    keep_last: int = Field(default=0, ge=0, le=1_000_000, description="keep the N newest backups")
    recovery_window_days: float = Field(
        default=0,
        ge=0,
        le=36500,
        allow_inf_nan=False,
        description="keep what is needed to restore any point in the last W days",
    )
    daily: int = Field(
        default=0, ge=0, le=36500, description="first backup of each of the last N days"
    )
    weekly: int = Field(
        default=0, ge=0, le=5200, description="first backup of each of the last N weeks"
    )
    monthly: int = Field(
        default=0, ge=0, le=1200, description="first backup of each of the last N months"
    )
    yearly: int = Field(
        default=0, ge=0, le=100, description="first backup of each of the last N years"
    )
    min_redundancy: int = Field(
        default=1,
        ge=1,
        le=1_000_000,
        description="never keep fewer than this many backups (newest first)",
    )
    compliance_floor_years: int = Field(
        default=7,
        ge=0,
        le=100,
        description="keep each year's first backup at least this many years",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_input(exc, "retention policy") from None

    def has_rules(self) -> bool:
        """True when some rule beyond the redundancy floor is configured."""
        return bool(
            self.keep_last
            or self.recovery_window_days
            or self.daily
            or self.weekly
            or self.monthly
            or self.yearly
            or self.compliance_floor_years
        )

    def check_usable(self) -> None:
        """Refuse a policy that would keep nothing but the redundancy floor (a typo)."""
        if not self.has_rules():
            raise InvalidInput(
                "the retention policy has no rule (keep_last, recovery_window_days, daily, "
                "weekly, monthly, yearly, compliance_floor_years are all 0): it would delete "
                "all but the newest backups; set at least one rule"
            )

    def describe(self) -> str:
        parts = []
        if self.keep_last:
            parts.append(f"keep-last {self.keep_last}")
        if self.recovery_window_days:
            parts.append(f"recovery window {self.recovery_window_days:g} days")
        gfs = [
            f"{n} {what}"
            for n, what in (
                (self.daily, "daily"),
                (self.weekly, "weekly"),
                (self.monthly, "monthly"),
                (self.yearly, "yearly"),
            )
            if n
        ]
        if gfs:
            parts.append("GFS " + ", ".join(gfs))
        if self.compliance_floor_years:
            parts.append(f"yearly copies >= {self.compliance_floor_years} years")
        parts.append(f"min redundancy {self.min_redundancy}")
        return "; ".join(parts)


@dataclass(frozen=True)
class BackupPoint:
    """What the policy needs to know about one backup."""

    backup_id: str
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    engine: str = ""
    target: str = ""
    kind: str = "logical"
    pinned: bool = False
    locked_until: dt.datetime | None = None
    lock_detail: str = ""
    depends_on: tuple[str, ...] = ()
    stored_size: int = 0

    @property
    def series(self) -> tuple[str, str, str]:
        return (self.engine, self.target, self.kind)


@dataclass(frozen=True)
class Decision:
    """Keep or delete one backup, and why."""

    backup: BackupPoint
    keep: bool
    rules: tuple[str, ...] = ()
    keep_until: dt.datetime | None = None
    forever: bool = False

    @property
    def backup_id(self) -> str:
        return self.backup.backup_id

    @property
    def rule(self) -> str | None:
        """The rule named as the reason (the most durable of those that keep it)."""
        return self.rules[0] if self.rules else None

    @property
    def reason(self) -> str:
        if self.keep:
            return "kept by " + ", ".join(self.rules)
        return "no rule keeps it"

    def to_dict(self) -> dict[str, Any]:
        b = self.backup
        return {
            "backup_id": b.backup_id,
            "engine": b.engine,
            "target": b.target,
            "kind": b.kind,
            "started_at": b.started_at.isoformat(),
            "finished_at": b.finished_at.isoformat() if b.finished_at else None,
            "keep": self.keep,
            "rule": self.rule,
            "rules": list(self.rules),
            "reason": self.reason,
            "keep_until": self.keep_until.isoformat() if self.keep_until else None,
            "forever": self.forever,
            "pinned": b.pinned,
            "locked_until": b.locked_until.isoformat() if b.locked_until else None,
            "stored_size": b.stored_size,
        }


# ------------------------------------------------------------------ calendar


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _day_index(t: dt.datetime) -> int:
    return t.date().toordinal()


def _week_index(t: dt.datetime) -> int:
    d = t.date()
    return (d.toordinal() - d.weekday()) // 7  # Mondays are 7 apart: one index per ISO week


def _month_index(t: dt.datetime) -> int:
    return t.year * 12 + t.month - 1


def _year_index(t: dt.datetime) -> int:
    return t.year


def _midnight(day_ordinal: int) -> dt.datetime:
    d = dt.date.fromordinal(day_ordinal)
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)


def _day_start(idx: int) -> dt.datetime:
    return _midnight(idx)


def _week_start(idx: int) -> dt.datetime:
    # Mondays have ordinals 7k + 1 (1 January of year 1 was a Monday): k is the index
    return _midnight(idx * 7 + 1)


def _month_start(idx: int) -> dt.datetime:
    return dt.datetime(idx // 12, idx % 12 + 1, 1, tzinfo=dt.UTC)


def _year_start(idx: int) -> dt.datetime:
    return dt.datetime(idx, 1, 1, tzinfo=dt.UTC)


def _period_label(kind: str, t: dt.datetime) -> str:
    if kind == DAILY:
        return t.strftime("%Y-%m-%d")
    if kind == WEEKLY:
        iso = t.isocalendar()
        return f"{iso.year}-W{iso.week:02d}"
    if kind == MONTHLY:
        return t.strftime("%Y-%m")
    return t.strftime("%Y")


def add_years(t: dt.datetime, years: int) -> dt.datetime:
    """Same date ``years`` later; 29 February becomes 1 March (never earlier)."""
    try:
        return t.replace(year=t.year + years)
    except ValueError:
        return t.replace(year=t.year + years, month=3, day=1)


# (rule, index function, start-of-period function, count attribute)
_GFS = (
    (DAILY, _day_index, _day_start, "daily"),
    (WEEKLY, _week_index, _week_start, "weekly"),
    (MONTHLY, _month_index, _month_start, "monthly"),
    (YEARLY, _year_index, _year_start, "yearly"),
)


def _gfs_expiry(rule: str, period_idx: int, count: int) -> dt.datetime:
    """When a GFS copy of period ``period_idx`` stops being one of the last ``count``."""
    for name, _index, start, _attr in _GFS:
        if name == rule:
            return start(period_idx + count)
    raise AssertionError(rule)


def _time_rules(
    policy: RetentionPolicy, started: dt.datetime, first_of: dict[str, bool]
) -> list[tuple[str, dt.datetime]]:
    """Rules that keep a backup for a known time: (rule text, keep-until)."""
    found: list[tuple[str, dt.datetime]] = []
    for rule, index, _start, attr in _GFS:
        count = int(getattr(policy, attr))
        if count and first_of[rule]:
            until = _gfs_expiry(rule, index(started), count)
            found.append((f"{rule} {_period_label(rule, started)}", until))
    if policy.compliance_floor_years and first_of[YEARLY]:
        until = add_years(started, policy.compliance_floor_years)
        found.append((f"{COMPLIANCE} {policy.compliance_floor_years}y", until))
    if policy.recovery_window_days:
        until = started + dt.timedelta(days=policy.recovery_window_days)
        found.append((f"{WINDOW} {policy.recovery_window_days:g}d", until))
    return found


def _sort_rules(rules: Iterable[str]) -> tuple[str, ...]:
    def rank(rule: str) -> tuple[int, str]:
        head = rule.split(" ", 1)[0]
        return (_PRIORITY.index(head) if head in _PRIORITY else len(_PRIORITY), rule)

    return tuple(sorted(set(rules), key=rank))


# ---------------------------------------------------------------- evaluation


def _evaluate_series(
    items: list[BackupPoint], policy: RetentionPolicy, now: dt.datetime
) -> list[Decision]:
    items = sorted(items, key=lambda b: (_utc(b.started_at), b.backup_id))
    n = len(items)
    rules: list[list[str]] = [[] for _ in items]
    until: list[dt.datetime | None] = [None] * n
    forever = [False] * n

    # first backup of each GFS period (and of each year, for the compliance floor)
    first_of: list[dict[str, bool]] = [dict.fromkeys((r for r, *_ in _GFS), False) for _ in items]
    for rule, index, _start, _attr in _GFS:
        seen: set[int] = set()
        for i, b in enumerate(items):
            idx = index(_utc(b.started_at))
            if idx not in seen:
                seen.add(idx)
                first_of[i][rule] = True

    def keep(i: int, rule: str, keep_until: dt.datetime | None = None) -> None:
        rules[i].append(rule)
        current = until[i]
        if keep_until is not None and (current is None or keep_until > current):
            until[i] = keep_until

    for i, b in enumerate(items):
        started = _utc(b.started_at)
        if b.pinned:
            keep(i, PINNED)
            forever[i] = True
        if b.locked_until is not None and _utc(b.locked_until) > now:
            detail = f" ({b.lock_detail})" if b.lock_detail else ""
            keep(i, f"{OBJECT_LOCK} until {_utc(b.locked_until).isoformat()}{detail}")
        if started > now:
            keep(i, FUTURE)
        for rule, keep_until in _time_rules(policy, started, first_of[i]):
            if now < keep_until:
                keep(i, rule, keep_until)

    # the anchor: the newest backup taken before the recovery window starts
    if policy.recovery_window_days:
        window_start = now - dt.timedelta(days=policy.recovery_window_days)
        before = [i for i, b in enumerate(items) if _utc(b.started_at) < window_start]
        if before:
            keep(before[-1], f"{WINDOW_ANCHOR} {policy.recovery_window_days:g}d")

    for rank, i in enumerate(reversed(range(n))):
        if rank < policy.keep_last:
            keep(i, f"{KEEP_LAST} {policy.keep_last}")
        if rank < policy.min_redundancy:
            keep(i, f"{MIN_REDUNDANCY} {policy.min_redundancy}")
    if n:
        keep(n - 1, NEWEST)

    # incremental chains: whatever a kept backup depends on is kept too
    by_id = {b.backup_id: i for i, b in enumerate(items)}
    changed = True
    while changed:
        changed = False
        for i, b in enumerate(items):
            if not rules[i]:
                continue
            for parent in b.depends_on:
                j = by_id.get(parent)
                if j is None:
                    continue
                tag = f"{DEPENDENCY} of {b.backup_id}"
                if tag not in rules[j]:
                    rules[j].append(tag)
                    if forever[i]:
                        forever[j] = True
                    ui = until[i]
                    uj = until[j]
                    if ui is not None and (uj is None or ui > uj):
                        until[j] = ui
                    changed = True

    return [
        Decision(
            backup=b,
            keep=bool(rules[i]),
            rules=_sort_rules(rules[i]),
            keep_until=until[i],
            forever=forever[i],
        )
        for i, b in enumerate(items)
    ]


def evaluate(
    backups: Iterable[BackupPoint],
    policy: RetentionPolicy,
    now: dt.datetime | None = None,
) -> list[Decision]:
    """Decide for every backup; series (engine, target, kind) are evaluated separately.

    Returned oldest first within each series, series in sorted order.
    """
    moment = _utc(now or dt.datetime.now(dt.UTC))
    groups: dict[tuple[str, str, str], list[BackupPoint]] = defaultdict(list)
    for b in backups:
        groups[b.series].append(b)
    decisions: list[Decision] = []
    for key in sorted(groups):
        decisions.extend(_evaluate_series(groups[key], policy, moment))
    return decisions


def with_locks(
    decisions: Sequence[Decision],
    locks: dict[str, tuple[dt.datetime, str]],
    policy: RetentionPolicy,
    now: dt.datetime,
) -> list[Decision]:
    """Re-evaluate after learning which backups the storage still locks."""
    points = [
        replace(
            d.backup,
            locked_until=locks[d.backup_id][0],
            lock_detail=locks[d.backup_id][1],
        )
        if d.backup_id in locks
        else d.backup
        for d in decisions
    ]
    return evaluate(points, policy, now)


# ------------------------------------------------------ upload-time retention


@dataclass(frozen=True)
class UploadRetention:
    """How long the policy will certainly keep a new backup (for object lock)."""

    retain_until: dt.datetime | None
    rule: str | None
    all_rules: list[tuple[str, dt.datetime]] = field(default_factory=list)


def upload_retain_until(
    policy: RetentionPolicy,
    started_at: dt.datetime,
    earlier: Iterable[dt.datetime],
) -> UploadRetention:
    """The retain-until for a backup starting at ``started_at``: the latest keep-until
    of the time-based rules that will keep it (GFS, compliance floor, recovery window).

    ``earlier`` are the start times of the series' existing backups. Count-based
    rules (keep-last, min-redundancy) and pins give no time guarantee and are
    not locked for. ``evaluate`` keeps the backup at least until this moment.
    """
    started = _utc(started_at)
    before = [_utc(t) for t in earlier if _utc(t) < started]
    first_of = {
        rule: not any(index(t) == index(started) for t in before) for rule, index, *_ in _GFS
    }
    found = _time_rules(policy, started, first_of)
    if not found:
        return UploadRetention(None, None, [])
    rule, until = max(found, key=lambda item: item[1])
    return UploadRetention(until, rule, found)
