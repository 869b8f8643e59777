"""Redis Cluster backups: every shard's RDB, in parallel, under one manifest.

The topology comes from the seed nodes (``topology.discover_cluster``). Each shard is
snapshotted over the replication protocol (``sync.ReplicationSnapshot``, the same
stream as a single server's ``sync`` method) from a healthy replica, or from its
master with ``from_masters`` (or when it has no healthy replica). All shards stream
at once, one artifact each (``shard-<n>.rdb``); the manifest (kind ``cluster-rdb``)
holds the slot map with node ids, where each shard was read and how consistent the
set is:

- ``per-shard`` (default): each RDB is one shard at one instant (its fork); shards
  are taken within moments of each other but not at the same instant;
- ``cluster-wide cut`` (``cluster_pause_ms`` > 0): ``CLIENT PAUSE <ms> WRITE`` on
  every master, the chosen replicas caught up to their master's offset, every fork
  started, then ``CLIENT UNPAUSE``; the measured pause is recorded and the backup
  fails (nothing stored) if it took longer than the pause allowed.

A shard whose stream breaks (its source node died) is retried, per-shard mode only,
on the topology as it is after the failover: the cluster is asked again until every
slot has a healthy master (up to ``failover_timeout``), and the shard is read from the
new source; the manifest lists the failed attempt. If that fails too, or the cut was
requested, the backup fails: every artifact stored so far is deleted and no manifest
is written.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import time
from typing import Any

import redis

from strongroom.artifacts import claim_backup_id, publish_backup, storage_settings
from strongroom.catalog import Artifact, Manifest, data_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.redis.backup import ENGINE, ProgressFactory, _server_facts, _store
from strongroom.engines.redis.conn import RedisConnection, redis_errors, server_info
from strongroom.engines.redis.rdb import CONTENT_RDB
from strongroom.engines.redis.sync import ReplicationSnapshot, check_complete
from strongroom.engines.redis.topology import ClusterMap, Shard, discover_cluster
from strongroom.errors import IntegrityError, ServiceUnavailable, StrongroomError, ToolFailed
from strongroom.ids import new_backup_id
from strongroom.redact import register
from strongroom.repository.base import Repository, StorageSettings

KIND = "cluster-rdb"
MAX_ATTEMPTS = 3
log = logging.getLogger("strongroom.redis")


def shard_artifact(index: int) -> str:
    return f"shard-{index}.rdb"


class _Job:
    """One shard's snapshot: where it is read, the stream, what is known about it."""

    def __init__(self, index: int, shard: Shard, conn: RedisConnection) -> None:
        self.index = index
        self.shard = shard
        self.conn = conn
        node, why = shard.source(conn, conn.from_masters)
        self.node = node
        self.why = why
        self.snap: ReplicationSnapshot | None = None
        self.facts: dict[str, Any] = {}
        self.attempts: list[dict[str, str]] = []

    def open(self) -> None:
        self.snap = ReplicationSnapshot(self.conn.node(self.node.address))
        self.facts = self.snap.open()

    def source(self) -> dict[str, Any]:
        return {
            "node_id": self.node.node_id,
            "address": self.node.address,
            "role": "master" if self.node.is_master else "replica",
            "why": self.why,
        }


def _pause(masters: list[RedisConnection], ms: int) -> None:
    for m in masters:
        client = m.client(timeout=m.connect_timeout)
        try:
            with redis_errors(f"CLIENT PAUSE on {m.address}"):
                client.execute_command("CLIENT", "PAUSE", ms, "WRITE")
        finally:
            client.close()


def _unpause(masters: list[RedisConnection]) -> None:
    for m in masters:
        client = m.client(timeout=m.connect_timeout)
        try:
            client.execute_command("CLIENT", "UNPAUSE")
        except redis.RedisError as exc:  # it expires by itself; say so
            log.warning("CLIENT UNPAUSE on %s failed (%s): the pause expires", m.address, exc)
        finally:
            client.close()


def _offset(conn: RedisConnection, field: str) -> int:
    client = conn.client(timeout=conn.connect_timeout)
    try:
        with redis_errors(f"INFO replication on {conn.address}"):
            return int(client.info("replication").get(field, 0) or 0)
    finally:
        client.close()


def _cut(jobs: list[_Job], conn: RedisConnection) -> dict[str, Any]:
    """Pause writes on every master, let the replicas catch up, fork everywhere, unpause."""
    ms = conn.cluster_pause_ms
    masters = [conn.node(j.shard.master.address) for j in jobs]
    started = time.monotonic()
    _pause(masters, ms)
    try:
        deadline = started + ms / 1000
        for job, master in zip(jobs, masters, strict=True):
            if job.node.is_master:
                continue
            target = _offset(master, "master_repl_offset")
            replica = conn.node(job.node.address)
            while _offset(replica, "slave_repl_offset") < target:
                if time.monotonic() > deadline:
                    raise ToolFailed(
                        f"cluster cut: replica {job.node.address} did not catch up with its "
                        f"master within the {ms} ms pause; raise cluster_pause_ms or use "
                        "per-shard consistency (cluster_pause_ms=0)"
                    )
                time.sleep(0.002)
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            for future in [pool.submit(j.open) for j in jobs]:
                future.result()
    finally:
        _unpause(masters)
        measured = (time.monotonic() - started) * 1000
    if measured > ms:
        raise ToolFailed(
            f"cluster cut: pausing, catching up and forking every shard took {measured:.0f} ms, "
            f"more than the {ms} ms pause: writes may have resumed before the last fork. "
            "Raise cluster_pause_ms. Nothing was stored"
        )
    return {
        "kind": "cluster-wide cut",
        "statement": "every shard forked while writes were paused on every master "
        "(CLIENT PAUSE WRITE): the shards are one point in time",
        "pause_requested_ms": ms,
        "pause_measured_ms": round(measured, 1),
    }


def _answers(conn: RedisConnection, address: str) -> bool:
    client = conn.node(address).client(timeout=conn.connect_timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _retry_source(job: _Job, conn: RedisConnection, seeds: list[str], failed: str) -> None:
    """Wait for a topology where this shard's slots have a healthy master, pick a source."""
    deadline = time.monotonic() + conn.failover_timeout
    first_slot = job.shard.slots[0][0]
    last_error = ""
    while time.monotonic() < deadline:
        try:
            cmap = discover_cluster(conn, seeds)
        except StrongroomError as exc:
            last_error = str(exc)
            time.sleep(0.2)
            continue
        shard = next(s for s in cmap.shards if any(a <= first_slot <= b for a, b in s.slots))
        if shard.slots != job.shard.slots:
            raise ToolFailed(
                f"shard {job.index}: its slots moved during the backup "
                f"({job.shard.slots} -> {shard.slots}); run the backup again"
            )
        node, why = shard.source(conn, conn.from_masters)
        if node.address == failed and not _answers(conn, failed):
            last_error = f"{failed} still listed but does not answer"
            time.sleep(0.2)
            continue
        job.shard, job.node, job.why = shard, node, why
        return
    raise ServiceUnavailable(
        f"shard {job.index} (slots {job.shard.slots}): no healthy source within "
        f"{conn.failover_timeout:.0f} s after {failed} failed ({last_error or 'no failover'})"
    )


def _run_job(
    job: _Job,
    repo: Repository,
    key: str,
    enc: EncryptionConfig,
    *,
    level: int,
    settings: StorageSettings,
    progress: ProgressFactory | None,
    seeds: list[str],
    retry: bool,
) -> Artifact:
    name = shard_artifact(job.index)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            if job.snap is None:
                job.open()
            assert job.snap is not None
            try:
                artifact = _store(
                    job.snap,
                    repo,
                    key,
                    enc,
                    name=name,
                    content=CONTENT_RDB,
                    level=level,
                    settings=settings,
                    progress=progress(name, None) if progress else None,
                    meta={"method": "sync", "shard": job.index, "node_id": job.node.node_id},
                )
            finally:
                job.snap.close()
            check_complete(job.snap)
            return artifact
        except (ServiceUnavailable, IntegrityError) as exc:
            repo.delete(key)
            job.snap = None
            failed = job.node.address
            job.attempts.append(
                {
                    "method": "sync",
                    "outcome": "failed",
                    "reason": f"shard {job.index} from {failed}: {exc}",
                }
            )
            if not retry or attempt == MAX_ATTEMPTS:
                raise
            log.warning(
                "shard %d: %s failed (%s); waiting for the topology", job.index, failed, exc
            )
            _retry_source(job, job.conn, seeds, failed)
    raise AssertionError("unreachable")


def backup_cluster(
    conn: RedisConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    backup_id: str | None = None,
    labels: dict[str, str] | None = None,
    progress: ProgressFactory | None = None,
) -> Manifest:
    """Back up every shard of the cluster ``conn`` names; returns the published manifest."""
    register(*conn.secrets(), *repo_config.secrets(), *enc.secrets())
    started = dt.datetime.now(dt.UTC)
    bid = backup_id or new_backup_id(started)
    claim_backup_id(repo, ENGINE, conn.name, bid)
    settings = storage_settings(repo_config, started)
    cmap = discover_cluster(conn)
    seeds = list(dict.fromkeys([*conn.seed_nodes, *_all_addresses(cmap)]))
    first = conn.node(cmap.shards[0].master.address)
    client = first.client()
    try:
        info = server_info(client, f"cluster node {first.address}")
    finally:
        client.close()
    jobs = [_Job(i, shard, conn) for i, shard in enumerate(cmap.shards)]
    stored: list[Artifact] = []
    try:
        if conn.cluster_pause_ms:
            consistency = _cut(jobs, conn)
        else:
            consistency = {
                "kind": "per-shard",
                "statement": "each shard's RDB is that shard at one instant (its fork); the "
                "shards were started together but are not one cluster-wide point in time",
            }
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {
                pool.submit(
                    _run_job,
                    job,
                    repo,
                    data_key(ENGINE, conn.name, bid, shard_artifact(job.index)),
                    enc,
                    level=repo_config.compression_level,
                    settings=settings,
                    progress=progress,
                    seeds=seeds,
                    retry=not conn.cluster_pause_ms,
                ): job
                for job in jobs
            }
            errors = []
            for future in concurrent.futures.as_completed(futures):
                try:
                    stored.append(future.result())
                except Exception as exc:
                    errors.append((futures[future].index, exc))
        if errors:
            index, first_error = sorted(errors, key=lambda e: e[0])[0]
            if isinstance(first_error, StrongroomError):
                first_error.args = (
                    f"cluster backup failed, nothing published: shard {index}: {first_error}",
                )
            raise first_error
        after = _topology_after(conn, seeds)
        manifest = _manifest(conn, bid, started, repo, info, cmap, jobs, stored, consistency, after)
        manifest.labels.update(labels or {})
        publish_backup(repo, manifest, settings)
    except BaseException:
        for job in jobs:
            if job.snap is not None:
                job.snap.close()
        for artifact in stored:
            repo.delete(artifact.key)
        raise
    return manifest


def _all_addresses(cmap: ClusterMap) -> list[str]:
    return [n.address for s in cmap.shards for n in (s.master, *s.replicas)]


def _topology_after(conn: RedisConnection, seeds: list[str]) -> ClusterMap | None:
    try:
        return discover_cluster(conn, seeds)
    except StrongroomError:
        return None


def _manifest(
    conn: RedisConnection,
    bid: str,
    started: dt.datetime,
    repo: Repository,
    info: dict[str, Any],
    cmap: ClusterMap,
    jobs: list[_Job],
    stored: list[Artifact],
    consistency: dict[str, Any],
    after: ClusterMap | None,
) -> Manifest:
    by_name = {a.name: a for a in stored}
    shards = []
    total = 0
    versions = []
    for job in jobs:
        keys = int((job.facts.get("keyspace") or {}).get(0, {}).get("keys", 0))
        total += keys
        versions.append(int(job.facts["rdb"]["version"]))
        shards.append(
            {
                "index": job.index,
                "slots": [list(r) for r in job.shard.slots],
                "master_id": job.shard.master.node_id,
                "master": job.shard.master.address,
                "replica_ids": [r.node_id for r in job.shard.replicas],
                "source": job.source(),
                "artifact": shard_artifact(job.index),
                "keys": keys,
                "sync": {k: job.facts.get(k) for k in ("command", "transfer", "replid", "offset")},
                "rdb": job.facts["rdb"],
                "attempts": job.attempts,
            }
        )
    changed = after is None or after.document() != cmap.document()
    details: dict[str, Any] = {
        "topology": "cluster",
        "method": "sync",
        "cluster": {
            "seed": cmap.seed,
            "epoch": cmap.epoch,
            "shards": shards,
            "slot_map": cmap.document(),
            "consistency": consistency,
            "topology_changed": changed,
            "slot_map_after": after.document() if after is not None and changed else None,
        },
        "rdb": {"version": max(versions)},
        "rdb_version": max(versions),
        "keyspace": {"0": {"keys": total}},
        "keyspace_source": "INFO keyspace on each shard's replication connection before PSYNC",
        "attempts": [a for job in jobs for a in job.attempts],
        "used_memory": info.get("used_memory"),
        "redis_version": info.get("redis_version"),
        "fallback": False,
    }
    return Manifest(
        backup_id=bid,
        engine=ENGINE,
        target=conn.name,
        kind=KIND,
        started_at=started,
        finished_at=dt.datetime.now(dt.UTC),
        repository=repo.describe(),
        tool_versions={"redis-py": redis.__version__},
        server={**_server_facts(conn, info), "topology": "cluster", "seeds": conn.seed_nodes},
        artifacts=[by_name[shard_artifact(j.index)] for j in jobs],
        details=details,
    )
