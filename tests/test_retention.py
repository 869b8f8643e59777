"""Retention: property tests over synthetic multi-year calendars, and real runs against
a local repository and an object-lock S3 bucket (moto)."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from strongroom.catalog import Artifact, Catalog, Manifest, data_key, manifest_key
from strongroom.config import RepositoryConfig
from strongroom.errors import AccessDenied, InvalidInput
from strongroom.policy import pins as pins_mod
from strongroom.policy.prune import find_orphans, prune
from strongroom.policy.retention import (
    BackupPoint,
    RetentionPolicy,
    _day_index,
    _month_index,
    _week_index,
    _year_index,
    evaluate,
    upload_retain_until,
)
from strongroom.policy.upload import upload_settings
from strongroom.policy.verification import SamplingPolicy, select_backups
from strongroom.policy.wal import base_start_segment, lsn_segment
from strongroom.repository.base import Repository, StorageSettings
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config, suite_trust

UTC = dt.UTC
EPOCH = dt.datetime(2019, 1, 1, tzinfo=UTC)

# ----------------------------------------------------------------- strategies


@st.composite
def calendars(draw: st.DrawFn) -> tuple[list[BackupPoint], dt.datetime]:
    """A series of backups over up to ~5 years with gaps, bursts and pins/locks."""
    start = EPOCH + dt.timedelta(hours=draw(st.integers(0, 24 * 365)))
    n = draw(st.integers(1, 120))
    gaps = draw(
        st.lists(
            st.one_of(
                st.integers(1, 6),  # bursts within a day
                st.integers(20, 30),  # roughly daily
                st.integers(24 * 5, 24 * 40),  # gaps of days/weeks
            ),
            min_size=n,
            max_size=n,
        )
    )
    points: list[BackupPoint] = []
    t = start
    for i, gap in enumerate(gaps):
        t = t + dt.timedelta(hours=gap, minutes=draw(st.integers(0, 59)))
        points.append(
            BackupPoint(
                backup_id=f"{t:%Y%m%dT%H%M%SZ}-{i:06x}",
                started_at=t,
                finished_at=t + dt.timedelta(minutes=5),
                engine="postgresql",
                target="db1",
            )
        )
    now = points[-1].started_at + dt.timedelta(hours=draw(st.integers(0, 24 * 400)))
    flagged = draw(st.lists(st.integers(0, n - 1), max_size=4))
    for i in flagged:
        if draw(st.booleans()):
            points[i] = replace(points[i], pinned=True)
        else:
            until = now + dt.timedelta(days=draw(st.integers(-30, 30)))
            points[i] = replace(points[i], locked_until=until, lock_detail="COMPLIANCE")
    return points, now


policies = st.builds(
    RetentionPolicy,
    keep_last=st.integers(0, 10),
    recovery_window_days=st.sampled_from([0, 7, 35]),
    daily=st.integers(0, 14),
    weekly=st.integers(0, 8),
    monthly=st.integers(0, 24),
    yearly=st.integers(0, 5),
    min_redundancy=st.integers(1, 5),
    compliance_floor_years=st.sampled_from([0, 1, 7]),
)

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GFS_INDEX = {
    "gfs-daily": ("daily", _day_index),
    "gfs-weekly": ("weekly", _week_index),
    "gfs-monthly": ("monthly", _month_index),
    "gfs-yearly": ("yearly", _year_index),
}


# --------------------------------------------------------------- properties


@PROPS
@given(calendars(), policies)
def test_never_deletes_newest_pinned_locked_or_below_redundancy(
    cal: tuple[list[BackupPoint], dt.datetime], policy: RetentionPolicy
) -> None:
    points, now = cal
    decisions = evaluate(points, policy, now)
    assert len(decisions) == len(points)
    by_id = {d.backup_id: d for d in decisions}
    newest = max(points, key=lambda b: (b.started_at, b.backup_id))
    assert by_id[newest.backup_id].keep
    kept = [d for d in decisions if d.keep]
    assert len(kept) >= min(policy.min_redundancy, len(points))
    for b in points:
        d = by_id[b.backup_id]
        if b.pinned:
            assert d.keep and d.rule == "pinned" and d.forever
        if b.locked_until is not None and b.locked_until > now:
            assert d.keep and any(r.startswith("object-lock until") for r in d.rules)
        if d.keep:
            assert d.rules, "every kept backup names the rule that keeps it"
        else:
            assert d.rules == () and d.reason == "no rule keeps it"


@PROPS
@given(calendars(), policies)
def test_gfs_window_and_compliance_pick_the_right_backups(
    cal: tuple[list[BackupPoint], dt.datetime], policy: RetentionPolicy
) -> None:
    points, now = cal
    decisions = {d.backup_id: d for d in evaluate(points, policy, now)}
    ordered = sorted(points, key=lambda b: (b.started_at, b.backup_id))
    for rule, (attr, index) in GFS_INDEX.items():
        count = getattr(policy, attr)
        firsts: dict[int, BackupPoint] = {}
        for b in ordered:
            firsts.setdefault(index(b.started_at), b)
        expected = {b.backup_id for p, b in firsts.items() if count and 0 <= index(now) - p < count}
        actual = {
            bid for bid, d in decisions.items() if any(r.startswith(rule + " ") for r in d.rules)
        }
        assert actual == expected, rule
    # compliance floor: each year's first backup, for N years after it was taken
    years: dict[int, BackupPoint] = {}
    for b in ordered:
        years.setdefault(b.started_at.year, b)
    for b in years.values():
        if policy.compliance_floor_years:
            end = b.started_at.replace(year=b.started_at.year + policy.compliance_floor_years)
            if now < end - dt.timedelta(days=1):
                assert any(r.startswith("compliance-floor") for r in decisions[b.backup_id].rules)
    # recovery window: everything inside, plus the newest one before it
    if policy.recovery_window_days:
        start = now - dt.timedelta(days=policy.recovery_window_days)
        inside = [b for b in ordered if b.started_at >= start]
        before = [b for b in ordered if b.started_at < start]
        for b in inside:
            assert decisions[b.backup_id].keep
        if before:
            anchor = decisions[before[-1].backup_id]
            assert any(r.startswith("recovery-window-anchor") for r in anchor.rules)
    # keep-last
    for b in ordered[::-1][: policy.keep_last]:
        assert any(r.startswith("keep-last") for r in decisions[b.backup_id].rules)


@PROPS
@given(calendars(), policies, st.integers(0, 24 * 3000))
def test_upload_time_lock_never_fights_the_policy(
    cal: tuple[list[BackupPoint], dt.datetime], policy: RetentionPolicy, later_hours: int
) -> None:
    """The retain-until computed at upload is a time the policy keeps the backup to."""
    points, _ = cal
    points = [replace(p, pinned=False, locked_until=None) for p in points]
    ordered = sorted(points, key=lambda b: (b.started_at, b.backup_id))
    now = ordered[-1].started_at + dt.timedelta(hours=later_hours)
    decisions = {d.backup_id: d for d in evaluate(points, policy, now)}
    for i, b in enumerate(ordered):
        lock = upload_retain_until(policy, b.started_at, [p.started_at for p in ordered[:i]])
        if lock.retain_until is not None and now < lock.retain_until:
            d = decisions[b.backup_id]
            assert d.keep, (b.backup_id, lock)
            assert d.keep_until is not None and d.keep_until >= lock.retain_until


def test_gfs_keeps_first_backup_of_each_period_on_a_daily_calendar() -> None:
    """Nightly backups for three years: the exact set a GFS 7/4/12/3 policy keeps."""
    points = []
    t = dt.datetime(2021, 1, 1, 2, 0, tzinfo=UTC)
    while t < dt.datetime(2024, 1, 1, tzinfo=UTC):
        points.append(BackupPoint(f"{t:%Y%m%dT%H%M%SZ}-000000", t, t, "postgresql", "db"))
        t += dt.timedelta(days=1)
    now = dt.datetime(2023, 12, 31, 12, tzinfo=UTC)
    policy = RetentionPolicy(daily=7, weekly=4, monthly=12, yearly=3, compliance_floor_years=0)
    kept = {d.backup_id[:8] for d in evaluate(points, policy, now) if d.keep}
    daily = {f"202312{d:02d}" for d in range(25, 32)}
    weekly = {"20231211", "20231218", "20231225", "20231204"}  # Mondays of the last 4 ISO weeks
    monthly = {f"2023{m:02d}01" for m in range(1, 13)}
    yearly = {"20210101", "20220101", "20230101"}
    assert kept == daily | weekly | monthly | yearly


def test_compliance_floor_defaults_to_seven_years_for_yearly_copies() -> None:
    t0 = dt.datetime(2020, 3, 1, 2, tzinfo=UTC)
    points = [
        BackupPoint(
            f"{t0 + dt.timedelta(days=i):%Y%m%dT%H%M%SZ}-00000{i}", t0 + dt.timedelta(days=i)
        )
        for i in range(3)
    ]
    policy = RetentionPolicy(keep_last=1)
    assert policy.compliance_floor_years == 7
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    decisions = evaluate(points, policy, now)
    assert [d.keep for d in decisions] == [True, False, True]
    assert decisions[0].rule == "compliance-floor 7y"
    assert decisions[0].keep_until == dt.datetime(2027, 3, 1, 2, tzinfo=UTC)
    lock = upload_retain_until(policy, points[0].started_at, [])
    assert lock.retain_until == dt.datetime(2027, 3, 1, 2, tzinfo=UTC)
    assert lock.rule == "compliance-floor 7y"
    # the second backup of 2020 is not a yearly copy: nothing time-based keeps it
    assert upload_retain_until(policy, points[1].started_at, [points[0].started_at]).rule is None


def test_dependencies_of_kept_backups_are_kept() -> None:
    t0 = dt.datetime(2024, 5, 1, tzinfo=UTC)
    full = BackupPoint("20240501T000000Z-aaaaaa", t0)
    inc1 = BackupPoint(
        "20240502T000000Z-bbbbbb", t0 + dt.timedelta(days=1), depends_on=(full.backup_id,)
    )
    inc2 = BackupPoint(
        "20240503T000000Z-cccccc", t0 + dt.timedelta(days=2), depends_on=(inc1.backup_id,)
    )
    policy = RetentionPolicy(keep_last=1, compliance_floor_years=0)
    decisions = {
        d.backup_id: d for d in evaluate([full, inc1, inc2], policy, t0 + dt.timedelta(days=9))
    }
    assert all(d.keep for d in decisions.values())
    assert decisions[full.backup_id].rule == f"dependency of {inc1.backup_id}"


def test_policy_without_rules_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no rule"):
        RetentionPolicy(compliance_floor_years=0).check_usable()


def test_sampling_picks_newest_unverified_stale_then_random() -> None:
    now = dt.datetime(2024, 6, 1, tzinfo=UTC)
    manifests = [_manifest("t1", now - dt.timedelta(days=d)) for d in range(30, 0, -1)]
    verified = {m.backup_id: now - dt.timedelta(days=5) for m in manifests[:20]}
    verified[manifests[0].backup_id] = now - dt.timedelta(days=60)
    policy = SamplingPolicy(reverify_after_days=30, sample_fraction=0.2, seed=1)
    picks = select_backups(manifests, verified, policy, now)
    reasons = {p.manifest.backup_id: p.reason for p in picks}
    assert reasons[manifests[-1].backup_id] == "newest"
    assert all(reasons[m.backup_id] == "never verified" for m in manifests[20:-1])
    assert reasons[manifests[0].backup_id].startswith("verification stale")
    assert sum(1 for r in reasons.values() if r == "random sample") == 4  # 20% of 19 left
    capped = select_backups(manifests, verified, policy.model_copy(update={"max_backups": 3}), now)
    assert capped[0].reason == "newest" and len(capped) == 3


# ------------------------------------------------------------- repositories


def _manifest(
    target: str,
    started: dt.datetime,
    *,
    kind: str = "logical",
    engine: str = "postgresql",
    details: dict[str, object] | None = None,
    artifacts: list[Artifact] | None = None,
) -> Manifest:
    bid = f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    return Manifest(
        backup_id=bid,
        engine=engine,
        target=target,
        kind=kind,
        started_at=started,
        finished_at=started + dt.timedelta(minutes=3),
        repository="test",
        artifacts=artifacts or [],
        details=details or {},
    )


def _write_backup(
    repo: Repository,
    target: str,
    started: dt.datetime,
    *,
    settings: StorageSettings | None = None,
    kind: str = "logical",
    details: dict[str, object] | None = None,
) -> Manifest:
    """A synthetic backup: two small artifacts, then the manifest (written last)."""
    m = _manifest(target, started, kind=kind, details=details)
    artifacts = []
    for name in ("db000-app.pgdump", "globals.sql"):
        key = data_key(m.engine, target, m.backup_id, name)
        body = secrets.token_bytes(64)
        repo.put_bytes(key, body, settings=settings)
        artifacts.append(
            Artifact(
                name=name,
                key=key,
                content="test",
                raw_size=64,
                stored_size=64,
                raw_sha256="0" * 64,
                stored_sha256="0" * 64,
            )
        )
    m = m.model_copy(update={"artifacts": artifacts})
    Catalog(repo).write(m, settings)
    return m


def _keys(repo: Repository, m: Manifest) -> list[str]:
    mkey = manifest_key(m.engine, m.target, m.backup_id)
    return [mkey, mkey + ".sig", *(a.key for a in m.artifacts)]


class FlakyDeletes(LocalRepository):
    """Deletes of data objects fail once: a crash between manifest and data deletion."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, trust=suite_trust())
        self.fail = True
        self.deleted: list[str] = []

    def delete(self, key: str) -> None:
        if self.fail and key.startswith("data/"):
            raise AccessDenied(f"simulated failure deleting {key}")
        self.deleted.append(key)
        super().delete(key)


def test_prune_local_manifest_first_then_orphans_cleaned(tmp_path: Path) -> None:
    repo = FlakyDeletes(tmp_path / "repo")
    now = dt.datetime.now(UTC)
    old = _write_backup(repo, "db1", now - dt.timedelta(days=40))
    mid = _write_backup(repo, "db1", now - dt.timedelta(days=20))
    new = _write_backup(repo, "db1", now - dt.timedelta(hours=2))
    policy = RetentionPolicy(keep_last=1, compliance_floor_years=0)

    dry = prune(repo, policy, dry_run=True).to_dict()
    assert [b["action"] for b in dry["backups"]] == ["would-delete", "would-delete", "keep"]
    assert dry["backups"][2]["rule"] == "keep-last 1"
    assert all(repo.exists(k) for m in (old, mid, new) for k in _keys(repo, m))

    pins_mod.pin(repo, mid.backup_id, reason="legal asked")
    report = prune(repo, policy).to_dict()
    actions = {b["backup_id"]: (b["action"], b["rule"]) for b in report["backups"]}
    assert actions[mid.backup_id] == ("keep", "pinned")
    assert actions[old.backup_id][0] == "error"
    # the manifest went first: no manifest points at deleted data, data is now an orphan
    assert not repo.exists(manifest_key("postgresql", "db1", old.backup_id))
    assert all(repo.exists(a.key) for a in old.artifacts)
    assert [b.backup_id for b in Catalog(repo).list()] == [mid.backup_id, new.backup_id]

    repo.fail = False
    orphans, dangling = find_orphans(repo)
    assert [o["backup_id"] for o in orphans] == [old.backup_id]
    assert orphans[0]["action"] == "recent" and not dangling  # younger than the 24 h grace
    report = prune(repo, policy, orphan_grace=dt.timedelta(0)).to_dict()
    assert [o["action"] for o in report["orphans"]] == ["deleted"]
    assert not any(repo.exists(a.key) for a in old.artifacts)
    assert report["ok"]

    pins_mod.unpin(repo, mid.backup_id)
    report = prune(repo, policy).to_dict()
    assert {b["backup_id"]: b["action"] for b in report["backups"]} == {
        mid.backup_id: "deleted",
        new.backup_id: "keep",
    }


def test_wal_older_than_oldest_retained_base_is_dropped(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path / "repo")
    now = dt.datetime.now(UTC)
    for tli, names in (
        ("00000001", [f"0000000100000000000000{n:02X}" for n in range(1, 9)]),
        ("00000002", ["000000020000000000000007", "000000020000000000000008", "00000002.history"]),
    ):
        for name in names:
            repo.put_bytes(f"wal/pitr1/{tli}/{name}", b"x" * 10)
    repo.put_bytes("wal/pitr1/00000001/000000010000000000000002.00000028.backup", b"label")
    old = _write_backup(
        repo,
        "pitr1",
        now - dt.timedelta(days=30),
        kind="base",
        details={"start_lsn": "0/2000028", "timeline": 1},
    )
    kept = _write_backup(
        repo,
        "pitr1",
        now - dt.timedelta(days=3),
        kind="base",
        details={"start_wal": "000000010000000000000005", "wal_target": "pitr1"},
    )
    assert base_start_segment(old) == "000000010000000000000002" == lsn_segment("0/2000028", 1)
    policy = RetentionPolicy(keep_last=1, compliance_floor_years=0)
    report = prune(repo, policy).to_dict()
    assert {b["backup_id"]: b["action"] for b in report["backups"]} == {
        old.backup_id: "deleted",
        kept.backup_id: "keep",
    }
    (wal,) = report["wal"]
    assert wal["oldest_needed"] == "000000010000000000000005" and wal["needed_by"] == kept.backup_id
    left = sorted(i.key.split("/")[-1] for i in repo.list("wal/pitr1/"))
    assert left == sorted(
        [
            "000000010000000000000005",
            "000000010000000000000006",
            "000000010000000000000007",
            "000000010000000000000008",
            "000000020000000000000007",
            "000000020000000000000008",
            "00000002.history",
        ]
    )


# ---------------------------------------------------------------------- S3


def _s3_config(server: object, bucket: str, **extra: object) -> RepositoryConfig:
    return signed_config(
        kind="s3",
        bucket=bucket,
        prefix="vault",
        endpoint_url=server.endpoint_url,  # type: ignore[attr-defined]
        access_key_id=server.access_key,  # type: ignore[attr-defined]
        secret_access_key=SecretStr(server.secret_key),  # type: ignore[attr-defined]
        **extra,  # type: ignore[arg-type]
    )


def test_s3_object_lock_survives_and_is_reported(s3_server: object, s3_locked_bucket: str) -> None:
    plain = S3Repository(_s3_config(s3_server, s3_locked_bucket))
    locked = S3Repository(
        _s3_config(s3_server, s3_locked_bucket, lock_mode="COMPLIANCE", retention_days=1)
    )
    now = dt.datetime.now(UTC)
    until = (now + dt.timedelta(days=2)).replace(microsecond=0)
    a = _write_backup(locked, "db1", now - dt.timedelta(days=900), settings=StorageSettings(until))
    b = _write_backup(plain, "db1", now - dt.timedelta(days=800))
    c = _write_backup(plain, "db1", now - dt.timedelta(days=30))
    d = _write_backup(plain, "db1", now - dt.timedelta(hours=1))
    # an interrupted multipart upload and an orphaned data folder
    s3 = s3_server.s3()  # type: ignore[attr-defined]
    s3.create_multipart_upload(Bucket=s3_locked_bucket, Key="vault/data/postgresql/db1/x/part")
    orphan_key = "data/postgresql/db1/20200101T000000Z-0f0f0f/db000-app.pgdump"
    plain.put_bytes(orphan_key, b"left behind")

    policy = RetentionPolicy(keep_last=1, compliance_floor_years=0)
    dry = prune(plain, policy, dry_run=True, orphan_grace=dt.timedelta(0)).to_dict()
    by_id = {r["backup_id"]: r for r in dry["backups"]}
    assert by_id[a.backup_id]["action"] == "locked"
    assert by_id[a.backup_id]["detail"].startswith(f"locked until {until.isoformat()}")
    assert "COMPLIANCE" in by_id[a.backup_id]["detail"]
    assert [by_id[x.backup_id]["action"] for x in (b, c, d)] == [
        "would-delete",
        "would-delete",
        "keep",
    ]
    assert dry["orphans"][0]["action"] == "would delete"
    assert all(plain.exists(k) for m in (a, b, c, d) for k in _keys(plain, m))

    report = prune(plain, policy, orphan_grace=dt.timedelta(0)).to_dict()
    by_id = {r["backup_id"]: r for r in report["backups"]}
    assert by_id[a.backup_id]["action"] == "locked"
    assert {o["key"] for o in by_id[a.backup_id]["locked_objects"]} == set(_keys(plain, a))
    assert [by_id[x.backup_id]["action"] for x in (b, c)] == ["deleted", "deleted"]
    assert report["summary"]["locked"] == 1 and report["ok"], report["errors"]
    assert report["incomplete_uploads_removed"] == 1
    assert report["orphans"][0]["action"] == "deleted"
    # the locked backup is whole; the deleted ones are gone, every version of them
    assert all(plain.exists(k) for k in _keys(plain, a))
    assert [m.backup_id for m in Catalog(plain).list()] == [a.backup_id, d.backup_id]
    versions = s3.list_object_versions(Bucket=s3_locked_bucket, Prefix="vault/")
    remaining = {v["Key"] for v in versions.get("Versions", [])} | {
        m["Key"] for m in versions.get("DeleteMarkers", [])
    }
    for m in (b, c):
        assert not any(m.backup_id in key for key in remaining)
    assert not any("0f0f0f" in key for key in remaining)
    head = s3.head_object(Bucket=s3_locked_bucket, Key=f"vault/{a.artifacts[0].key}")
    assert head["ObjectLockMode"] == "COMPLIANCE"


def test_s3_upload_settings_lock_yearly_copy_for_the_compliance_floor(
    s3_server: object, s3_locked_bucket: str
) -> None:
    config = _s3_config(s3_server, s3_locked_bucket, lock_mode="GOVERNANCE", retention_days=3)
    repo = S3Repository(config)
    policy = RetentionPolicy(recovery_window_days=35)
    year = dt.datetime.now(UTC).year
    first = dt.datetime(year, 1, 1, 2, tzinfo=UTC)
    if first > dt.datetime.now(UTC) - dt.timedelta(days=1):  # 1 January: use last year
        first = first.replace(year=year - 1)
    s1 = upload_settings(repo, config, "postgresql", "db9", first, policy)
    assert s1.retain_until == first.replace(year=first.year + 7)
    m1 = _write_backup(repo, "db9", first, settings=s1)
    second = first + dt.timedelta(hours=20)
    s2 = upload_settings(repo, config, "postgresql", "db9", second, policy)
    assert s2.retain_until == second + dt.timedelta(days=35)  # not the year's first any more
    head = s3_server.s3().head_object(  # type: ignore[attr-defined]
        Bucket=s3_locked_bucket, Key=f"vault/{m1.artifacts[0].key}"
    )
    assert head["ObjectLockRetainUntilDate"] == s1.retain_until
    assert json.loads(repo.get_bytes(manifest_key("postgresql", "db9", m1.backup_id)))
