"""Live restore by replication: the target loads the backup's RDB as a replica of strongroom.

``copy_method="replicate"`` avoids every per-key round trip: strongroom plays the
master's half of a full resynchronisation for exactly one replica. The verified RDB
(the artifact's checksums passed while it was written to the scratch folder) is sent
as the ``+FULLRESYNC`` payload; the target loads it at its own load speed, then
``REPLICAOF NO ONE`` makes it a master again.

The listener (``RdbFeeder``) binds the runner's address toward the target on a random
port and serves only a connection that authenticates with a one-time 256-bit token:
strongroom sets that token as the target's ``masterauth`` for the duration and puts
the previous value back afterwards. A full resync replaces the target's whole dataset
(every database and its function libraries), so ``restore_redis`` allows this method
only for a whole-backup restore into a target that is empty or ``flush_existing``.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from strongroom.engines.redis.conn import RedisConnection, config_value, redis_errors
from strongroom.errors import AccessDenied, IntegrityError, InvalidInput, ServiceUnavailable
from strongroom.redact import register, scrub


def replicate_preflight(
    conn: RedisConnection, client: redis.Redis, info: dict[str, Any]
) -> dict[str, Any]:
    """What the method needs from the target, checked before anything changes."""
    if str(info.get("role", "master")) != "master":
        raise InvalidInput(
            f"copy_method=replicate: the target {conn.address} is a replica of "
            f"{info.get('master_host')}:{info.get('master_port')}; restore into its master. "
            "Nothing was changed"
        )
    if int(info.get("cluster_enabled", 0) or 0):
        raise InvalidInput(
            "copy_method=replicate does not work with Redis Cluster (REPLICAOF is refused "
            "there): use copy_method=pipeline. Nothing was changed"
        )
    try:
        with redis_errors("reading the target's replication settings"):
            tls_replication = config_value(client, "tls-replication")
            diskless_load = config_value(client, "repl-diskless-load")
            libraries = _function_count(client, str(info.get("redis_version", "0")))
    except AccessDenied as exc:
        raise AccessDenied(
            f"copy_method=replicate needs CONFIG and REPLICAOF on the target ({exc}); use "
            "copy_method=pipeline. Nothing was changed"
        ) from None
    if (tls_replication or "no") == "yes":
        raise InvalidInput(
            "copy_method=replicate: the target replicates over TLS (tls-replication yes), "
            "which strongroom's feeder does not speak: use copy_method=pipeline. "
            "Nothing was changed"
        )
    return {
        "repl_diskless_load": diskless_load,
        "function_libraries": libraries,
        "target_replicas": int(info.get("connected_slaves", 0) or 0),
    }


def _function_count(client: redis.Redis, version: str) -> int:
    if int(version.split(".")[0] or 0) < 7:
        return 0
    return len(client.execute_command("FUNCTION", "LIST"))


def listen_host(conn: RedisConnection, override: str | None) -> str:
    """The runner's address the target can reach: loopback for a local target, else the
    local end of a connection to the target (the interface the route takes)."""
    if override:
        return override
    if conn.is_loopback():
        return "127.0.0.1"
    try:
        with socket.create_connection((conn.host, conn.port), timeout=conn.connect_timeout) as s:
            return str(s.getsockname()[0])
    except OSError as exc:
        raise ServiceUnavailable(f"{conn.address}: server unreachable ({exc})") from None


class RdbFeeder:
    """Serves one RDB file to one authenticated Redis replica (a master's full resync)."""

    def __init__(self, rdb_path: Path, host: str, token: str) -> None:
        self.rdb_path = rdb_path
        self.size = rdb_path.stat().st_size
        self.token = token.encode()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.sent = False  # the whole payload went out
        self.lost = False  # the replica came back (or hung up) after the payload: load failed
        self.refused = 0  # connections that did not authenticate
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rdb-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    peer, _ = self.listener.accept()
                except TimeoutError:
                    continue
                with peer:
                    self._serve(peer)
        except OSError as exc:
            if not self._stop.is_set():
                self.error = f"replication feeder failed: {exc}"

    def _serve(self, peer: socket.socket) -> None:
        import hiredis

        peer.settimeout(60.0)
        reader = hiredis.Reader()
        authed = False
        while not self._stop.is_set():
            data = peer.recv(65536)
            if not data:
                return
            reader.feed(data)
            while (cmd := reader.gets()) is not False:
                if not isinstance(cmd, list) or not cmd:
                    return
                name = bytes(cmd[0]).upper()
                if name == b"PING":
                    peer.sendall(b"+PONG\r\n")
                elif name == b"AUTH" and hmac.compare_digest(bytes(cmd[-1]), self.token):
                    authed = True
                    peer.sendall(b"+OK\r\n")
                elif not authed:
                    self.refused += 1
                    peer.sendall(b"-NOAUTH Authentication required.\r\n")
                    return
                elif self.sent:
                    self.lost = True  # a second sync: the first payload did not load
                    return
                elif name == b"REPLCONF":
                    peer.sendall(b"+OK\r\n")
                elif name in (b"PSYNC", b"SYNC"):
                    self._send_payload(peer)
                    self._drain(peer)
                    return
                else:
                    peer.sendall(b"-ERR unexpected command\r\n")
                    return

    def _send_payload(self, peer: socket.socket) -> None:
        replid = secrets.token_hex(20).encode()
        peer.sendall(b"+FULLRESYNC %b 0\r\n$%d\r\n" % (replid, self.size))
        peer.settimeout(None)
        with self.rdb_path.open("rb") as handle:
            peer.sendfile(handle)
        self.sent = True

    def _drain(self, peer: socket.socket) -> None:
        """Keep the link open (the replica sends newlines and ACKs) until stopped."""
        peer.settimeout(0.2)
        while not self._stop.is_set():
            try:
                if not peer.recv(65536):
                    self.lost = not self._stop.is_set()
                    return
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.listener.close()


def _replication_state(client: redis.Redis) -> tuple[str, bool]:
    info = client.info("replication")
    loading = bool(int(client.info("persistence").get("loading", 0)))
    return str(info.get("master_link_status", "")), loading


def _promote(client: redis.Redis, deadline: float) -> None:
    """REPLICAOF NO ONE, retried while the target is still LOADING."""
    while True:
        try:
            client.execute_command("REPLICAOF", "NO", "ONE")
            return
        except redis.exceptions.BusyLoadingError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def replicate_into(
    conn: RedisConnection,
    rdb_path: Path,
    host: str,
    *,
    timeout: float,
    check: Callable[[], None],
) -> dict[str, Any]:
    """Make the target a replica of a one-shot feeder of ``rdb_path`` until it has loaded
    it, then a master again; ``check`` is called while waiting and may raise to abort.

    On any failure after REPLICAOF the target (empty, or allowed to be emptied, before)
    is emptied again (FLUSHALL, FUNCTION FLUSH) so no half-loaded dataset stays."""
    client = conn.client(timeout=60)
    token = secrets.token_hex(32)
    register(token)
    started = time.monotonic()
    feeder: RdbFeeder | None = None
    previous: dict[str, str] = {}
    replica = touched = False
    try:
        with redis_errors("preparing the target for replication"):
            feeder = RdbFeeder(rdb_path, host, token)
            for name, value in (("masterauth", token), ("repl-diskless-load", "on-empty-db")):
                old = config_value(client, name) or ""
                if name == "masterauth" and old:
                    register(old)
                client.config_set(name, value)
                previous[name] = old
            client.execute_command("REPLICAOF", feeder.host, feeder.port)
            replica = touched = True
        deadline = started + timeout
        with redis_errors("waiting for the target to load the backup"):
            while True:
                status, loading = _replication_state(client)
                if status == "up" and not loading and feeder.sent:
                    break
                if feeder.error or feeder.lost:
                    raise IntegrityError(
                        f"the target {conn.address} did not load the backup's RDB "
                        f"({feeder.error or 'it dropped the link and asked again'}); see the "
                        "target's log"
                    )
                check()
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(
                        f"the target did not load the backup within {timeout:.0f} s (load_timeout)"
                    )
                time.sleep(0.02)
            _promote(client, deadline)
            replica = False
        return {
            "listen": f"{feeder.host}:{feeder.port}",
            "rdb_bytes": feeder.size,
            "refused_connections": feeder.refused,
            "seconds": round(time.monotonic() - started, 3),
        }
    except BaseException:
        if touched:
            _undo(client, replica, conn)
        raise
    finally:
        if feeder is not None:
            feeder.close()
        for name, old in previous.items():
            with redis_errors(f"restoring the target's {name}"):
                client.config_set(name, old)
        client.close()


def _undo(client: redis.Redis, replica: bool, conn: RedisConnection) -> None:
    """After a failure: a master again, and empty (it was empty or flushable before)."""
    try:
        if replica:
            _promote(client, time.monotonic() + conn.load_timeout)
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"the restore failed and the target {conn.address} is still a replica "
            f"({scrub(str(exc))}): run REPLICAOF NO ONE and FLUSHALL on it by hand"
        ) from None
    empty_target(conn)


def empty_target(conn: RedisConnection) -> None:
    """FLUSHALL and FUNCTION FLUSH: undo a replicated load that must not stay."""
    client = conn.client(timeout=conn.load_timeout)
    try:
        client.flushall()
        if _function_count(client, str(client.info("server").get("redis_version", "0"))):
            client.execute_command("FUNCTION", "FLUSH")
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"the restore failed and the target {conn.address} could not be emptied again "
            f"({scrub(str(exc))}): run FLUSHALL on it by hand"
        ) from None
    finally:
        client.close()


def settle_expired(conn: RedisConnection, dbs: list[int], loaded: dict[int, int]) -> None:
    """A replica keeps keys whose TTL passed (its master would delete them); now a
    master, the target drops them when touched: SCAN the dbs that hold more keys than
    the backup as loaded, so the count check compares like with like."""
    for db in dbs:
        client = conn.client(db)
        try:
            with redis_errors(f"expiring stale keys in db {db} of the target"):
                if int(client.dbsize()) <= loaded.get(db, 0):
                    continue
                cursor = 0
                while True:
                    cursor, _ = client.scan(cursor, count=1000)
                    if int(cursor) == 0:
                        break
        finally:
            client.close()
