"""Restores that involve a Redis Cluster: a cluster backup into a cluster of the same or
another shape, or into a single server; a single server's backup into a cluster.

Always live (the cluster keeps serving): each shard's RDB (one artifact of a
``cluster-rdb`` backup, or the one RDB of a single server's backup) is loaded into a
scratch ``redis-server``, which proves its checksums, then copied key by key:

- into a cluster: ``routed_copy`` reads PTTL + DUMP from the scratch server in
  pipelined batches, groups the keys by the master that owns their slot in the
  target's current slot map (CRC16 of the key or its ``{hash tag}``) and pipelines
  ``RESTORE key ttl payload REPLACE`` to each master on its own socket. A key whose
  master replies ``MOVED`` (the map changed) or ``ASK`` (its slot is migrating) is
  written again through redis-py's ``RedisCluster``, which follows the redirection;
  after a ``MOVED`` the slot map is read again. The same path serves a same-shape
  target (each shard's keys go to the one master owning those slots) and any other
  shape.
- into a single server: the keys go to its db 0 (``key_copy.pipeline_copy``).

Before any write: the target's masters must be able to load the backup's RDB version,
and must hold no keys in scope unless ``flush_existing``. After: the key count over
all target masters must equal what the scratch servers loaded, and a sample of keys
from every shard must be equal (type, value digest, TTL presence) when read back
through the cluster.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from redis.crc import key_slot

from strongroom.artifacts import read_artifact
from strongroom.catalog import Artifact, Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.redis.conn import (
    RedisConnection,
    check_pattern,
    redis_errors,
    server_info,
    split_address,
)
from strongroom.engines.redis.key_copy import (
    _READ,
    _RESTORE,
    RespSocket,
    compare_samples,
    count_keys,
    flush_scope,
    pipeline_copy,
    sample_digests,
    scan_keys,
)
from strongroom.engines.redis.restore_plan import RedisRestoreRequest, check_versions
from strongroom.engines.redis.scratch import ScratchRedis
from strongroom.engines.redis.topology import ClusterMap, discover_cluster
from strongroom.errors import IntegrityError, InvalidInput, TargetNotEmpty, ToolFailed
from strongroom.pipeline import Progress
from strongroom.private_files import create_private
from strongroom.redact import scrub
from strongroom.repository.base import Repository


def cluster_client(conn: RedisConnection, seeds: list[str]) -> redis.RedisCluster:
    """A routing client (MOVED/ASK followed by redis-py) with the target's credentials."""
    from redis.cluster import ClusterNode

    kwargs: dict[str, Any] = {}
    if conn.tls:
        kwargs.update(ssl=True, ssl_ca_certs=conn.tls_ca_file)
    nodes = [ClusterNode(*split_address(a)) for a in seeds]
    return redis.RedisCluster(
        startup_nodes=nodes,
        username=conn.username,
        password=conn.password.get_secret_value() if conn.password else None,
        socket_connect_timeout=conn.connect_timeout,
        socket_timeout=conn.command_timeout,
        decode_responses=False,
        protocol=2,
        **kwargs,
    )


class _Router:
    """RESTORE batches sent to the master owning each key's slot."""

    def __init__(self, conn: RedisConnection, cmap: ClusterMap) -> None:
        self.conn = conn
        self.owner = cmap.slot_owner()
        self.seeds = [m.address for m in cmap.masters()]
        self.sockets: dict[str, RespSocket] = {}
        self.redirected = {"MOVED": 0, "ASK": 0}
        self._cluster: redis.RedisCluster | None = None

    def _socket(self, address: str) -> RespSocket:
        sock = self.sockets.get(address)
        if sock is None:
            sock = self.sockets[address] = RespSocket(self.conn.node(address), 0)
        return sock

    def restore(self, items: list[tuple[bytes, bytes, bytes]]) -> None:
        """``items``: (key, ttl, payload). Redirections are followed one key at a time."""
        groups: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
        for item in items:
            groups.setdefault(self.owner[key_slot(item[0])], []).append(item)
        for address, group in groups.items():
            self._socket(address).send(
                b"".join(_RESTORE % (len(k), k, len(t), t, len(p), p) for k, t, p in group)
            )
        retry: list[tuple[bytes, bytes, bytes]] = []
        moved = False
        for address, group in groups.items():
            for item, reply in zip(group, self._socket(address).replies(len(group)), strict=True):
                if not isinstance(reply, Exception):
                    continue
                text = str(reply)
                kind = text.split(" ", 1)[0]
                if kind not in self.redirected:
                    raise ToolFailed(
                        f"RESTORE into {address} failed: {scrub(text)} (the target holds the "
                        "keys copied before this batch)"
                    )
                self.redirected[kind] += 1
                moved = moved or kind == "MOVED"
                retry.append(item)
        if retry:
            client = self._routing_client()
            for key, ttl, payload in retry:
                with redis_errors("RESTORE through the cluster client"):
                    client.restore(key, int(ttl), payload, replace=True)
        if moved:
            self.owner = discover_cluster(self.conn, self.seeds).slot_owner()

    def _routing_client(self) -> redis.RedisCluster:
        if self._cluster is None:
            self._cluster = cluster_client(self.conn, self.seeds)
        return self._cluster

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        if self._cluster is not None:
            self._cluster.close()


def routed_copy(
    source: RedisConnection,
    target: RedisConnection,
    cmap: ClusterMap,
    pattern: str | None,
    batch: int,
) -> tuple[int, dict[str, int]]:
    """Every (matching) key of the scratch server ``source`` into the cluster by slot;
    returns the keys written and the redirections followed."""
    scanner = source.client(0)
    src = RespSocket(source, 0)
    router = _Router(target, cmap)
    moved = 0
    try:
        for keys in scan_keys(scanner, pattern, batch):
            src.send(b"".join(_READ % (len(k), k, len(k), k) for k in keys))
            replies = src.replies(2 * len(keys))
            items = []
            for i, key in enumerate(keys):
                ttl, payload = replies[2 * i], replies[2 * i + 1]
                if payload is None or ttl == -2 or isinstance(payload, Exception):
                    continue
                items.append((key, b"%d" % max(int(ttl), 0), bytes(payload)))
            if items:
                router.restore(items)
                moved += len(items)
    finally:
        scanner.close()
        src.close()
        router.close()
    return moved, dict(router.redirected)


def _stage(
    scratch: ScratchRedis,
    repo: Repository,
    artifact: Artifact,
    enc: EncryptionConfig,
    progress: Progress | None,
) -> None:
    with create_private(scratch.rdb_path) as handle:
        read_artifact(repo, artifact, handle, encryption=enc, progress=progress)
    scratch.start(timeout=120.0 + artifact.raw_size / (20 * 1024 * 1024))


def _counts(nodes: list[RedisConnection], pattern: str | None) -> dict[str, int]:
    out = {}
    for node in nodes:
        client = node.client(0)
        try:
            with redis_errors(f"counting keys on {node.address}"):
                out[node.address] = count_keys(client, pattern)
        finally:
            client.close()
    return out


def restore_topology(
    conn: RedisConnection,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    req: RedisRestoreRequest,
    progress: Progress | None,
) -> dict[str, Any]:
    """Restore ``manifest`` (cluster or single-server RDB) where a cluster is involved."""
    pattern = check_pattern(req.key_pattern)
    if req.mode != "live" or req.copy_method not in ("auto", "pipeline"):
        raise InvalidInput(
            "restores from or into a Redis Cluster are live with copy_method=pipeline "
            "(mode=file and replicate are single-server). Nothing was changed"
        )
    if manifest.kind not in ("rdb", "cluster-rdb"):
        raise InvalidInput(f"backup {manifest.backup_id} is not an RDB backup: use a single server")
    backup_ks = {int(db): int(v["keys"]) for db, v in manifest.details["keyspace"].items()}
    if set(backup_ks) - {0} or (req.dbs and req.dbs != [0]):
        raise InvalidInput(
            "a Redis Cluster has database 0 only: this backup holds databases "
            f"{sorted(backup_ks)}. Nothing was changed"
        )
    if conn.topology == "cluster":
        cmap: ClusterMap | None = discover_cluster(conn)
        assert cmap is not None
        nodes = [conn.node(m.address) for m in cmap.masters()]
    else:
        cmap = None
        nodes = [conn]
    versions: dict[str, Any] = {}
    for node in nodes:
        client = node.client()
        try:
            info = server_info(client, f"Redis target {conn.name!r} at {node.address}")
        finally:
            client.close()
        versions = check_versions(manifest, str(info.get("redis_version", "0")), local=True)
    conflicts = {a: n for a, n in _counts(nodes, pattern).items() if n}
    source_shape = sorted(
        [[tuple(r) for r in s["slots"]] for s in manifest.details["cluster"]["shards"]]
        if manifest.kind == "cluster-rdb"
        else []
    )
    if cmap is None:
        shape = "single server"
    else:
        shape = "same shape" if cmap.shape() == source_shape else "other shape"
    plan: dict[str, Any] = {
        "backup_id": manifest.backup_id,
        "backup_finished_at": manifest.finished_at.isoformat(),
        "source_target": manifest.target,
        "kind": manifest.kind,
        "backup_method": manifest.details.get("method"),
        "mode": "live",
        "target": conn.name,
        "target_server": ", ".join(n.address for n in nodes),
        "target_topology": conn.topology if cmap is not None else "standalone",
        "shape": shape,
        **versions,
        "dbs": [0],
        "key_pattern": pattern,
        "manifest_keys": {"0": backup_ks.get(0, 0)},
        "conflicts": conflicts,
        "flush_existing": req.flush_existing,
        "copy_method": "routed" if cmap is not None else "pipeline",
        "artifact": ", ".join(a.name for a in manifest.artifacts),
        "raw_size": manifest.raw_size,
        "stored_size": manifest.stored_size,
    }
    if conflicts and not req.flush_existing:
        detail = ", ".join(f"{a}: {n}" for a, n in conflicts.items())
        if not req.dry_run:
            raise TargetNotEmpty(
                f"refusing to overwrite: the target holds keys ({detail}); pass "
                "flush_existing to replace them. Nothing was changed"
            )
        plan["blocked"] = f"the target holds keys ({detail}); needs flush_existing"
    if req.dry_run:
        plan["dry_run"] = True
        return plan
    started = time.monotonic()
    report = _run(conn, repo, manifest, enc, req, plan, nodes, cmap, conflicts, progress)
    report["dry_run"] = False
    report["duration_s"] = round(time.monotonic() - started, 3)
    return report


def _run(
    conn: RedisConnection,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    req: RedisRestoreRequest,
    plan: dict[str, Any],
    nodes: list[RedisConnection],
    cmap: ClusterMap | None,
    conflicts: dict[str, int],
    progress: Progress | None,
) -> dict[str, Any]:
    pattern = req.key_pattern
    flushed = {}
    for node in nodes:
        if node.address in conflicts:
            client = node.client(0)
            try:
                with redis_errors(f"flushing {node.address}"):
                    flushed[node.address] = flush_scope(client, pattern)
            finally:
                client.close()
    loaded = 0
    samples: dict[bytes, dict[str, Any]] = {}
    moved = 0
    redirected = {"MOVED": 0, "ASK": 0}
    load_s = copy_s = 0.0
    per_sample = max(1, req.sample_size // max(1, len(manifest.artifacts)))
    for artifact in manifest.artifacts:
        t0 = time.monotonic()
        with ScratchRedis(parent=req.scratch_dir) as scratch:
            _stage(scratch, repo, artifact, enc, progress)
            source = scratch.connection()
            c = source.client(0)
            try:
                loaded += count_keys(c, pattern)
                samples.update(sample_digests(c, pattern, per_sample))
            finally:
                c.close()
            t1 = time.monotonic()
            load_s += t1 - t0
            if cmap is not None:
                n, redirects = routed_copy(source, conn, cmap, pattern, req.batch_size)
                for k, v in redirects.items():
                    redirected[k] += v
            else:
                n = pipeline_copy(source, conn, 0, pattern, req.batch_size)
            moved += n
            copy_s += time.monotonic() - t1
    restored = sum(_counts(nodes, pattern).values())
    reader: redis.Redis | redis.RedisCluster
    if cmap is not None:
        reader = cluster_client(conn, [n.address for n in nodes])
    else:
        reader = conn.client(0)
    try:
        with redis_errors("comparing sample values"):
            mismatched = compare_samples(reader, samples, 0)  # type: ignore[arg-type]
    finally:
        reader.close()
    expected = int(plan["manifest_keys"]["0"])
    check = {
        "db": 0,
        "manifest": None if pattern else expected,
        "loaded": loaded,
        "restored": restored,
        "ok": restored == loaded,
        "matches_manifest": None if pattern else restored == expected,
    }
    report = {
        **plan,
        "load_s": round(load_s, 3),
        "flushed": flushed,
        "copy": {
            "method": plan["copy_method"],
            "keys": moved,
            "seconds": round(copy_s, 3),
            "keys_per_s": round(moved / copy_s) if copy_s > 0 else None,
            "redirected": redirected,
        },
        "key_checks": [check],
        "keys_ok": check["ok"],
        "matches_manifest": check["matches_manifest"] is not False,
        "sample": {"checked": len(samples), "mismatched": mismatched, "ok": not mismatched},
    }
    if not report["keys_ok"]:
        raise IntegrityError(f"restored key counts differ from the backup: {check}")
    if mismatched:
        raise IntegrityError(f"restored values differ from the backup: {mismatched[:5]}")
    return report
