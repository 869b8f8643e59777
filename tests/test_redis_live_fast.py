"""Live restore by replication (``copy_method=replicate``) against real redis-servers.

The source holds a few thousand keys of every type (TTLs, multi-MB values, hostile
names, three databases, a function library, a stream with a consumer group); the
target loads the backup as a replica of strongroom's feeder and must end up equal to
the source key by key (type, value digest, TTL), a master again, with its own
``masterauth`` back. Refusals and a corrupted artifact must leave it untouched.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redispy
from pydantic import SecretStr

from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.key_copy import encode_command, value_digest
from strongroom.engines.redis.replicate import RdbFeeder
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.errors import IntegrityError, InvalidInput, TargetNotEmpty
from strongroom.repository import Repository
from strongroom.sandbox.redis import RedisServer
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config

Repo = tuple[Repository, RepositoryConfig]
DBS = (0, 1, 5)
HOSTILE = [
    b"",
    b"\x00\xff\r\n*1\r\n$4\r\nPING\r\n",
    b"key with spaces and \xe2\x98\x83",
    b"../../etc/passwd",
    b"*" * 10_000,
    b"\n",
]
BIG = bytes(range(256)) * (3 * 4096)  # 3 MiB
LIB = "#!lua name=stronglib\nredis.register_function('answer', function() return 42 end)"


def client(server: RedisServer, db: int = 0) -> redispy.Redis:
    return redispy.Redis(host=server.host, port=server.port, db=db, password=server.password)


def conn_for(server: RedisServer, name: str = "cache", **extra: Any) -> RedisConnection:
    return RedisConnection(
        name=name, host=server.host, port=server.port, password=SecretStr(server.password), **extra
    )


def fill(server: RedisServer) -> None:
    c = client(server)
    c.flushall()
    pipe = c.pipeline(transaction=False)
    for i in range(3000):
        pipe.set(f"s:{i}", f"value-{i}" * (i % 7 + 1))
        if i % 3 == 0:
            pipe.pexpire(f"s:{i}", 3_600_000 + i)
    for i in range(400):
        pipe.hset(f"h:{i}", mapping={f"f{j}": f"v{j}" for j in range(i % 50 + 1)})
        pipe.rpush(f"l:{i}", *[f"e{j}" for j in range(i % 30 + 1)])
        pipe.sadd(f"set:{i}", *range(i % 20 + 1))
        pipe.sadd(f"sset:{i}", *[f"m{j}" for j in range(i % 20 + 1)])
        pipe.zadd(f"z:{i}", {f"m{j}": j * 0.5 for j in range(i % 40 + 1)})
    pipe.execute()
    for i, name in enumerate(HOSTILE):
        c.set(name, b"hostile-%d" % i, ex=7200 if i % 2 else None)
    c.set("big:str", BIG)
    c.set("big:random", random.Random(3).randbytes(3 << 20))  # LZF cannot shrink it
    c.hset("big:hash", mapping={f"field{i}": BIG[:2048] for i in range(1000)})
    c.rpush("big:list", *[BIG[:1024] for _ in range(2000)])
    for i in range(30):
        c.xadd("stream", {"n": str(i), "payload": b"\x01\x02"})
    c.xgroup_create("stream", "workers", id="0")
    c.xreadgroup("workers", "w1", {"stream": ">"}, count=7)
    c.function_load(LIB)
    c.set("short:ttl", "expires before the restore", px=1500)
    client(server, 1).mset({f"one:{i}": i for i in range(500)})
    client(server, 5).rpush("five:list", "a", "b", "c")


def fingerprint(server: RedisServer) -> dict[int, dict[bytes, tuple[str, str, bool]]]:
    out: dict[int, dict[bytes, tuple[str, str, bool]]] = {}
    for db in DBS:
        c = client(server, db)
        digests = {}
        for key in sorted(set(c.scan_iter(count=1000))):
            d = value_digest(c, key)
            digests[key] = (d["type"], d["sha256"], d["ttl"] >= 0)
        out[db] = digests
    return out


@pytest.fixture(scope="module")
def source() -> Iterator[RedisServer]:
    server = RedisServer().start()
    fill(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def target() -> Iterator[RedisServer]:
    server = RedisServer().start()
    client(server).config_set("masterauth", "operators-own-masterauth")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    root = tmp_path_factory.mktemp("fast") / "repo"
    return make_local_repo(root), signed_config(kind="local", path=str(root))


@pytest.fixture(scope="module")
def backup(source: RedisServer, repo: Repo, age_key: EncryptionConfig) -> Manifest:
    manifest = backup_redis(conn_for(source), repo[0], repo[1], age_key)
    time.sleep(1.6)  # short:ttl expires: the target (a replica while loading) keeps it
    return manifest


def restore(server: RedisServer, repo: Repo, key: EncryptionConfig, **kw: Any) -> dict[str, Any]:
    kw.setdefault("source_target", "cache")
    kw.setdefault("copy_method", "replicate")
    return restore_redis(conn_for(server, "restored"), repo[0], key, RedisRestoreRequest(**kw))


def assert_untouched(server: RedisServer, keys: dict[bytes, bytes]) -> None:
    c = client(server)
    info = c.info("replication")
    assert info["role"] == "master"
    assert c.config_get("masterauth")["masterauth"] == "operators-own-masterauth"
    assert c.config_get("repl-diskless-load")["repl-diskless-load"] == "disabled"
    assert c.dbsize() == len(keys)
    for k, v in keys.items():
        assert c.get(k) == v


def test_replicate_round_trip(
    source: RedisServer,
    target: RedisServer,
    repo: Repo,
    age_key: EncryptionConfig,
    backup: Manifest,
) -> None:
    client(target).flushall()
    expected = fingerprint(source)  # short:ttl has expired on the source too
    assert b"short:ttl" not in expected[0]
    report = restore(target, repo, age_key)
    assert report["copy"]["method"] == "replicate"
    assert report["keys_ok"] and report["sample"]["ok"], report["key_checks"]
    assert report["sample"]["checked"] >= 20
    assert report["copy"]["replication"]["refused_connections"] == 0
    assert fingerprint(target) == expected
    c = client(target)
    assert c.info("replication")["role"] == "master"
    assert c.config_get("masterauth")["masterauth"] == "operators-own-masterauth"
    assert c.config_get("repl-diskless-load")["repl-diskless-load"] == "disabled"
    assert "Loading DB in memory" in target.log_path.read_text()
    assert c.get("big:str") == BIG
    assert c.get(HOSTILE[1]) == b"hostile-1" and c.get(b"") == b"hostile-0"
    assert 3_500_000 < c.pttl("s:3") <= 3_600_003  # TTLs travel with the keys
    assert c.fcall("answer", 0) == 42  # the function library came with the RDB
    c.set("writable", "yes")  # a master again, not a read-only replica
    assert report["backup_id"] == backup.backup_id


def test_replicate_refuses_existing_data(
    target: RedisServer, repo: Repo, age_key: EncryptionConfig, backup: Manifest
) -> None:
    c = client(target)
    c.flushall()
    c.function_flush()
    client(target, 9).set("other-db", "kept")  # a db the backup does not hold
    with pytest.raises(TargetNotEmpty, match="db9: 1"):
        restore(target, repo, age_key)
    assert client(target, 9).get("other-db") == b"kept"
    plan = restore(target, repo, age_key, dry_run=True)
    assert "flush_existing" in plan["blocked"] and plan["replicate"]["listen_host"] == "127.0.0.1"
    client(target, 9).flushdb()
    c.function_load(LIB)  # a function library alone is data the full resync would replace
    with pytest.raises(TargetNotEmpty, match="function libraries: 1"):
        restore(target, repo, age_key)
    assert c.info("replication")["role"] == "master"
    c.function_flush()
    client(target, 9).set("other-db", "replaced")
    report = restore(target, repo, age_key, flush_existing=True)
    assert report["flushed"] == {"9": 1} and report["keys_ok"]
    assert client(target, 9).dbsize() == 0


def test_replicate_bad_requests(
    tmp_path: Path,
    source: RedisServer,
    target: RedisServer,
    repo: Repo,
    age_key: EncryptionConfig,
    backup: Manifest,
) -> None:
    client(target).flushall()
    client(target).set("keep", "me")
    with pytest.raises(InvalidInput, match="key_pattern"):
        restore(target, repo, age_key, key_pattern="s:*", flush_existing=True)
    with pytest.raises(InvalidInput, match="whole backup"):
        restore(target, repo, age_key, dbs=[1], flush_existing=True)
    with pytest.raises(InvalidInput, match="cannot listen there"):
        restore(target, repo, age_key, replicate_host="203.0.113.77", flush_existing=True)
    replica = RedisServer().start()
    try:
        rc = client(replica)
        rc.config_set("masterauth", source.password)
        rc.execute_command("REPLICAOF", source.host, source.port)
        with pytest.raises(InvalidInput, match="is a replica of"):
            restore(replica, repo, age_key, flush_existing=True)
    finally:
        replica.stop()
    root = tmp_path / "other"
    other = make_local_repo(root), signed_config(kind="local", path=str(root))
    backup_redis(conn_for(source, backup_method="logical"), other[0], other[1], age_key)
    with pytest.raises(InvalidInput, match="logical export"):
        restore(target, other, age_key, flush_existing=True)
    assert_untouched(target, {b"keep": b"me"})


def test_replicate_corrupted_artifact_leaves_target_untouched(
    target: RedisServer, repo: Repo, age_key: EncryptionConfig, backup: Manifest
) -> None:
    path = Path(repo[1].path or "") / backup.artifacts[0].key
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) * 2 // 3] ^= 0x01
    path.write_bytes(bytes(data))
    try:
        client(target).flushall()
        client(target).set("keep", "me")
        with pytest.raises(IntegrityError):
            restore(target, repo, age_key, backup_id=backup.backup_id, flush_existing=True)
        assert_untouched(target, {b"keep": b"me"})
    finally:
        path.write_bytes(original)


def test_feeder_serves_only_the_token() -> None:
    """A connection without the token's AUTH never gets FULLRESYNC (real sockets)."""
    import socket

    feeder = RdbFeeder("127.0.0.1", "t" * 64, 10)
    try:
        for hello in (
            encode_command(b"AUTH", b"wrong") + encode_command(b"PSYNC", b"?", b"-1"),
            encode_command(b"PSYNC", b"?", b"-1"),
            encode_command(b"REPLCONF", b"capa", b"eof"),
        ):
            with socket.create_connection((feeder.host, feeder.port), timeout=5) as s:
                s.sendall(hello)
                reply = s.recv(1000)
                assert reply.startswith(b"-NOAUTH") and b"FULLRESYNC" not in reply
        assert feeder.refused == 3 and not feeder.replicas
        with socket.create_connection((feeder.host, feeder.port), timeout=5) as s:
            s.sendall(encode_command(b"AUTH", b"t" * 64) + encode_command(b"PSYNC", b"?", b"-1"))
            data = b""
            while b"$10\r\n" not in data:
                data += s.recv(1000)
            assert data.startswith(b"+OK\r\n+FULLRESYNC ")
            deadline = time.monotonic() + 5  # the feeder's thread adds it right after
            while not feeder.replicas and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(feeder.replicas) == 1 and feeder.refused == 3
    finally:
        feeder.close()


def test_replicate_killed_mid_stream(
    target: RedisServer, repo: Repo, age_key: EncryptionConfig, backup: Manifest
) -> None:
    """SIGKILL while the RDB streams: the target is left a replica of a feeder that is
    gone, with strongroom's token as masterauth and no key (a replica drops a half-loaded
    diskless load); the documented fix (REPLICAOF NO ONE, masterauth back) and a re-run
    restore everything."""
    from tests.faults._support import kill_when
    from tests.faults.test_kill_other_engines import _start

    c = client(target)
    c.flushall()
    c.function_flush()
    req = RedisRestoreRequest(
        backup_id=backup.backup_id, source_target="cache", copy_method="replicate"
    )
    conn = conn_for(target, "restored")

    def streaming() -> bool:
        info = c.info("replication")
        return info["role"] == "slave" and bool(info.get("master_sync_in_progress"))

    # ~3.8 MB at 500 kB/s: after 4 s, about 1 MB has passed the reader's 1 MiB hold-back
    child = _start("redis-restore", conn, repo[1], age_key, request=req, read_bps=500_000)
    kill_when(child, streaming, settle=4.0)
    deadline = time.monotonic() + 10
    while c.info("persistence")["loading"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.info("replication")["role"] == "slave"
    assert c.config_get("masterauth")["masterauth"] != "operators-own-masterauth"
    assert c.dbsize() == 0  # the half-streamed RDB was never loaded
    c.execute_command("REPLICAOF", "NO", "ONE")
    c.config_set("masterauth", "operators-own-masterauth")
    c.config_set("repl-diskless-load", "disabled")
    report = restore(target, repo, age_key, backup_id=backup.backup_id)
    assert report["keys_ok"] and report["sample"]["ok"]
    assert c.info("replication")["role"] == "master"


def test_replicate_forged_artifact_sends_nothing(
    target: RedisServer, repo: Repo, age_key: EncryptionConfig, backup: Manifest
) -> None:
    """An RDB altered and re-encrypted to the public recipient (age accepts it) fails the
    signed manifest's stored-chunk digests: not one byte reaches the target's parser."""
    import pyrage
    import zstandard

    assert backup.artifacts[0].stored_chunks is not None
    path = Path(repo[1].path or "") / backup.artifacts[0].key
    original = path.read_bytes()
    identity = pyrage.x25519.Identity.from_str(age_key.identities[0].get_secret_value())
    plain = bytearray(
        zstandard.ZstdDecompressor()
        .decompressobj()
        .decompress(pyrage.decrypt(original, [identity]))
    )
    plain[len(plain) // 2] ^= 0x01
    recipient = pyrage.x25519.Recipient.from_str(age_key.recipients[0])
    path.write_bytes(pyrage.encrypt(zstandard.ZstdCompressor().compress(bytes(plain)), [recipient]))
    try:
        c = client(target)
        c.flushall()
        c.function_flush()
        seen = len(target.log_path.read_text())
        with pytest.raises(IntegrityError):
            restore(target, repo, age_key, backup_id=backup.backup_id)
        log = target.log_path.read_text()[seen:]
        # the link closed before any payload byte: the target never read the RDB header
        # (which it logs as "Loading RDB produced by version ...")
        assert "Full resync from master" in log and "Loading RDB produced by" not in log
        assert_untouched(target, {})
    finally:
        path.write_bytes(original)
