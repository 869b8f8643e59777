"""Lenient readers and signatures (issue 15, "Done when"): a backup written into the
repository by a second strongroom set-up (its own signing key) or by a bucket writer with
no key at all is never counted and is reported by compliance, health, metrics, wal-check
and retention; lone ``.sig`` objects are removed by retention only after the grace.
Real repositories: a local folder and the S3 server fixture."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from typing import Any

import pytest

from strongroom.catalog import Manifest, manifest_key
from strongroom.compliance import evaluate
from strongroom.compliance.evaluate import health_rows
from strongroom.compliance.model import TargetPolicy
from strongroom.config import RepositoryConfig
from strongroom.engines.postgres.pitr.basebackup import base_backups, base_backups_with_findings
from strongroom.engines.postgres.wal.check import wal_check
from strongroom.metrics import make_registry, take_snapshot
from strongroom.policy.orphan_sigs import lone_signatures
from strongroom.policy.prune import prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.repository import Repository
from strongroom.repository.base import ObjectInfo
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from strongroom.signing import SIG_SUFFIX, Signer, Trust, sig_key
from tests.test_compliance import BASE_DETAILS, add_backup, add_wal

REPOS = ["local_repo", "s3_repo"]
SHOP = TargetPolicy(engine="postgresql", target="shop", rpo_hours=6, pitr=True)
CACHE = TargetPolicy(engine="redis", target="cache", rpo_hours=6)


def _same_storage(repo: Repository, config: RepositoryConfig, trust: Trust) -> Repository:
    """Another set-up's view of the same storage, with its own keys."""
    if isinstance(repo, LocalRepository):
        return LocalRepository(repo.root, trust=trust)
    assert isinstance(repo, S3Repository)
    return S3Repository(config, trust=trust)


@dataclass
class Mixed:
    repo: Repository
    genuine: Manifest  # the newest trusted backup of postgresql/shop: 10 h old (stale)
    foreign_key: str  # a fresh base backup of shop signed by another set-up's key
    unsigned_key: str  # a fresh redis/cache manifest without any signature


@pytest.fixture(params=REPOS)
def mixed(request: pytest.FixtureRequest) -> Mixed:
    repo, config = request.getfixturevalue(request.param)
    add_backup(repo, "postgresql", "shop", hours_ago=30, kind="base", details=BASE_DETAILS)
    genuine = add_backup(
        repo, "postgresql", "shop", hours_ago=10, kind="base", details=BASE_DETAILS
    )
    add_wal(repo, "shop", list(range(3, 8)))
    other = Signer.generate()
    intruder = _same_storage(repo, config, Trust((other.public,), other))
    forged = add_backup(
        intruder, "postgresql", "shop", hours_ago=0.1, kind="base", details=BASE_DETAILS
    )
    assert forged.signed_by == other.key_id
    # a bucket writer with no key at all: a manifest copied from a genuine one, no .sig
    cache = add_backup(repo, "redis", "cache", hours_ago=0.2)
    ckey = manifest_key("redis", "cache", cache.backup_id)
    doc = json.loads(repo.get_bytes(ckey))
    bid = cache.backup_id[:-6] + "ffffff"
    doc["backup_id"] = bid
    unsigned = manifest_key("redis", "cache", bid)
    repo.put_bytes(unsigned, json.dumps(doc).encode())
    repo.delete(ckey)  # only the unsigned one is left for redis/cache
    repo.delete(sig_key(ckey))
    return Mixed(
        repo,
        genuine,
        manifest_key("postgresql", "shop", forged.backup_id),
        unsigned,
    )


def test_compliance_reports_foreign_and_unsigned_manifests(mixed: Mixed) -> None:
    report = evaluate(mixed.repo, targets=[SHOP, CACHE])
    sig = next(c for c in report.controls if c.id == "SR-SIG-01")
    assert sig.status == "fail"
    failed = {f.subject: f for f in sig.findings if f.status == "fail"}
    assert set(failed) == {mixed.foreign_key, mixed.unsigned_key}
    assert failed[mixed.foreign_key].data["status"] == "untrusted-key"
    assert "not signed by a trusted key" in failed[mixed.foreign_key].message
    assert failed[mixed.unsigned_key].data["status"] == "unsigned"
    assert (failed[mixed.unsigned_key].engine, failed[mixed.unsigned_key].target) == (
        "redis",
        "cache",
    )
    passed = [f for f in sig.findings if f.status == "pass"]
    assert [(f.subject, f.data["backups"]) for f in passed] == [("postgresql/shop", 2)]
    # the forged fresh backup does not make shop fresh; cache has no trusted backup at all
    fresh = {
        f.subject: f
        for c in report.controls
        if c.id == "SR-FRESH-01"
        for f in c.findings
        if f.engine
    }
    assert fresh["postgresql/shop"].status == "fail"
    assert fresh["postgresql/shop"].data["backup_id"] == mixed.genuine.backup_id
    assert fresh["redis/cache"].status == "fail"
    # and a repository holding only trusted backups passes, listing who signed them
    for key in (mixed.foreign_key, mixed.unsigned_key):
        mixed.repo.delete(key)
        mixed.repo.delete(sig_key(key))
    again = next(c for c in evaluate(mixed.repo, targets=[SHOP]).controls if c.id == "SR-SIG-01")
    assert again.status == "pass", again.findings
    assert "signed by trusted key(s) ed25519:" in again.summary


def test_compliance_fails_without_trusted_signers(mixed: Mixed) -> None:
    blind = (
        LocalRepository(mixed.repo.root, trust=Trust())
        if isinstance(mixed.repo, LocalRepository)
        else S3Repository(mixed.repo.config, trust=Trust())  # type: ignore[attr-defined]
    )
    sig = next(c for c in evaluate(blind, targets=[SHOP]).controls if c.id == "SR-SIG-01")
    assert sig.status == "fail"
    assert any("no trusted signers configured" in f.message for f in sig.findings)


def test_health_never_counts_an_untrusted_backup_and_reports_it(mixed: Mixed) -> None:
    rows, stale, untrusted = health_rows(mixed.repo, [SHOP, CACHE])
    by = {f"{r['engine']}/{r['target']}": r for r in rows}
    assert by["postgresql/shop"]["stale"] and by["redis/cache"]["stale"]
    assert by["postgresql/shop"]["backup_id"] == mixed.genuine.backup_id
    assert {r["engine"] + "/" + r["target"] for r in stale} == {"postgresql/shop", "redis/cache"}
    found = {u["key"]: u for u in untrusted}
    assert set(found) == {mixed.foreign_key, mixed.unsigned_key}
    assert found[mixed.foreign_key]["status"] == "untrusted-key"
    assert found[mixed.foreign_key]["resource_id"] == "strongroom.target.postgresql.shop"
    assert found[mixed.unsigned_key]["status"] == "unsigned"


def _samples(repo: Repository) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = make_registry(repo, cache_seconds=0)
    values = {}
    for family in registry.collect():
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def test_metrics_count_only_trusted_backups_and_gauge_untrusted(mixed: Mixed) -> None:
    snap = take_snapshot(mixed.repo)
    assert snap.backups[("postgresql", "shop")]["count"] == 2
    assert ("redis", "cache") not in snap.backups
    values = _samples(mixed.repo)
    shop = (("engine", "postgresql"), ("target", "shop"))
    cache = (("engine", "redis"), ("target", "cache"))
    assert values[("strongroom_backups_in_catalog", shop)] == 2
    assert values[("strongroom_backup_last_success_timestamp_seconds", shop)] == pytest.approx(
        mixed.genuine.finished_at.timestamp()
    )
    assert values[("strongroom_untrusted_manifests", shop)] == 1
    assert values[("strongroom_untrusted_manifests", cache)] == 1
    assert ("strongroom_backups_in_catalog", cache) not in values


def test_wal_check_ignores_and_reports_untrusted_base_backups(mixed: Mixed) -> None:
    bases, untrusted = base_backups_with_findings(mixed.repo, "shop")
    assert [m.backup_id for m in bases] == [m.backup_id for m in base_backups(mixed.repo, "shop")]
    assert mixed.genuine.backup_id in {m.backup_id for m in bases}
    report = wal_check(mixed.repo, "shop", bases, untrusted)
    assert [u["key"] for u in report["untrusted"]] == [mixed.foreign_key]
    assert not report["ok"]
    assert any("not signed by a trusted key, ignored" in p for p in report["problems"])
    assert mixed.foreign_key.rsplit("/", 1)[1][:-5] not in {
        b["backup_id"] for b in report["backups"]
    }
    # called without the findings (as the wal-check flow does): it reads them itself
    assert wal_check(mixed.repo, "shop", bases)["untrusted"] == report["untrusted"]


def test_retention_reports_and_never_deletes_or_counts_untrusted(mixed: Mixed) -> None:
    report = prune(mixed.repo, RetentionPolicy(keep_last=1, compliance_floor_years=0)).to_dict()
    untrusted = {f["key"] for f in report["findings"] if f["reason"] == "untrusted"}
    assert untrusted == {mixed.foreign_key, mixed.unsigned_key}
    # the forged newer backup did not count as the one kept: the genuine newest is kept
    actions = {b["backup_id"]: b["action"] for b in report["backups"]}
    assert actions[mixed.genuine.backup_id] == "keep"
    assert list(actions.values()).count("deleted") == 1
    assert mixed.repo.exists(mixed.foreign_key) and mixed.repo.exists(sig_key(mixed.foreign_key))
    assert mixed.repo.exists(mixed.unsigned_key)
    assert report["orphan_signatures"] == []


# ------------------------------------------------------------------ lone signatures


def _info(key: str) -> ObjectInfo:
    return ObjectInfo(key=key, size=64, modified=dt.datetime.now(dt.UTC))


def test_lone_signatures_in_a_sorted_listing() -> None:
    keys = sorted(
        [
            "catalog/p/t/a.json",
            "catalog/p/t/a.json.partial",
            "catalog/p/t/a.json.sig",
            "catalog/p/t/b.json.sig",
            "catalog/p/t/c.json",
            "catalog/p/t/c.jsonx.sig",
            "catalog/p/t/d.json.sig.sig",
        ]
    )
    lone = [i.key for i in lone_signatures(_info(k) for k in keys)]
    assert lone == [
        "catalog/p/t/b.json.sig",
        "catalog/p/t/c.jsonx.sig",
        "catalog/p/t/d.json.sig.sig",
    ]


def _lone_sig(repo: Repository, backup_id: str, target: str = "shop") -> str:
    key = manifest_key("postgresql", target, backup_id) + SIG_SUFFIX
    repo.put_bytes(key, os.urandom(64))
    return key


def test_retention_removes_old_lone_signatures_keeps_fresh_ones_local(
    local_repo: tuple[LocalRepository, Any],
) -> None:
    repo, _ = local_repo
    kept = add_backup(repo, "postgresql", "shop", hours_ago=1)
    old = _lone_sig(repo, "20260101T000000Z-aaaaaa")
    fresh = _lone_sig(repo, "20260102T000000Z-bbbbbb")
    two_days_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=48)).timestamp()
    os.utime(repo.root / old, (two_days_ago, two_days_ago))
    policy = RetentionPolicy(keep_last=5, compliance_floor_years=0)

    dry = prune(repo, policy, dry_run=True).to_dict()
    assert {o["key"]: o["action"] for o in dry["orphan_signatures"]} == {
        old: "would delete",
        fresh: "too recent (grace period)",
    }
    assert repo.exists(old)
    report = prune(repo, policy).to_dict()
    assert {o["key"]: o["action"] for o in report["orphan_signatures"]} == {
        old: "deleted",
        fresh: "too recent (grace period)",
    }
    assert report["summary"]["orphan_signatures"] == 2 and report["ok"]
    assert not repo.exists(old) and repo.exists(fresh)
    # the genuine backup's own signature is never a lone one
    assert repo.exists(sig_key(manifest_key("postgresql", "shop", kept.backup_id)))
    # scoped to another target: shop's lone signature is not touched
    scoped = prune(repo, policy, engine="postgresql", target="other", orphan_grace=dt.timedelta(0))
    assert scoped.orphan_signatures == [] and repo.exists(fresh)


def test_retention_removes_old_lone_signatures_keeps_fresh_ones_s3(
    s3_repo: tuple[S3Repository, Any],
) -> None:
    repo, _ = s3_repo
    kept = add_backup(repo, "postgresql", "shop", hours_ago=1)
    lone = _lone_sig(repo, "20260101T000000Z-aaaaaa")
    policy = RetentionPolicy(keep_last=5, compliance_floor_years=0)
    report = prune(repo, policy).to_dict()  # written just now: within the 24 h grace
    assert [(o["key"], o["action"]) for o in report["orphan_signatures"]] == [
        (lone, "too recent (grace period)")
    ]
    assert repo.exists(lone)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=25)  # a run a day later
    report = prune(repo, policy, now=later).to_dict()
    assert [(o["key"], o["action"]) for o in report["orphan_signatures"]] == [(lone, "deleted")]
    assert not repo.exists(lone)
    assert repo.exists(sig_key(manifest_key("postgresql", "shop", kept.backup_id)))
