"""Throwaway Redis Cluster and Sentinel sets on 127.0.0.1, for tests and benchmarks.

``RedisClusterSandbox`` starts ``masters * (1 + replicas)`` cluster-enabled
redis-servers (one shared random password, in 0600 config files; cluster bus on its
own free port via ``cluster-port``), joins them with ``redis-cli --cluster create
--cluster-replicas N --cluster-yes`` and waits until every node says
``cluster_state:ok`` and every replica's link is up. ``SentinelSandbox`` starts a
master, its replicas and three sentinels watching it. Nodes are stopped by PID;
``kill``/``restart`` keep a node's port and data (for failover tests).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

import redis

from strongroom.sandbox._process import (
    listens_on,
    make_temp_dir,
    remove_dir,
    spawn,
    stop_process,
    wait_until,
)
from strongroom.sandbox.ports import free_port

HOST = "127.0.0.1"


class Node:
    """One redis-server (or sentinel) we started; its port and folder survive restarts."""

    def __init__(self, base: Path, name: str, password: str, config: list[str]) -> None:
        self.dir = base / name
        self.dir.mkdir()
        self.port = free_port()
        self.password = password
        self.conf_path = self.dir / "redis.conf"
        self.log_path = self.dir / "redis.log"
        self.config = config
        self.sentinel = False
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def write_config(self) -> None:
        self.conf_path.touch(mode=0o600)
        lines = [
            f"port {self.port}",
            f"bind {HOST}",
            f'dir "{self.dir}"',
            'logfile ""',
            "daemonize no",
            *self.config,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0) -> None:
        if not self.conf_path.exists():
            self.write_config()
        argv = ["redis-server", str(self.conf_path), *(["--sentinel"] if self.sentinel else [])]
        self.proc = spawn(argv, log_path=self.log_path, cwd=self.dir)
        proc = self.proc
        wait_until(
            f"redis node {self.address}",
            lambda: listens_on(proc.pid, [self.port]) and bool(self.client().ping()),
            proc,
            [self.log_path],
            timeout,
        )

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=HOST, port=self.port, password=self.password, socket_timeout=10, protocol=2
        )

    def kill(self) -> None:
        """SIGKILL (a crash): nothing is saved."""
        stop_process(self.proc, [(signal.SIGKILL, 10.0)])
        self.proc = None

    def stop(self) -> None:
        stop_process(self.proc, [(signal.SIGTERM, 10.0)])
        self.proc = None


def _node_config(password: str, extra: list[str]) -> list[str]:
    return [
        f'requirepass "{password}"',
        f'masterauth "{password}"',
        'save ""',
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
        "enable-debug-command local",
        *extra,
    ]


class RedisClusterSandbox:
    """A Redis Cluster of ``masters`` shards with ``replicas`` replicas each."""

    def __init__(self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000) -> None:
        self.base = make_temp_dir("redis-cluster")
        self.password = secrets.token_urlsafe(24)
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[Node] = []
        for i in range(masters * (1 + replicas)):
            bus = free_port()
            config = _node_config(
                self.password,
                [
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    f"cluster-port {bus}",
                    f"cluster-node-timeout {node_timeout_ms}",
                    "cluster-replica-validity-factor 0",
                ],
            )
            self.nodes.append(Node(self.base, f"node{i}", self.password, config))

    @property
    def seeds(self) -> list[str]:
        return [n.address for n in self.nodes]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDISCLI_")}
        env["REDISCLI_AUTH"] = self.password
        return env

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *self.seeds,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                env=self.env(),
                capture_output=True,
                check=True,
                timeout=120,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, password=self.password)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Every running node says cluster_state:ok, knows every node, replica links up."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._node_ok(n) for n in self.nodes if n.proc is not None):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout:.0f} s (logs under {self.base})")
            time.sleep(0.1)

    def _node_ok(self, node: Node) -> bool:
        try:
            c = node.client()
            info = c.cluster("info")
            if info.get("cluster_state") != "ok":
                return False
            if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                return False
            repl = c.info("replication")
            c.close()
            return repl.get("role") == "master" or repl.get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def role_of(self, node: Node) -> str:
        return str(node.client().info("replication")["role"])

    def masters_now(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and self.role_of(n) == "master"]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        remove_dir(self.base)


class SentinelSandbox:
    """A master, ``replicas`` replicas and three sentinels (quorum 2) watching it."""

    def __init__(self, replicas: int = 1, *, name: str = "mymaster") -> None:
        self.base = make_temp_dir("redis-sentinel")
        self.password = secrets.token_urlsafe(24)
        self.name = name
        self.master = Node(self.base, "master", self.password, _node_config(self.password, []))
        self.replicas = [
            Node(
                self.base,
                f"replica{i}",
                self.password,
                _node_config(self.password, ["replica-priority 100"]),
            )
            for i in range(replicas)
        ]
        self.sentinels: list[Node] = []
        for i in range(3):
            node = Node(self.base, f"sentinel{i}", self.password, [])
            node.sentinel = True
            self.sentinels.append(node)

    @property
    def data_nodes(self) -> list[Node]:
        return [self.master, *self.replicas]

    @property
    def sentinel_addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def start(self) -> Self:
        try:
            self.master.start()
            for replica in self.replicas:
                replica.config.append(f"replicaof {HOST} {self.master.port}")
                replica.start()
            for s in self.sentinels:
                s.config += [
                    f'requirepass "{self.password}"',
                    f"sentinel monitor {self.name} {HOST} {self.master.port} 2",
                    f'sentinel auth-pass {self.name} "{self.password}"',
                    f"sentinel down-after-milliseconds {self.name} 1000",
                    f"sentinel failover-timeout {self.name} 5000",
                    "sentinel resolve-hostnames no",
                ]
                s.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def current_master(self) -> str:
        c = self.sentinels[0].client()
        host, port = c.execute_command("SENTINEL", "get-master-addr-by-name", self.name)
        return f"{host.decode()}:{int(port)}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Replica links up and every sentinel knows the replicas and the other sentinels."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                links = all(
                    r.client().info("replication").get("master_link_status") == "up"
                    for r in self.data_nodes
                    if r.proc is not None and r.client().info("replication")["role"] != "master"
                )
                known = True
                for s in self.sentinels:
                    m = s.client().execute_command("SENTINEL", "master", self.name)
                    fields = dict(zip(m[::2], m[1::2], strict=False))
                    known = known and int(fields[b"num-slaves"]) >= len(self.replicas)
                    known = known and int(fields[b"num-other-sentinels"]) >= 2
                if links and known:
                    return
            except (redis.RedisError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel set not ready after {timeout:.0f} s ({self.base})")
            time.sleep(0.1)

    def node_at(self, address: str) -> Node:
        return next(n for n in self.data_nodes if n.address == address)

    def stop(self) -> None:
        for node in [*self.sentinels, *self.replicas, self.master]:
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        remove_dir(self.base)
