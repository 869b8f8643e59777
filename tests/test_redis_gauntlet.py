"""Redis gauntlet round trips: every restore path ends fingerprint-identical to the source.

The dataset (strongroom.sandbox.gauntlet_redis) is loaded and backed up once per session
(tests/fixtures/redis_gauntlet.py); each test restores one of the shared backups into an
emptied target server and compares content fingerprints, never counts alone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.config import EncryptionConfig
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.sandbox.gauntlet_redis import (
    BIG_VALUE_SIZE,
    GAUNTLET_DBS,
    USERS,
    Fingerprint,
    combined,
    fingerprint,
)
from strongroom.sandbox.redis import RedisServer
from strongroom.verify import verify_backup
from tests.fixtures.redis_gauntlet import RedisGauntlet


def _conn(server: RedisServer) -> RedisConnection:
    return RedisConnection(
        name="restored", host=server.host, port=server.port, password=SecretStr(server.password)
    )


@pytest.fixture(scope="module")
def target_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def target(target_server: RedisServer) -> RedisConnection:
    conn = _conn(target_server)
    conn.client(0).flushall()
    return conn


def _restore(
    g: RedisGauntlet, kind: str, target: RedisConnection, key: EncryptionConfig, **kw: Any
) -> dict[str, Any]:
    request = RedisRestoreRequest(
        source_target="gauntlet", backup_id=g.manifests[kind].backup_id, **kw
    )
    return restore_redis(target, g.repos[kind][0], key, request)


def _subset(fp: Fingerprint, dbs: tuple[int, ...], pattern: bytes | None = None) -> Fingerprint:
    return {
        db: {k: d for k, d in fp[db].items() if pattern is None or fnmatch.fnmatchcase(k, pattern)}
        for db in dbs
    }


def test_gauntlet_holds_what_it_promises(redis_gauntlet: RedisGauntlet) -> None:
    src = redis_gauntlet.source_print
    assert set(src) == set(GAUNTLET_DBS) and all(src[db] for db in GAUNTLET_DBS)
    db0 = set(src[0])
    assert {b"byte:" + bytes([b]) for b in range(256)} <= db0
    assert bytes(range(256)) in db0 and b"big:blob" in db0
    assert sum(k.startswith(b"user:") for k in db0) == USERS
    assert {b"stream:orders", b"stream:emptied", b"hll:visitors", b"bitmap:flags"} <= db0
    assert redis_gauntlet.load["keys"] == {db: len(src[db]) for db in GAUNTLET_DBS}
    d = redis_gauntlet.manifests["local"].details
    assert d["keyspace"]["0"]["expires"] >= 203 and d["keyspace"]["5"]["expires"] == 1
    assert redis_gauntlet.manifests["local"].artifacts[0].raw_size > BIG_VALUE_SIZE


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_whole_round_trip_is_fingerprint_identical(
    redis_gauntlet: RedisGauntlet, target: RedisConnection, age_key: EncryptionConfig, kind: str
) -> None:
    report = _restore(redis_gauntlet, kind, target, age_key)
    assert report["keys_ok"] and report["matches_manifest"], report["key_checks"]
    restored = fingerprint(target)
    assert restored == redis_gauntlet.source_print
    assert combined(restored) == combined(redis_gauntlet.source_print)
    c = target.client(0)
    assert c.strlen("big:blob") == BIG_VALUE_SIZE
    groups = {g["name"]: g for g in c.xinfo_groups("stream:orders")}
    assert groups[b"billing"]["pending"] == 85 and groups[b"audit"]["pending"] == 0
    assert 7_000_000 < int(c.pttl("ttl:hash")) <= 7_200_000


def test_fingerprint_sees_one_byte_a_ttl_and_a_pending_ack(
    redis_gauntlet: RedisGauntlet, target: RedisConnection, age_key: EncryptionConfig
) -> None:
    _restore(redis_gauntlet, "local", target, age_key)
    src = redis_gauntlet.source_print
    c0 = target.client(0)
    c0.setrange("big:blob", BIG_VALUE_SIZE - 5, b"\x00")
    c0.persist("ttl:str")
    pending = c0.xpending_range("stream:orders", "billing", min="-", max="+", count=1)
    c0.xack("stream:orders", "billing", pending[0]["message_id"])
    c0.zadd("zset:small", {"neg": -1.25})
    changed = fingerprint(target)
    diff = {k for k in src[0] if changed[0].get(k) != src[0][k]}
    assert diff == {b"big:blob", b"ttl:str", b"stream:orders", b"zset:small"}
    assert changed[1] == src[1] and changed[5] == src[5]


@pytest.mark.parametrize(
    ("kind", "pattern"), [("local", "user:*"), ("s3", "byte:*"), ("local", "utf8:bad:*")]
)
def test_key_pattern_restore_brings_only_matching_keys(
    redis_gauntlet: RedisGauntlet,
    target: RedisConnection,
    age_key: EncryptionConfig,
    kind: str,
    pattern: str,
) -> None:
    report = _restore(redis_gauntlet, kind, target, age_key, key_pattern=pattern, dbs=[0])
    expected = _subset(redis_gauntlet.source_print, (0,), pattern.encode())
    assert [c["restored"] for c in report["key_checks"]] == [len(expected[0])]
    assert len(expected[0]) in (USERS, 256, 5)
    assert fingerprint(target) == {0: expected[0], 1: {}, 5: {}}


@pytest.mark.parametrize(("kind", "db"), [("local", 5), ("s3", 1), ("s3", 0)])
def test_single_db_restore(
    redis_gauntlet: RedisGauntlet,
    target: RedisConnection,
    age_key: EncryptionConfig,
    kind: str,
    db: int,
) -> None:
    report = _restore(redis_gauntlet, kind, target, age_key, dbs=[db])
    assert report["keys_ok"], report["key_checks"]
    restored = fingerprint(target)
    assert restored[db] == redis_gauntlet.source_print[db]
    assert all(restored[other] == {} for other in GAUNTLET_DBS if other != db)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_gauntlet_backups_verify(
    redis_gauntlet: RedisGauntlet, age_key: EncryptionConfig, kind: str
) -> None:
    report = verify_backup(redis_gauntlet.repos[kind][0], redis_gauntlet.manifests[kind], age_key)
    assert report["ok"], report
    assert report["artifacts"][0]["structure"]["rdb_version"] == 10
