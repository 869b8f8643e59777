"""How to reach a Redis server (``RedisConnection``) and a client whose failures map to
strongroom's error types with every secret scrubbed.

Prefect's ``RedisTarget`` block converts itself into a ``RedisConnection``; the
engine never sees the block. The password travels only inside the Redis
protocol (AUTH, and MIGRATE's AUTH/AUTH2 arguments), never in argv or logs.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

from strongroom.errors import AccessDenied, InvalidInput, ServiceUnavailable, ToolFailed
from strongroom.ids import check_name
from strongroom.redact import register, scrub
from strongroom.transport import require_encrypted

BackupMethod = Literal["auto", "sync", "bgsave", "logical"]
Topology = Literal["standalone", "cluster"]
MAX_DB = 1023


class RedisConnection(BaseModel):
    """A Redis server to back up and restore into, and how to coordinate file restores."""

    name: str = Field(description="target name used in the repository layout")
    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    username: str | None = Field(default=None, description="ACL user (Redis 6+); None: default")
    password: SecretStr | None = None
    tls: bool = False
    tls_ca_file: str | None = Field(default=None, description="CA bundle for TLS verification")
    allow_plaintext: bool = Field(default=False, description="allow tls=False to a remote host")
    dbs: list[int] = Field(
        default_factory=list,
        description="databases to export/restore; empty means every database with keys",
    )
    backup_method: BackupMethod = Field(
        default="auto",
        description="auto: replication SYNC, then BGSAVE+file, then logical SCAN+DUMP",
    )
    data_path: str | None = Field(
        default=None,
        description="the server's RDB file as this runner sees it (shared volume): used by "
        "the BGSAVE fallback and by file restores",
    )
    stop_command: str | None = Field(
        default=None, description="local command that stops the server (file restores)"
    )
    start_command: str | None = Field(
        default=None, description="local command that starts the server (file restores)"
    )
    k8s_statefulset: str | None = Field(
        default=None,
        description="StatefulSet running Redis: file restores without stop/start commands "
        "scale it to 0 and back through the Kubernetes API",
    )
    k8s_namespace: str = Field(default="default", description="namespace of the StatefulSet")
    k8s_kubeconfig: str | None = Field(
        default=None,
        description="kubeconfig file for the Kubernetes API; None: the in-cluster service account",
    )
    k8s_context: str | None = Field(
        default=None, description="context in k8s_kubeconfig (None: its current-context)"
    )
    k8s_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds to wait for the pods to go away after scaling to 0, and to be "
        "Ready again after scaling back",
    )
    topology: Topology = Field(
        default="standalone",
        description="standalone: host/port; cluster: discovered from seed_nodes",
    )
    seed_nodes: list[str] = Field(
        default_factory=list, description="cluster: host:port of one or more cluster nodes"
    )
    from_masters: bool = Field(
        default=False,
        description="cluster: snapshot the masters (default: a caught-up replica)",
    )
    cluster_pause_ms: int = Field(
        default=0,
        ge=0,
        le=60_000,
        description="cluster: 0 = per-shard points in time; > 0 = a cluster-wide cut under "
        "CLIENT PAUSE WRITE of at most this many ms (the backup fails if it is not enough)",
    )
    failover_timeout: float = Field(
        default=60.0, gt=0, description="seconds to wait for a failover before retrying"
    )
    connect_timeout: float = Field(default=10.0, gt=0)
    command_timeout: float = Field(default=300.0, gt=0)
    load_timeout: float = Field(
        default=1800.0, gt=0, description="seconds to wait for a restarted server to load"
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return check_name(value, "target name")

    @field_validator("dbs")
    @classmethod
    def _dbs_ok(cls, value: list[int]) -> list[int]:
        for db in value:
            if not 0 <= db <= MAX_DB:
                raise ValueError(f"db index {db} out of range 0..{MAX_DB}")
        return sorted(set(value))

    @field_validator("seed_nodes")
    @classmethod
    def _addresses_ok(cls, value: list[str]) -> list[str]:
        for address in value:
            split_address(address)
        return value

    @model_validator(mode="after")
    def _transport_ok(self) -> RedisConnection:
        hosts = [self.host]
        if self.topology == "cluster":
            if not self.seed_nodes:
                raise ValueError("topology cluster needs seed_nodes (host:port, one or more)")
            hosts = [split_address(a)[0] for a in self.seed_nodes]
        for host in hosts:
            require_encrypted(
                engine="redis",
                target=self.name,
                host=host,
                encrypted=self.tls,
                field="tls=false",
                allow_plaintext=self.allow_plaintext,
            )
        return self

    def secrets(self) -> list[str]:
        return [self.password.get_secret_value()] if self.password else []

    def node(self, address: str) -> RedisConnection:
        """The same credentials and settings, for one server of the topology."""
        host, port = split_address(address)
        return self.model_copy(update={"host": host, "port": port, "topology": "standalone"})

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def client(self, db: int = 0, *, timeout: float | None = None) -> redis.Redis:
        """A redis-py client (no retries, no decoding) for database ``db``."""
        register(*self.secrets())
        kwargs: dict[str, Any] = {}
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=self.tls_ca_file)
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=db,
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=timeout or self.command_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            protocol=2,
            client_name="strongroom",
            **kwargs,
        )


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


def is_refusal(exc: BaseException) -> bool:
    """A command that the server does not know or does not allow this user to run."""
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and (
        text.startswith(("unknown command", "NOPERM", "ERR unknown command"))
        or "unknown command" in text
        or isinstance(exc, redis.exceptions.NoPermissionError)
    )


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate redis-py failures into strongroom errors; messages are scrubbed."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise AccessDenied(
            f"{what}: the server refused the credentials ({scrub(str(exc))})"
        ) from None
    except redis.exceptions.NoPermissionError as exc:
        raise AccessDenied(f"{what}: not permitted for this user ({scrub(str(exc))})") from None
    except redis.exceptions.BusyLoadingError as exc:
        raise ServiceUnavailable(f"{what}: the server is loading its dataset ({exc})") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailable(f"{what}: server unreachable ({scrub(str(exc))})") from None
    except redis.ResponseError as exc:
        text = scrub(str(exc))
        if text.startswith(("WRONGPASS", "NOAUTH")):
            raise AccessDenied(f"{what}: the server refused the credentials ({text})") from None
        raise ToolFailed(f"{what}: the server replied: {text}") from None
    except redis.RedisError as exc:
        raise ToolFailed(f"{what}: {scrub(str(exc))}") from None


def server_info(client: redis.Redis, what: str) -> dict[str, Any]:
    """INFO (all default sections) as a dict; raises mapped errors."""
    with redis_errors(what):
        info: dict[str, Any] = client.info()
    return info


def keyspace(info: dict[str, Any]) -> dict[int, dict[str, int]]:
    """``{db: {"keys": n, "expires": m}}`` from an INFO reply (dbs with keys only)."""
    out: dict[int, dict[str, int]] = {}
    for name, value in info.items():
        if (
            isinstance(name, str)
            and name.startswith("db")
            and name[2:].isdigit()
            and isinstance(value, dict)
        ):
            out[int(name[2:])] = {
                "keys": int(value.get("keys", 0)),
                "expires": int(value.get("expires", 0)),
            }
    return dict(sorted(out.items()))


def parse_keyspace_text(text: str) -> dict[int, dict[str, int]]:
    """The same from the raw text of ``INFO keyspace``."""
    out: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        if not line.startswith("db") or ":" not in line:
            continue
        name, _, rest = line.partition(":")
        if not name[2:].isdigit():
            continue
        fields = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
        out[int(name[2:])] = {
            "keys": int(fields.get("keys", 0)),
            "expires": int(fields.get("expires", 0)),
        }
    return dict(sorted(out.items()))


def check_pattern(pattern: str | None) -> str | None:
    """A SCAN MATCH glob; refused if empty, huge or containing NUL."""
    if pattern is None:
        return None
    if not pattern or len(pattern) > 1024 or "\x00" in pattern:
        raise InvalidInput("invalid key_pattern: 1-1024 characters, no NUL (a Redis glob)")
    return pattern


def config_value(client: redis.Redis, name: str) -> str | None:
    """One CONFIG GET value as text (None if unset); redis-py errors propagate."""
    reply = client.config_get(name)
    for key, value in reply.items():
        text_key = key.decode() if isinstance(key, bytes) else str(key)
        if text_key == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None
