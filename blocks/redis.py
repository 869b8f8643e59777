"""Prefect block type for a Redis target. The password is SecretStr (masked in the UI/API)."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from strongroom.engines.redis.conn import RedisConnection


class RedisTarget(Block):
    """A Redis server to back up (and restore into), and how to restart it for file restores."""

    _block_type_name = "strongroom Redis target"
    _block_type_slug = "strongroom-redis-target"
    _description = (
        "A Redis server that strongroom backs up (replication SYNC, BGSAVE or logical export) "
        "and restores (live via a scratch server + MIGRATE, or file with a coordinated restart: "
        "local commands or a Kubernetes StatefulSet scaled down and up)."
    )

    host: str = "127.0.0.1"
    port: int = 6379
    username: str | None = Field(default=None, description="ACL user (Redis 6+).")
    password: SecretStr | None = None
    tls: bool = False
    allow_plaintext: bool = Field(
        default=False,
        description="Allow an unencrypted connection to a non-loopback host (refused otherwise).",
    )
    tls_ca_file: str | None = Field(default=None, description="CA bundle for TLS.")
    dbs: list[int] = Field(
        default_factory=list,
        description="Databases to export/restore; empty means every database with keys.",
    )
    backup_method: Literal["auto", "sync", "bgsave", "logical"] = Field(
        default="auto",
        description="auto tries replication SYNC, then BGSAVE + file, then SCAN + DUMP.",
    )
    topology: Literal["standalone", "cluster"] = Field(
        default="standalone",
        description="standalone: the server at host/port; cluster: a Redis Cluster found "
        "through seed_nodes (every shard backed up, restores routed by slot).",
    )
    seed_nodes: list[str] = Field(
        default_factory=list,
        description="Cluster: host:port of one or more nodes (the topology is discovered).",
    )
    from_masters: bool = Field(
        default=False,
        description="Cluster: snapshot the masters instead of a caught-up replica per shard.",
    )
    cluster_pause_ms: int = Field(
        default=0,
        ge=0,
        le=60_000,
        description="Cluster: 0 = per-shard points in time; > 0 = a cluster-wide cut under "
        "CLIENT PAUSE WRITE lasting at most this many ms (recorded; fails if not enough).",
    )
    failover_timeout: float = Field(
        default=60.0, gt=0, description="Seconds to wait for a failover before retrying."
    )
    data_path: str | None = Field(
        default=None,
        description="The server's RDB file as the runner sees it (shared volume): used by the "
        "BGSAVE fallback and by file restores.",
    )
    stop_command: str | None = Field(
        default=None,
        description="File restores: local command that stops the server (e.g. systemctl stop "
        "redis-server). Runs without a shell; REDISCLI_AUTH holds the password.",
    )
    start_command: str | None = Field(
        default=None, description="File restores: local command that starts the server."
    )
    k8s_statefulset: str | None = Field(
        default=None,
        description="File restores on Kubernetes: the StatefulSet running this Redis. Without "
        "stop/start commands, strongroom scales it to 0 through the Kubernetes API (scale "
        "subresource), waits until its pods are gone, puts the RDB at data_path (the volume "
        "as the runner mounts it), scales it back to the replica count it had and waits for "
        "Ready pods. RBAC: deployments/k8s/rbac-redis-restart.yaml.",
    )
    k8s_namespace: str = Field(default="default", description="Namespace of the StatefulSet.")
    k8s_kubeconfig: str | None = Field(
        default=None,
        description="kubeconfig file for the Kubernetes API (a path on the runner); empty: "
        "the flow-run pod's in-cluster service account.",
    )
    k8s_context: str | None = Field(
        default=None, description="Context in k8s_kubeconfig; empty: its current-context."
    )
    k8s_timeout: float = Field(
        default=600.0,
        gt=0,
        description="Seconds to wait for the pods to be gone after scaling to 0, and for all "
        "replicas to be Ready after scaling back.",
    )
    drills: bool = Field(
        default=False,
        description="Take part in the fleet's scheduled restore drills (backup-fleet kind "
        "drill); false: the drill fleet skips this target and lists it.",
    )
    rpo_hours: float = Field(default=24.0, description="Recovery point objective.")
    rto_minutes: float = Field(default=60.0, description="Recovery time objective.")

    def to_connection(self, name: str) -> RedisConnection:
        return RedisConnection(
            name=name,
            host=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            tls=self.tls,
            allow_plaintext=self.allow_plaintext,
            tls_ca_file=self.tls_ca_file,
            dbs=list(self.dbs),
            backup_method=self.backup_method,
            topology=self.topology,
            seed_nodes=list(self.seed_nodes),
            from_masters=self.from_masters,
            cluster_pause_ms=self.cluster_pause_ms,
            failover_timeout=self.failover_timeout,
            data_path=self.data_path,
            stop_command=self.stop_command,
            start_command=self.start_command,
            k8s_statefulset=self.k8s_statefulset,
            k8s_namespace=self.k8s_namespace,
            k8s_kubeconfig=self.k8s_kubeconfig,
            k8s_context=self.k8s_context,
            k8s_timeout=self.k8s_timeout,
        )
