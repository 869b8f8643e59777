"""Redis Cluster backups and restores against real clusters on loopback ports.

The source is a 3-master/3-replica cluster holding keys of every type (TTLs, hash
tags, binary names) spread over all shards. Round trips are compared key by key
(type, value digest, TTL presence) into a cluster of the same shape (3 masters,
the same slot split), another shape (4 masters) and a single server. A master
killed mid-backup is retried on the promoted replica; a shard with no replica to
promote fails the backup and leaves nothing visible.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redispy
from pydantic import SecretStr
from redis.crc import key_slot

from strongroom.catalog import Catalog, Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.redis.cluster_restore import routed_copy
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.engine import ENGINE
from strongroom.engines.redis.key_copy import value_digest
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.engines.redis.topology import ClusterMap, Shard, discover_cluster
from strongroom.errors import ServiceUnavailable, TargetNotEmpty
from strongroom.sandbox.redis import RedisServer
from strongroom.sandbox.redis_cluster import RedisClusterSandbox
from strongroom.verify import verify_backup
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config, signing_block_fields
from tests.test_redis import Repo

Print = dict[bytes, tuple[str, str, bool]]


def cluster_conn(cluster: RedisClusterSandbox, name: str = "shop", **extra: Any) -> RedisConnection:
    return RedisConnection(
        name=name,
        topology="cluster",
        seed_nodes=cluster.seeds[:2],
        password=SecretStr(cluster.password),
        **extra,
    )


def fill(cluster: RedisClusterSandbox) -> None:
    c = cluster.client()
    pipe = c.pipeline(transaction=False)
    for i in range(1500):
        pipe.set(f"s:{i}", f"value-{i}" * (i % 5 + 1))
        if i % 4 == 0:
            pipe.pexpire(f"s:{i}", 3_600_000 + i)
    for i in range(150):
        pipe.hset(f"h:{i}", mapping={f"f{j}": f"v{j}" for j in range(i % 20 + 1)})
        pipe.rpush(f"l:{i}", *[f"e{j}" for j in range(i % 10 + 1)])
        pipe.sadd(f"set:{i}", *range(i % 15 + 1))
        pipe.zadd(f"z:{i}", {f"m{j}": j * 0.5 for j in range(i % 12 + 1)})
    for i in range(50):
        pipe.set(f"{{user:{i % 5}}}:profile:{i}", b"\x00\xff" * i)
    pipe.execute()
    c.set(b"bin:\x00\xff\r\n key", bytes(range(256)))
    c.xadd("stream:1", {"n": "1"})
    c.close()
    for node in cluster.masters_now():  # replicas hold every write before a test reads them
        node.client().execute_command("WAIT", cluster.replicas, 10_000)


def fingerprint_nodes(nodes: list[redispy.Redis]) -> Print:
    out: Print = {}
    for c in nodes:
        for key in set(c.scan_iter(count=1000)):
            d = value_digest(c, key)
            out[key] = (d["type"], d["sha256"], d["ttl"] >= 0)
        c.close()
    return out


def cluster_print(cluster: RedisClusterSandbox) -> Print:
    return fingerprint_nodes([n.client() for n in cluster.masters_now()])


def flush(cluster: RedisClusterSandbox) -> None:
    for node in cluster.masters_now():
        node.client().flushall()


@pytest.fixture(scope="module")
def source(redis_cluster: RedisClusterSandbox) -> RedisClusterSandbox:
    flush(redis_cluster)
    fill(redis_cluster)
    redis_cluster.wait_ok()
    return redis_cluster


@pytest.fixture(scope="module")
def source_print(source: RedisClusterSandbox) -> Print:
    printed = cluster_print(source)
    assert len(printed) > 2000
    return printed


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    root = tmp_path_factory.mktemp("cluster") / "repo"
    return make_local_repo(root), signed_config(kind="local", path=str(root))


@pytest.fixture(scope="module")
def backup(source: RedisClusterSandbox, repo: Repo, age_key: EncryptionConfig) -> Manifest:
    return ENGINE.backup(
        cluster_conn(source),
        repo[0],
        repo[1],
        age_key,
        labels={},
        progress=None,
        options={},
    )


def test_backup_manifest_has_the_slot_map(
    source: RedisClusterSandbox, backup: Manifest, repo: Repo, age_key: EncryptionConfig
) -> None:
    cluster = backup.details["cluster"]
    assert backup.kind == "cluster-rdb" and len(backup.artifacts) == 3
    live = discover_cluster(cluster_conn(source))
    assert cluster["slot_map"] == live.document()
    assert sum(b - a + 1 for s in cluster["shards"] for a, b in s["slots"]) == 16384
    replica_ids = {r.node_id for s in live.shards for r in s.replicas}
    for shard in cluster["shards"]:
        assert shard["source"]["role"] == "replica" and shard["source"]["node_id"] in replica_ids
        assert shard["rdb"]["crc64"] and shard["keys"] > 0, json.dumps(cluster["shards"])
    assert cluster["consistency"]["kind"] == "per-shard"
    assert backup.details["keyspace"]["0"]["keys"] == sum(s["keys"] for s in cluster["shards"])
    result = verify_backup(repo[0], backup, age_key)
    assert result["ok"] and len(result["artifacts"]) == 3


def test_cut_and_from_masters(
    source: RedisClusterSandbox, source_print: Print, repo: Repo, age_key: EncryptionConfig
) -> None:
    conn = cluster_conn(source, cluster_pause_ms=5000)
    manifest = ENGINE.backup(
        conn,
        repo[0],
        repo[1],
        age_key,
        labels={},
        progress=None,
        options={"from_masters": True},
    )
    cut = manifest.details["cluster"]["consistency"]
    assert cut["kind"] == "cluster-wide cut" and 0 < cut["pause_measured_ms"] < 5000
    assert {s["source"]["role"] for s in manifest.details["cluster"]["shards"]} == {"master"}
    # the pause was lifted, not left to expire: writes to every shard answer at once
    quick = redispy.RedisCluster(
        host="127.0.0.1", port=source.nodes[0].port, password=source.password, socket_timeout=1
    )
    keys = [f"probe:{i}" for i in range(40)]
    assert len({key_slot(k.encode()) * 3 // 16384 for k in keys}) == 3
    for key in keys:
        quick.set(key, "1")
    quick.delete(*keys)
    quick.close()


def test_round_trip_same_shape(
    backup: Manifest,
    source_print: Print,
    redis_cluster_same_shape: RedisClusterSandbox,
    repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    target = redis_cluster_same_shape
    flush(target)
    conn = cluster_conn(target, "shop-copy")
    req = RedisRestoreRequest(source_target="shop", backup_id=backup.backup_id)
    report = restore_redis(conn, repo[0], age_key, req)
    assert report["shape"] == "same shape" and report["keys_ok"] and report["sample"]["ok"]
    assert report["matches_manifest"]
    assert cluster_print(target) == source_print
    with pytest.raises(TargetNotEmpty):
        restore_redis(conn, repo[0], age_key, req)
    again = restore_redis(conn, repo[0], age_key, req.model_copy(update={"flush_existing": True}))
    assert again["keys_ok"] and cluster_print(target) == source_print


def test_round_trip_other_shape(
    backup: Manifest,
    source_print: Print,
    redis_cluster_other_shape: RedisClusterSandbox,
    repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    target = redis_cluster_other_shape
    flush(target)
    conn = cluster_conn(target, "shop-two")
    plan = restore_redis(
        conn,
        repo[0],
        age_key,
        RedisRestoreRequest(source_target="shop", backup_id=backup.backup_id, dry_run=True),
    )
    assert plan["shape"] == "other shape" and cluster_print(target) == {}
    report = restore_redis(
        conn,
        repo[0],
        age_key,
        RedisRestoreRequest(source_target="shop", backup_id=backup.backup_id),
    )
    assert report["keys_ok"] and report["sample"]["ok"]
    assert cluster_print(target) == source_print


def test_round_trip_single_server(
    backup: Manifest, source_print: Print, repo: Repo, age_key: EncryptionConfig
) -> None:
    with RedisServer() as server:
        conn = RedisConnection(
            name="flat", host=server.host, port=server.port, password=SecretStr(server.password)
        )
        report = restore_redis(
            conn,
            repo[0],
            age_key,
            RedisRestoreRequest(source_target="shop", backup_id=backup.backup_id),
        )
        assert report["shape"] == "single server" and report["keys_ok"]
        c = redispy.Redis(host=server.host, port=server.port, password=server.password)
        assert fingerprint_nodes([c]) == source_print


def test_moved_and_ask_are_followed(
    source_print: Print, redis_cluster_other_shape: RedisClusterSandbox
) -> None:
    """A stale slot map (every slot sent to the wrong master: MOVED) and a slot being
    migrated (ASK): every key still lands where the cluster says."""
    target = redis_cluster_other_shape
    flush(target)
    conn = cluster_conn(target, "shop-two")
    live = discover_cluster(conn)
    n = len(live.shards)
    stale = ClusterMap(
        [
            Shard(dataclasses.replace(s.master, slots=live.shards[(i + 1) % n].master.slots), [])
            for i, s in enumerate(live.shards)
        ],
        live.seed,
        live.epoch,
    )
    with RedisServer() as server:
        scratch = RedisConnection(
            name="src", host=server.host, port=server.port, password=SecretStr(server.password)
        )
        sc = scratch.client()
        keys = [f"k:{i}".encode() for i in range(300)]
        for key in keys:
            sc.set(key, key * 3, ex=900)
        moved, redirects = routed_copy(scratch, conn, stale, None, 50)
        # the first batch went to the wrong masters; after MOVED the map was read again
        assert moved == 300 and 0 < redirects["MOVED"] < 300, redirects
        rc = target.client()
        assert all(rc.get(k) == k * 3 and rc.ttl(k) > 0 for k in keys)
        rc.close()
        flush(target)
        # slot of k:0 migrating from its owner to the other master: ASK for every key in it
        slot = key_slot(b"k:0")
        owner = next(s.master for s in live.shards if any(x <= slot <= y for x, y in s.slots))
        other = next(s.master for s in live.shards if s.master is not owner)
        oc = conn.node(owner.address).client()
        tc = conn.node(other.address).client()
        tc.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", owner.node_id)
        oc.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", other.node_id)
        try:
            moved, redirects = routed_copy(scratch, conn, live, None, 50)
            assert moved == 300 and redirects["ASK"] >= 1
            tc.execute_command("ASKING")
            assert tc.get(b"k:0") == b"k:0" * 3  # on the importing master, as ASK said
            with pytest.raises(redispy.exceptions.AskError):  # not on the migrating owner
                oc.exists(b"k:0")
        finally:  # the slot stays home: the cluster keeps its shape
            flush(target)
            for c in (tc, oc):
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner.node_id)
    flush(target)
    target.wait_ok()


def test_flows_take_a_cluster_block(
    prefect_api: str,
    source: RedisClusterSandbox,
    source_print: Print,
    redis_cluster_same_shape: RedisClusterSandbox,
    tmp_path: Path,
    age_key: EncryptionConfig,
) -> None:
    from blocks import BackupRepository, EncryptionKey
    from blocks.redis import RedisTarget
    from flows.redis import backup_redis_flow, restore_redis_flow

    for block in (RedisTarget, BackupRepository, EncryptionKey):
        block.register_type_and_schema()
    EncryptionKey(
        recipients=age_key.recipients, identity=age_key.identities[0].get_secret_value()
    ).save("rcluster-key", overwrite=True)
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "repo")).save(
        "rcluster-repo", overwrite=True
    )
    for name, cluster in (("rcluster-src", source), ("rcluster-dst", redis_cluster_same_shape)):
        RedisTarget(
            topology="cluster", seed_nodes=cluster.seeds[:1], password=cluster.password
        ).save(name, overwrite=True)
    common = {"repository": "rcluster-repo", "encryption_key": "rcluster-key"}
    manifest = backup_redis_flow(target="rcluster-src", from_masters=True, **common)
    assert manifest["kind"] == "cluster-rdb"
    assert {s["source"]["role"] for s in manifest["details"]["cluster"]["shards"]} == {"master"}
    flush(redis_cluster_same_shape)
    report = restore_redis_flow(target="rcluster-dst", source_target="rcluster-src", **common)
    assert report["shape"] == "same shape" and report["keys_ok"]
    assert cluster_print(redis_cluster_same_shape) == source_print
    flush(redis_cluster_same_shape)


def test_master_killed_mid_backup_is_retried_on_the_promoted_replica(
    source: RedisClusterSandbox,
    source_print: Print,
    repo: Repo,
    age_key: EncryptionConfig,
    redis_cluster_same_shape: RedisClusterSandbox,
) -> None:
    victim = source.masters_now()[0]
    vc = victim.client()
    vc.config_set("rdb-key-save-delay", 3000)  # µs per key: the fork streams for seconds
    conn = cluster_conn(source, from_masters=True, failover_timeout=30)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["manifest"] = ENGINE.backup(
                conn, repo[0], repo[1], age_key, labels={}, progress=None, options={}
            )
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while not int(vc.info("persistence").get("rdb_bgsave_in_progress", 0)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    victim.kill()
    thread.join(60)
    try:
        assert "error" not in result, result.get("error")
        manifest: Manifest = result["manifest"]
        shards = manifest.details["cluster"]["shards"]
        retried = [s for s in shards if s["attempts"]]
        assert len(retried) == 1 and victim.address in retried[0]["attempts"][0]["reason"]
        assert retried[0]["source"]["address"] != victim.address
        assert manifest.details["cluster"]["topology_changed"]
        flush(redis_cluster_same_shape)
        restore_redis(
            cluster_conn(redis_cluster_same_shape, "shop-copy"),
            repo[0],
            age_key,
            RedisRestoreRequest(source_target="shop", backup_id=manifest.backup_id),
        )
        assert cluster_print(redis_cluster_same_shape) == source_print
    finally:
        victim.start()  # it rejoins as a replica of the promoted node
        victim.client().config_set("rdb-key-save-delay", 0)
        source.wait_ok()


def test_shard_without_replica_fails_and_nothing_is_visible(
    redis_cluster_same_shape: RedisClusterSandbox, repo: Repo, age_key: EncryptionConfig
) -> None:
    cluster = redis_cluster_same_shape
    fill(cluster)
    victim = cluster.masters_now()[1]
    victim.client().config_set("rdb-key-save-delay", 3000)
    conn = cluster_conn(cluster, "doomed", failover_timeout=3)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            ENGINE.backup(conn, repo[0], repo[1], age_key, labels={}, progress=None, options={})
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    vc = victim.client()
    deadline = time.monotonic() + 20
    while not int(vc.info("persistence").get("rdb_bgsave_in_progress", 0)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.kill()
    thread.join(60)
    try:
        error = result.get("error")
        assert isinstance(error, ServiceUnavailable)
        assert "nothing published" in str(error) and "no healthy source" in str(error)
        assert Catalog(repo[0]).list("redis", "doomed") == []
        assert list(repo[0].list("data/redis/doomed")) == []
    finally:
        victim.start()
        victim.client().config_set("rdb-key-save-delay", 0)
        cluster.wait_ok()
        flush(cluster)


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    assert not [t for t in threading.enumerate() if t.name.startswith("rdb-feeder")]
