"""Redis Cluster topology: shards, their slot ranges, masters and replicas, from seed nodes.

``discover_cluster`` asks the first seed node that answers for ``CLUSTER NODES``
(every Redis Cluster release has it; ``CLUSTER SHARDS`` is 7.0+ and says the same
for this purpose), keeps the nodes that are connected and not failing, groups them
by master and checks that the masters cover all 16384 slots. ``Shard.source`` picks
the node a backup reads from: a replica whose link to the master is up (the one
with the largest replication offset), or the master with ``from_masters`` or when
no replica is healthy (the reason is recorded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from strongroom.engines.redis.conn import RedisConnection, redis_errors
from strongroom.errors import ServiceUnavailable, StrongroomError

SLOTS = 16384
CATCH_UP_S = 10.0  # how long a replica may take to catch up before the master is used


@dataclass
class ClusterNode:
    node_id: str
    address: str  # host:port (client port)
    flags: list[str]
    master_id: str | None  # for replicas
    link: str  # connected / disconnected
    slots: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def healthy(self) -> bool:
        bad = {"fail", "fail?", "handshake", "noaddr"} & set(self.flags)
        return self.link == "connected" and not bad


@dataclass
class Shard:
    master: ClusterNode
    replicas: list[ClusterNode]

    @property
    def slots(self) -> list[tuple[int, int]]:
        return sorted(self.master.slots)

    def slot_count(self) -> int:
        return sum(b - a + 1 for a, b in self.slots)

    def source(self, conn: RedisConnection, from_masters: bool) -> tuple[ClusterNode, str]:
        """The node to snapshot and why: a healthy replica that has caught up with the
        master's replication offset as it was when asked (so the snapshot holds every
        write the master had acknowledged by then), else the master."""
        if from_masters:
            return self.master, "from_masters"
        try:
            target = int(_info(conn.node(self.master.address), "replication")["master_repl_offset"])
        except (StrongroomError, KeyError, ValueError):
            return self.master, "master offset unknown: the master"
        deadline = time.monotonic() + CATCH_UP_S
        candidates = [r for r in self.replicas if r.healthy]
        while candidates:
            for replica in list(candidates):
                try:
                    info = _info(conn.node(replica.address), "replication")
                except StrongroomError:
                    candidates.remove(replica)
                    continue
                if info.get("master_link_status") != "up":
                    candidates.remove(replica)
                    continue
                if int(info.get("slave_repl_offset", 0) or 0) >= target:
                    return replica, f"replica (caught up with master offset {target})"
            if time.monotonic() > deadline:
                return self.master, f"no replica caught up within {CATCH_UP_S:.0f} s: the master"
            time.sleep(0.01)
        return self.master, "no healthy replica: the master"


@dataclass
class ClusterMap:
    shards: list[Shard]
    seed: str  # the node that answered
    epoch: int

    def masters(self) -> list[ClusterNode]:
        return [s.master for s in self.shards]

    def slot_owner(self) -> list[str]:
        """Slot -> master address, for every slot."""
        owner = [""] * SLOTS
        for shard in self.shards:
            for a, b in shard.slots:
                for slot in range(a, b + 1):
                    owner[slot] = shard.master.address
        return owner

    def shape(self) -> list[list[tuple[int, int]]]:
        return sorted(s.slots for s in self.shards)

    def document(self) -> list[dict[str, Any]]:
        return [
            {
                "master_id": s.master.node_id,
                "master": s.master.address,
                "replicas": [{"node_id": r.node_id, "address": r.address} for r in s.replicas],
                "slots": [list(r) for r in s.slots],
            }
            for s in self.shards
        ]


def _info(conn: RedisConnection, section: str) -> dict[str, Any]:
    client = conn.client(timeout=conn.connect_timeout)
    try:
        with redis_errors(f"INFO {section} on {conn.address}"):
            info: dict[str, Any] = client.info(section)
        return info
    finally:
        client.close()


def parse_nodes(text: str) -> list[ClusterNode]:
    """The lines of CLUSTER NODES (slot migration entries ``[..]`` are skipped)."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0].split(",", 1)[0]
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):
                continue
            a, _, b = item.partition("-")
            slots.append((int(a), int(b or a)))
        nodes.append(
            ClusterNode(
                node_id=parts[0],
                address=address,
                flags=parts[2].split(","),
                master_id=None if parts[3] == "-" else parts[3],
                link=parts[7],
                slots=slots,
            )
        )
    return nodes


def _query(conn: RedisConnection) -> tuple[str, int]:
    client = conn.client(timeout=conn.connect_timeout)
    try:
        with redis_errors(f"CLUSTER NODES on {conn.address}"):
            info = client.info("cluster")
            if not int(info.get("cluster_enabled", 0)):
                raise ServiceUnavailable(f"{conn.address} does not run Redis Cluster")
            raw = client.execute_command("CLUSTER", "NODES")
            state = client.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        info_text = state.decode() if isinstance(state, bytes) else str(state)
        fields = dict(line.split(":", 1) for line in info_text.splitlines() if ":" in line)
        if fields.get("cluster_state", "").strip() != "ok":
            raise ServiceUnavailable(
                f"{conn.address} reports cluster_state:{fields.get('cluster_state', '?').strip()}"
            )
        return text, int(fields.get("cluster_current_epoch", "0").strip() or 0)
    finally:
        client.close()


def discover_cluster(conn: RedisConnection, seeds: list[str] | None = None) -> ClusterMap:
    """The cluster as the first answering seed sees it; every slot must have a master."""
    errors: list[str] = []
    for seed in seeds or conn.seed_nodes:
        try:
            text, epoch = _query(conn.node(seed))
        except StrongroomError as exc:
            errors.append(f"{seed}: {exc}")
            continue
        nodes = parse_nodes(text)
        masters = [n for n in nodes if n.is_master and n.slots and n.healthy]
        shards = [
            Shard(m, [r for r in nodes if r.master_id == m.node_id and not r.is_master])
            for m in masters
        ]
        covered = sum(s.slot_count() for s in shards)
        if covered != SLOTS:
            errors.append(f"{seed}: healthy masters cover {covered} of {SLOTS} slots")
            continue
        shards.sort(key=lambda s: s.slots[0][0])
        return ClusterMap(shards, seed, epoch)
    raise ServiceUnavailable(
        f"cluster target {conn.name!r}: no seed node gave a complete, healthy topology "
        f"({'; '.join(errors)})"
    )


def cluster_nodes_of(conn: RedisConnection, address: str) -> list[str]:
    """Every node address a node knows (to refresh seeds after a failover)."""
    client = conn.node(address).client(timeout=conn.connect_timeout)
    try:
        raw = client.execute_command("CLUSTER", "NODES")
    except redis.RedisError:
        return []
    finally:
        client.close()
    return [n.address for n in parse_nodes(raw.decode() if isinstance(raw, bytes) else str(raw))]
