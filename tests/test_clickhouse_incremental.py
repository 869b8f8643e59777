"""Incremental ClickHouse backups by partition (strongroom.engines.clickhouse.incremental),
on 18.16 and 26.x: what is referenced and what is exported again, that a restore from an
incremental equals one from a full backup, that verify reads referenced artifacts, and
that retention never removes what a kept incremental references (a killed prune too).

The versions differ in how "unchanged" is proven: 26.x's ``system.parts`` has part
checksums, so an untouched partition is recognised without reading it; 18.16 has none,
so every partition is fingerprinted on the server (a scan, no transfer). Both reference
the same partitions."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pytest

from strongroom.catalog import Catalog, Manifest, manifest_key, owner_of
from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse import sql as chsql
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.errors import NotFound
from strongroom.policy.prune import prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.signing import sig_key
from strongroom.verify import verify_backup
from tests.test_clickhouse import Repo, Server, ch, conn_for, restore  # noqa: F401 (fixture)

MONTHS = 12
ROWS_PER_MONTH = 20_000
SCHEMA = """
CREATE TABLE {db}.facts (d Date, id UInt64, payload String, amount Decimal(18, 2))
    ENGINE = MergeTree PARTITION BY toYYYYMM(d) ORDER BY id
;CREATE TABLE {db}.dims (id UInt32, label String) ENGINE = MergeTree ORDER BY id
;CREATE TABLE {db}.notes (id UInt32, s String) ENGINE = Log
"""
FACTS = """
INSERT INTO {db}.facts SELECT addMonths(toDate('2025-01-01'), intDiv(number, {per})) + number % 28,
  number + {offset}, concat(hex(cityHash64(number)), toString(number * 7919)), number / 3
FROM system.numbers LIMIT {rows}
"""
REST = """
INSERT INTO {db}.dims SELECT number, concat('label ', toString(number))
  FROM system.numbers LIMIT 300
;INSERT INTO {db}.notes VALUES (1, 'a'), (2, 'b')
"""
POLICY = RetentionPolicy(keep_last=1, compliance_floor_years=0)


@pytest.fixture
def source(ch: Server) -> str:  # noqa: F811 (the fixture imported above)
    db = ch.new_db("inc")
    ch.run(f"CREATE DATABASE {db}")
    ch.run(SCHEMA, db=db)
    ch.run(FACTS, db=db, per=ROWS_PER_MONTH, rows=MONTHS * ROWS_PER_MONTH, offset=0)
    ch.run(REST, db=db)
    return db


def take(ch: Server, db: str, repo: Repo, key: EncryptionConfig, **kw: Any) -> Manifest:  # noqa: F811
    full = kw.pop("full", False)
    return backup_clickhouse(conn_for(ch, db, **kw), repo[0], repo[1], key, full=full)


def own(manifest: Manifest) -> list[Any]:
    return [a for a in manifest.artifacts if owner_of(a) == manifest.backup_id]


def table(manifest: Manifest, name: str) -> dict[str, Any]:
    return next(t for t in manifest.details["databases"][0]["tables"] if t["name"] == name)


def change_one_month(ch: Server, db: str) -> None:  # noqa: F811
    ch.run(FACTS, db=db, per=10**9, rows=500, offset=10_000_000)  # all into 2025-01


def test_only_the_changed_partition_is_exported_and_the_restore_is_identical(
    ch: Server,  # noqa: F811
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    base = take(ch, source, local_repo, age_key)
    assert base.details["incremental"]["mode"] == "full"
    assert base.details["incremental"]["full_reason"] == "no earlier backup of this target"
    assert len(table(base, "facts")["partition_states"]) == MONTHS
    change_one_month(ch, source)
    inc = take(ch, source, local_repo, age_key)

    section = inc.details["incremental"]
    assert section["mode"] == "incremental" and section["chain_length"] == 1
    assert inc.details["base_backup_id"] == base.backup_id
    assert inc.details["depends_on"] == [base.backup_id]
    assert inc.summary()["base_backup_id"] == base.backup_id  # `strongroom list` shows it
    assert base.summary()["base_backup_id"] is None
    exported = {a.meta.get("table") for a in own(inc)}
    # the changed month, and the Log table (no part state: its fingerprint is compared,
    # unchanged, so it is referenced too); the schema document is always written again
    assert [a.meta.get("partition_id") for a in own(inc) if a.meta.get("table") == "facts"] == [
        "202501"
    ]
    assert "dims" not in exported and "notes" not in exported
    referenced = [a for a in inc.artifacts if owner_of(a) == base.backup_id]
    assert len(referenced) == (MONTHS - 1) + 2  # 11 months, dims, notes
    assert all(a.meta["stored_by"] == base.backup_id for a in referenced)
    ratio = sum(a.stored_size for a in own(inc)) / sum(a.stored_size for a in own(base))
    assert ratio <= 0.15, ratio
    facts = table(inc, "facts")
    assert facts["rows"] == MONTHS * ROWS_PER_MONTH + 500
    assert (
        facts["fingerprint"]
        == table(take(ch, source, local_repo, age_key, full=True), "facts")["fingerprint"]
    )

    assert verify_backup(local_repo[0], inc, age_key)["ok"]  # referenced artifacts read too
    from_inc = ch.new_db("from_inc")
    report = restore(ch, local_repo, age_key, backup_id=inc.backup_id, target_database=from_inc)
    assert report["fingerprints_ok"]
    for name, order in (("facts", "id"), ("dims", "id"), ("notes", "id")):
        sql = "SELECT * FROM {t} ORDER BY " + order + " FORMAT TSV"
        assert ch.server.query_bytes(
            sql.format(t=chsql.qualified(from_inc, name))
        ) == ch.server.query_bytes(sql.format(t=chsql.qualified(source, name))), name


def test_merges_alters_full_and_full_every(
    ch: Server,  # noqa: F811
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    take(ch, source, local_repo, age_key)
    # a merge replaces parts but not content: referenced after a fingerprint (both versions)
    ch.q(f"OPTIMIZE TABLE {source}.facts PARTITION 202502 FINAL")
    ch.q(f"ALTER TABLE {source}.dims ADD COLUMN extra UInt8 DEFAULT 7")  # columns changed
    after = take(ch, source, local_repo, age_key)
    exported = {(a.meta.get("table"), a.meta.get("partition_id")) for a in own(after)}
    assert ("facts", "202502") not in exported and ("dims", None) in exported
    assert after.details["incremental"]["mode"] == "incremental"

    forced = take(ch, source, local_repo, age_key, full=True)
    section = forced.details["incremental"]
    assert (section["mode"], section["full_reason"]) == ("full", "full requested")
    assert section["reused_artifacts"] == 0
    assert "base_backup_id" not in forced.details
    second = take(ch, source, local_repo, age_key, full_every=3)
    third = take(ch, source, local_repo, age_key, full_every=3)
    fourth = take(ch, source, local_repo, age_key, full_every=3)  # full, +1, +2, full
    assert [m.details["incremental"]["chain_length"] for m in (second, third, fourth)] == [1, 2, 0]
    assert fourth.details["incremental"]["full_reason"] == "a full backup every 3 (chain of 3)"
    off = take(ch, source, local_repo, age_key, incremental=False)
    assert off.details["incremental"]["mode"] == "full"


def test_retention_keeps_what_a_kept_incremental_references(
    ch: Server,  # noqa: F811
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = local_repo[0]
    base = take(ch, source, local_repo, age_key)
    change_one_month(ch, source)
    inc = take(ch, source, local_repo, age_key)
    report = prune(repo, POLICY, engine="clickhouse", orphan_grace=dt.timedelta(0)).to_dict()
    actions = {b["backup_id"]: b["action"] for b in report["backups"]}
    assert actions == {base.backup_id: "keep", inc.backup_id: "keep"}

    # a prune killed after deleting the base's manifest (its data left behind): the
    # orphan pass must not delete data a kept incremental lists
    repo.delete(manifest_key("clickhouse", "ch1", base.backup_id))
    repo.delete(sig_key(manifest_key("clickhouse", "ch1", base.backup_id)))
    report = prune(repo, POLICY, engine="clickhouse", orphan_grace=dt.timedelta(0)).to_dict()
    orphan = next(o for o in report["orphans"] if o["backup_id"] == base.backup_id)
    assert orphan["action"] == "referenced" and inc.backup_id in orphan["detail"]
    into = ch.new_db("after_kill")
    assert restore(ch, local_repo, age_key, backup_id=inc.backup_id, target_database=into)[
        "fingerprints_ok"
    ]

    # a newer full lets both go: the incremental is deleted before the base it references
    newer = take(ch, source, local_repo, age_key, full=True)
    caplog.set_level(logging.INFO, logger="strongroom")
    report = prune(repo, POLICY, engine="clickhouse", orphan_grace=dt.timedelta(0)).to_dict()
    assert {b["backup_id"]: b["action"] for b in report["backups"]} == {
        inc.backup_id: "deleted",
        newer.backup_id: "keep",
    }
    orphan = next(o for o in report["orphans"] if o["backup_id"] == base.backup_id)
    assert orphan["action"] == "deleted"
    assert not list(repo.list(f"data/clickhouse/ch1/{base.backup_id}/"))
    assert verify_backup(repo, newer, age_key)["ok"]


def test_a_broken_chain_stops_restore_and_verify_before_anything_changes(
    ch: Server,  # noqa: F811
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    repo = local_repo[0]
    base = take(ch, source, local_repo, age_key)
    change_one_month(ch, source)
    inc = take(ch, source, local_repo, age_key)
    victim = next(
        a for a in inc.artifacts if owner_of(a) == base.backup_id and a.meta.get("table") == "facts"
    )
    repo.delete(victim.key)
    into = ch.new_db("broken")
    loaded = Catalog(repo).load("clickhouse", "ch1", inc.backup_id)
    assert not verify_backup(repo, loaded, age_key)["ok"]
    with pytest.raises(NotFound, match="incremental chain is broken") as caught:
        restore(ch, local_repo, age_key, backup_id=inc.backup_id, target_database=into)
    assert base.backup_id in str(caught.value)
    assert into not in ch.q("SELECT name FROM system.databases FORMAT TSVRaw").splitlines()
    plan = restore(
        ch, local_repo, age_key, backup_id=inc.backup_id, target_database=into, dry_run=True
    )
    assert "incremental chain is broken" in plan["blocked"]
    # the next backup does not build on an artifact that is gone: it exports that one
    again = take(ch, source, local_repo, age_key)
    pid = victim.meta["partition_id"]
    assert [a.meta["partition_id"] for a in own(again) if a.meta.get("table") == "facts"] == [pid]
    assert verify_backup(repo, again, age_key)["ok"]


def test_a_failed_incremental_removes_only_what_it_stored(
    ch: Server,  # noqa: F811
    source: str,
    local_repo: Repo,
    age_key: EncryptionConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clean-up of a backup that fails at the end deletes its own artifacts, never the
    base's artifacts it referenced."""
    from strongroom.engines.clickhouse import backup as engine

    repo = local_repo[0]
    base = take(ch, source, local_repo, age_key)
    change_one_month(ch, source)

    def refuse(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError("publishing refused (injected)")

    monkeypatch.setattr(engine, "publish_backup", refuse)
    with pytest.raises(RuntimeError, match="injected"):
        take(ch, source, local_repo, age_key)
    data = [o.key for o in repo.list("data/clickhouse/ch1/")]
    assert data and all(key.startswith(f"data/clickhouse/ch1/{base.backup_id}/") for key in data)
    assert verify_backup(repo, base, age_key)["ok"]


def test_referenced_artifacts_stay_locked_as_long_as_the_incremental(
    ch: Server,  # noqa: F811
    source: str,
    s3_server: Any,
    age_key: EncryptionConfig,
) -> None:
    """S3 object lock (COMPLIANCE, moto): the base's artifacts an incremental lists get the
    incremental's retain-until, so they cannot be deleted while its manifest is locked."""
    import time

    from tests.fixtures.compliant_bucket import compliant_bucket

    bucket = compliant_bucket(s3_server)
    repo: Repo = (bucket.repo, bucket.config)
    s3 = bucket.repo

    def until(key: str) -> dt.datetime:
        head = s3._client.head_object(Bucket=s3.bucket, Key=s3._full(key))
        found: dt.datetime = head["ObjectLockRetainUntilDate"]
        return found

    base = take(ch, source, repo, age_key)
    time.sleep(1.1)  # a later retain-until (second resolution)
    change_one_month(ch, source)
    inc = take(ch, source, repo, age_key)
    referenced = [a for a in inc.artifacts if owner_of(a) == base.backup_id]
    unreferenced = [a for a in own(base) if a.key not in {r.key for r in referenced}]
    newest = until(own(inc)[0].key)
    assert referenced and all(until(a.key) >= newest for a in referenced)
    assert unreferenced and all(until(a.key) < newest for a in unreferenced)
    assert verify_backup(s3, inc, age_key)["ok"]
