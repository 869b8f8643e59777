"""ClickHouse ``method: native``: the server's BACKUP ... TO S3 into the repository, verified
by a scratch RESTORE, restored by RESTORE DATABASE; retention, compliance and secrets.

Real servers only: ClickHouse 26.9 (chdb-core) writing into moto's S3 over HTTP, and
Debian's 18.16 for the refusal. Most tests are ch26-only (``ONLY_CH26``): 18.16 has no
BACKUP statement at all, which ``test_server_without_backup_is_refused`` shows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.catalog import Catalog, manifest_key
from strongroom.compliance.controls import CONTROLS
from strongroom.compliance.evaluate import evaluate
from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.native_backup import backup_native
from strongroom.engines.clickhouse.native_restore import VERIFY_PREFIX, verify_native_backup
from strongroom.engines.clickhouse.plan import ChRestoreRequest
from strongroom.engines.clickhouse.restore import restore_clickhouse
from strongroom.errors import IntegrityError, InvalidInput, StrongroomError, TargetNotEmpty
from strongroom.policy.prune import prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from strongroom.sandbox.clickhouse import HTTPQueries
from strongroom.verify import verify_backup
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import signed_config

# 18.16 has no BACKUP/RESTORE statement (test_server_without_backup_is_refused): the
# native method only exists on the 26.x server
ONLY_CH26 = pytest.mark.parametrize("clickhouse_server", ["ch26"], indirect=True)
ONLY_CH18 = pytest.mark.parametrize("clickhouse_server", ["ch18"], indirect=True)
SECRET = f"sr-native-secret-{uuid.uuid4().hex}"  # moto takes any secret; this one is findable


class Rig:
    def __init__(
        self, server: HTTPQueries, moto: MotoServer, *, lock: bool = False, default_sse: bool = True
    ) -> None:
        self.server = server
        self.bucket = moto.create_bucket(object_lock=lock)
        if default_sse:  # the server sends no SSE headers: only the bucket's default applies
            moto.s3().put_bucket_encryption(
                Bucket=self.bucket,
                ServerSideEncryptionConfiguration={
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                },
            )
        self.config = signed_config(
            kind="s3",
            bucket=self.bucket,
            prefix="backups",
            endpoint_url=moto.endpoint_url,
            access_key_id="testing",
            secret_access_key=SecretStr(SECRET),
            part_size=5 * 1024 * 1024,
            sse="AES256",
            **({"lock_mode": "GOVERNANCE", "retention_days": 1} if lock else {}),
        )
        self.repo = S3Repository(self.config)
        self.db = f"nat_{uuid.uuid4().hex[:8]}"
        self.moto = moto

    def conn(self, **extra: Any) -> ClickHouseConnection:
        return ClickHouseConnection(
            name="chnat",
            host=self.server.host,
            port=self.server.tcp_port,
            http_port=self.server.http_port,
            databases=[self.db],
            method="native",
            **extra,
        )

    def q(self, sql: str) -> str:
        return self.server.query(sql).strip()

    def make_data(self) -> None:
        db = self.db
        for stmt in (
            f"CREATE DATABASE {db}",
            f"CREATE TABLE {db}.events (id UInt64, day Date, s String) ENGINE = MergeTree "
            "PARTITION BY toYYYYMM(day) ORDER BY id",
            f"INSERT INTO {db}.events SELECT number, toDate('2024-01-01') + number % 90, "
            f"toString(number) FROM numbers(5000)",
            f"CREATE TABLE {db}.log (a UInt8, b String) ENGINE = Log",
            f"INSERT INTO {db}.log VALUES (1, 'x'), (2, 'y')",
            f"CREATE VIEW {db}.v AS SELECT id FROM {db}.events WHERE id < 10",
            f"CREATE MATERIALIZED VIEW {db}.mv ENGINE = SummingMergeTree ORDER BY day "
            f"AS SELECT day, count() AS c FROM {db}.events GROUP BY day",
            f"INSERT INTO {db}.events SELECT number + 10000, toDate('2024-02-01'), 'mv' "
            "FROM numbers(100)",
        ):
            self.q(stmt)

    def drop(self, *dbs: str) -> None:
        for db in dbs:
            sync = " SYNC" if self.server.label == "ch26" else ""  # 18.16 has no SYNC
            self.q(f"DROP DATABASE IF EXISTS {db}{sync}")

    def keys(self, backup_id: str) -> list[str]:
        return [i.key for i in self.repo.list(f"data/clickhouse/chnat/{backup_id}/")]


@pytest.fixture
def rig(clickhouse_server: HTTPQueries, s3_server: MotoServer) -> Iterator[Rig]:
    r = Rig(clickhouse_server, s3_server)
    yield r
    r.drop(r.db, f"{r.db}_r")
    s3_server.delete_bucket(r.bucket)


def content(rig: Rig, db: str) -> list[str]:
    return [
        rig.q(f"SELECT count(), sum(cityHash64(*)) FROM {db}.events"),
        rig.q(f"SELECT * FROM {db}.log ORDER BY a FORMAT TSV"),
        rig.q(f"SELECT count() FROM {db}.v"),
        rig.q(f"SELECT sum(c) FROM {db}.mv"),
    ]


@ONLY_CH26
def test_native_round_trip(rig: Rig, age_key: EncryptionConfig) -> None:
    rig.make_data()
    before = content(rig, rig.db)
    t0 = time.monotonic()
    manifest = backup_clickhouse(rig.conn(), rig.repo, rig.config, age_key)
    took = time.monotonic() - t0
    assert manifest.kind == "native"
    assert {a.encryption for a in manifest.artifacts} == {"none"}
    assert all(not a.recipients for a in manifest.artifacts)
    assert {a.meta["server_side_encryption"] for a in manifest.artifacts} == {"AES256"}
    keys = rig.keys(manifest.backup_id)
    prefix = f"data/clickhouse/chnat/{manifest.backup_id}/native/"
    assert sorted(a.key for a in manifest.artifacts) == sorted(keys)
    assert all(k.startswith(prefix) for k in keys)
    assert f"{prefix}.backup" in keys
    assert "server-side only" in manifest.details["encryption"]
    tables = {t["name"]: t for t in manifest.details["databases"][0]["tables"]}
    assert tables["events"]["rows"] == 5100 and len(tables["events"]["partitions"]) == 3
    assert tables["log"]["rows"] == 2
    assert "base_backup_id" not in manifest.details

    # offline verify: every server-written object against its sha256
    offline = verify_backup(
        rig.repo, Catalog(rig.repo).load("clickhouse", "chnat", manifest.backup_id), age_key
    )
    assert offline["ok"], offline
    assert any("written by the database server" in w for w in offline["warnings"])

    report = verify_native_backup(rig.conn(), rig.repo, manifest, age_key)
    assert report["ok"], report
    assert report["bytes_read"] == manifest.stored_size
    assert {c["table"].split(".")[1] for c in report["checks"]} == {"events", "log", "mv"}
    assert not rig.q(f"SELECT name FROM system.databases WHERE name LIKE '{VERIFY_PREFIX}%'")

    req = ChRestoreRequest(backup_id=manifest.backup_id, target_database=f"{rig.db}_r")
    restored = restore_clickhouse(rig.conn(), rig.repo, age_key, req)
    assert restored["fingerprints_ok"] and restored["checks"]
    assert all(c["ok"] for c in restored["checks"])
    assert content(rig, f"{rig.db}_r") == before

    # an existing database is refused, then replaced with drop_existing
    rig.q(f"INSERT INTO {rig.db}_r.log VALUES (9, 'extra')")
    with pytest.raises(TargetNotEmpty, match="drop_existing"):
        restore_clickhouse(rig.conn(), rig.repo, age_key, req)
    assert rig.q(f"SELECT count() FROM {rig.db}_r.log") == "3"
    again = restore_clickhouse(
        rig.conn(), rig.repo, age_key, req.model_copy(update={"drop_existing": True})
    )
    assert again["fingerprints_ok"]
    assert content(rig, f"{rig.db}_r") == before
    left = rig.q("SELECT name FROM system.databases WHERE name LIKE '__sr_old_%'")
    assert not left
    print(f"native backup of 5100 rows: {took:.2f} s, {len(keys)} objects")


@ONLY_CH26
def test_incremental_and_retention(rig: Rig, age_key: EncryptionConfig) -> None:
    rig.make_data()
    old = backup_native(rig.conn(), rig.repo, rig.config, age_key, full=True)
    full = backup_native(rig.conn(), rig.repo, rig.config, age_key, full=True)
    assert "base_backup_id" not in full.details
    rig.q(
        f"INSERT INTO {rig.db}.events SELECT number + 20000, toDate('2024-03-05'), 'new' "
        "FROM numbers(300)"
    )
    expected = content(rig, rig.db)
    inc = backup_native(rig.conn(), rig.repo, rig.config, age_key)
    assert inc.details["base_backup_id"] == full.backup_id
    assert inc.details["chain_length"] == 2
    assert inc.stored_size < full.stored_size / 2  # only the new part and the index
    rig.drop(rig.db)
    restore_clickhouse(rig.conn(), rig.repo, age_key, ChRestoreRequest(backup_id="latest"))
    assert content(rig, rig.db) == expected
    assert verify_native_backup(rig.conn(), rig.repo, inc, age_key)["ok"]

    policy = RetentionPolicy(keep_last=1, compliance_floor_years=0)  # no yearly copy kept
    report = prune(rig.repo, policy, orphan_grace=dt.timedelta(0))
    actions = {b["backup_id"]: b["action"] for b in report.to_dict()["backups"]}
    assert actions[old.backup_id] == "deleted"
    assert actions[full.backup_id] == "keep" and actions[inc.backup_id] == "keep"
    assert rig.keys(old.backup_id) == []
    assert not rig.repo.exists(manifest_key("clickhouse", "chnat", old.backup_id))
    assert len(rig.keys(full.backup_id)) == len(full.artifacts)
    # the kept incremental still restores (its base is there)
    rig.drop(rig.db)
    restore_clickhouse(rig.conn(), rig.repo, age_key, ChRestoreRequest(backup_id=inc.backup_id))
    assert content(rig, rig.db) == expected


@ONLY_CH26
def test_object_lock_is_applied(
    clickhouse_server: HTTPQueries, s3_server: MotoServer, age_key: EncryptionConfig
) -> None:
    rig = Rig(clickhouse_server, s3_server, lock=True)
    try:
        rig.make_data()
        manifest = backup_native(rig.conn(), rig.repo, rig.config, age_key)
        assert manifest.details["object_lock"] == f"{len(manifest.artifacts)} object(s) locked"
        for artifact in manifest.artifacts[:5]:
            head = rig.repo.head(artifact.key) or {}
            assert head.get("ObjectLockMode") == "GOVERNANCE"
            assert head["ObjectLockRetainUntilDate"] > dt.datetime.now(dt.UTC)
    finally:
        rig.drop(rig.db)


@ONLY_CH26
def test_objects_without_sse_are_refused_and_removed(
    clickhouse_server: HTTPQueries, s3_server: MotoServer, age_key: EncryptionConfig
) -> None:
    """sse=AES256 in the repository but no bucket default encryption: the server's objects
    carry no SSE, so the backup fails and what the server wrote is deleted."""
    rig = Rig(clickhouse_server, s3_server, default_sse=False)
    try:
        rig.make_data()
        with pytest.raises(IntegrityError, match="default encryption"):
            backup_native(rig.conn(), rig.repo, rig.config, age_key)
        assert list(rig.repo.list("")) == []
        assert Catalog(rig.repo).list() == []
    finally:
        rig.drop(rig.db)


@ONLY_CH18
def test_server_without_backup_is_refused(rig: Rig, age_key: EncryptionConfig) -> None:
    rig.q(f"CREATE DATABASE {rig.db}")
    with pytest.raises(InvalidInput, match=r"no BACKUP/RESTORE statement.*method 'logical'"):
        backup_clickhouse(rig.conn(), rig.repo, rig.config, age_key)
    assert list(rig.repo.list("")) == []  # nothing written, not even a claim


def test_local_repository_is_refused_before_anything(
    tmp_path: Any, age_key: EncryptionConfig
) -> None:
    """Port 9 has no server: the refusal comes before any connection is tried."""
    config = signed_config(kind="local", path=str(tmp_path / "repo"))
    repo = LocalRepository(tmp_path / "repo", trust=config.trust())
    conn = ClickHouseConnection(name="chnat", http_port=9, method="native")
    with pytest.raises(InvalidInput, match="needs an S3 repository"):
        backup_clickhouse(conn, repo, config, age_key)
    assert list(repo.list("")) == []


@pytest.mark.timeout(180)
@ONLY_CH26
def test_secrets_stay_out_of_manifest_logs_and_errors(
    rig: Rig,
    age_key: EncryptionConfig,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="strongroom")
    rig.make_data()
    manifest = backup_native(rig.conn(), rig.repo, rig.config, age_key)
    stored = rig.repo.get_bytes(manifest_key("clickhouse", "chnat", manifest.backup_id))
    assert SECRET not in stored.decode()
    assert SECRET not in json.dumps(manifest.model_dump(mode="json"))
    # a BACKUP the server fails (its URL names a bucket moto does not have: answered at
    # once; an unreachable endpoint would be retried by the server for many minutes): the
    # error echoes the statement, with the secret
    wrong = f"{rig.moto.endpoint_url}/missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StrongroomError) as failed:
        backup_native(rig.conn(native_s3_endpoint=wrong), rig.repo, rig.config, age_key)
    print(str(failed.value)[:600])
    assert SECRET not in str(failed.value)
    assert "S3(" in str(failed.value) or "BACKUP" in str(failed.value)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert rig.q("SELECT count() FROM system.backups WHERE name LIKE '%" + SECRET + "%'") == "0"


@ONLY_CH26
def test_compliance_shows_server_side_encryption_only(rig: Rig, age_key: EncryptionConfig) -> None:
    rig.make_data()
    manifest = backup_native(rig.conn(), rig.repo, rig.config, age_key)
    enc01 = [c for c in CONTROLS if c.id == "SR-ENC-01"]
    report = evaluate(rig.repo, config=rig.config, controls=enc01)
    result = next(c for c in report.controls if c.id == "SR-ENC-01")
    assert result.status == "fail"
    texts = [f.message for f in result.findings if f.status == "fail"]
    assert any(
        manifest.backup_id in t and "encrypted server-side only" in t and "AES256" in t
        for t in texts
    ), texts
    assert not any(f.status == "pass" for f in result.findings)
