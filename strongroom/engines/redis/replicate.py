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
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from strongroom.engines.redis.conn import RedisConnection, config_value, redis_errors
from strongroom.errors import AccessDenied, IntegrityError, InvalidInput, ServiceUnavailable
from strongroom.redact import register, scrub

QUEUE_CHUNKS = 64  # chunks of the artifact reader (1 MiB or less) queued per replica


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
    """The master's half of a full resync for the replicas that authenticate with the
    token: each gets ``+FULLRESYNC`` and ``$<size>``, then every byte written to the
    feeder (``write``, called by the artifact reader as it decrypts)."""

    def __init__(self, host: str, token: str, size: int) -> None:
        self.size = size
        self.token = token.encode()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.replicas: list[socket.socket] = []
        self.started = False  # payload bytes went out: a later sync means a failed load
        self.written = 0
        self.lost = False  # a replica hung up, or came back for another sync
        self.refused = 0  # connections that did not authenticate
        self.error: str | None = None
        self._lock = threading.Lock()
        self._queues: list[queue.Queue[bytes | None]] = []
        self._senders: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="rdb-feeder", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                peer, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stop.is_set():
                    self.error = f"replication feeder failed: {exc}"
                return
            try:
                if not self._handshake(peer):
                    peer.close()
            except OSError:
                peer.close()

    def _handshake(self, peer: socket.socket) -> bool:
        """PING/AUTH/REPLCONF until PSYNC; True once ``peer`` joined the replicas."""
        import hiredis

        peer.settimeout(30.0)
        reader = hiredis.Reader()
        authed = False
        while not self._stop.is_set():
            data = peer.recv(65536)
            if not data:
                return False
            reader.feed(data)
            while (cmd := reader.gets()) is not False:
                if not isinstance(cmd, list) or not cmd:
                    return False
                name = bytes(cmd[0]).upper()
                if name == b"PING":
                    peer.sendall(b"+PONG\r\n")
                elif name == b"AUTH" and hmac.compare_digest(bytes(cmd[-1]), self.token):
                    authed = True
                    peer.sendall(b"+OK\r\n")
                elif not authed:
                    self.refused += 1
                    peer.sendall(b"-NOAUTH Authentication required.\r\n")
                    return False
                elif name == b"REPLCONF":
                    peer.sendall(b"+OK\r\n")
                elif name in (b"PSYNC", b"SYNC"):
                    with self._lock:
                        if self.started:
                            self.lost = True  # a second sync: the first load failed
                            return False
                        replid = secrets.token_hex(20).encode()
                        peer.sendall(b"+FULLRESYNC %b 0\r\n$%d\r\n" % (replid, self.size))
                        peer.settimeout(None)
                        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
                        self.replicas.append(peer)
                    return True
                else:
                    peer.sendall(b"-ERR unexpected command\r\n")
                    return False
        return False

    def wait_replicas(self, n: int, timeout: float, check: Callable[[], None]) -> None:
        deadline = time.monotonic() + timeout
        while len(self.replicas) < n:
            if self.error:
                raise ServiceUnavailable(self.error)
            check()
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"only {len(self.replicas)} of {n} replicas connected to the feeder on "
                    f"{self.host}:{self.port} within {timeout:.0f} s: can the target reach "
                    "this runner (replicate_host)?"
                )
            time.sleep(0.01)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue ``data`` for every replica; a sender thread per replica keeps its socket
        busy, so decryption runs ahead of the slowest replica by up to QUEUE_CHUNKS."""
        with self._lock:
            self.started = True
            if not self._senders:
                self._start_senders()
        chunk = bytes(data)
        for q in self._queues:
            while True:
                if self.lost or self._stop.is_set():
                    raise ServiceUnavailable(
                        f"a replica dropped the replication link ({self.error or 'closed'})"
                    )
                try:
                    q.put(chunk, timeout=0.2)
                    break
                except queue.Full:
                    continue
        self.written += len(chunk)
        return len(chunk)

    def _start_senders(self) -> None:
        for peer in self.replicas:
            q: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
            thread = threading.Thread(target=self._send, args=(peer, q), daemon=True)
            self._queues.append(q)
            self._senders.append(thread)
            thread.start()

    def _send(self, peer: socket.socket, q: queue.Queue[bytes | None]) -> None:
        while not self._stop.is_set():
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                peer.sendall(item)
            except OSError as exc:
                self.error = f"sending to a replica failed: {exc}"
                self.lost = True
                return

    def finish(self) -> None:
        """Wait until every queued byte has been handed to the kernel."""
        for q in self._queues:
            q.put(None)
        for thread in self._senders:
            while thread.is_alive():
                thread.join(timeout=0.2)
                if self.lost:
                    raise ServiceUnavailable(
                        f"a replica dropped the replication link ({self.error})"
                    )

    def watch(self) -> None:
        """After the payload: read (and drop) what the replicas send, noting a hang-up."""
        threading.Thread(target=self._drain, name="rdb-feeder-drain", daemon=True).start()

    def _drain(self) -> None:
        import select

        peers = list(self.replicas)
        while peers and not self._stop.is_set():
            readable, _, _ = select.select(peers, [], [], 0.2)
            for peer in readable:
                try:
                    if peer.recv(65536):
                        continue
                except OSError:
                    pass
                peers.remove(peer)
                if not self._stop.is_set():
                    self.lost = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in [self.listener, *self.replicas]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._senders:
            thread.join(timeout=5)


class VerifiedGate:
    """Keeps the plaintext back until the artifact reader reports (``release``, its
    ``on_verified``) that everything written so far comes from stored chunks that
    matched the signed manifest: a forged artifact sends the replicas nothing."""

    def __init__(self, sink: RdbFeeder) -> None:
        self.sink = sink
        self.pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.pending.append(bytes(data))
        return len(data)

    def release(self) -> None:
        for chunk in self.pending:
            self.sink.write(chunk)
        self.pending.clear()


def _loaded(client: redis.Redis) -> bool:
    info = client.info("replication")
    loading = bool(int(client.info("persistence").get("loading", 0)))
    return str(info.get("master_link_status", "")) == "up" and not loading


def _promote(client: redis.Redis, deadline: float) -> None:
    """REPLICAOF NO ONE, retried while the server is still LOADING."""
    while True:
        try:
            client.execute_command("REPLICAOF", "NO", "ONE")
            return
        except redis.exceptions.BusyLoadingError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _set_config(client: redis.Redis, values: dict[str, str], saved: dict[str, str]) -> None:
    for name, value in values.items():
        old = config_value(client, name) or ""
        if name == "masterauth" and old:
            register(old)
        client.config_set(name, value)
        saved.setdefault(name, old)


def replicate_into(
    conn: RedisConnection,
    scratch: RedisConnection,
    feed: Callable[[RdbFeeder], Any],
    size: int,
    host: str,
    *,
    timeout: float,
    check: Callable[[], None],
    verify: Callable[[], dict[str, Any]],
    target_was_empty: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Make the target and the scratch server replicas of a feeder, stream the artifact's
    plaintext to both as ``feed`` decrypts it (the reader holds its last MiB back until
    every checksum passed, so no replica can finish loading an unverified RDB), wait
    until both have loaded, run ``verify`` while both are still replicas (a replica
    never expires keys, so both hold exactly what the RDB held: counts compare exactly
    even while TTLs pass), then make them masters again. Returns (facts, verify's result).

    On a failure the target is made a master again and, if it was empty before or the
    whole payload had gone out (its old data may be gone), emptied (FLUSHALL, FUNCTION
    FLUSH); otherwise it never flushed (a non-empty replica loads from disk, after the
    last byte), so it is left as it was."""
    client = conn.client(timeout=60)
    helper = scratch.client(timeout=60)
    token = secrets.token_hex(32)
    register(token)
    started = time.monotonic()
    try:
        feeder = RdbFeeder(host, token, size)
    except OSError as exc:
        raise InvalidInput(
            f"replicate_host {host!r}: cannot listen there ({exc}). Nothing was changed"
        ) from None
    saved: dict[str, str] = {}
    replica = False
    phases: dict[str, float] = {}
    try:
        with redis_errors("making the scratch server a replica of the feeder"):
            helper.config_set("masterauth", token)
            helper.config_set("repl-diskless-load", "on-empty-db")
            helper.execute_command("REPLICAOF", feeder.host, feeder.port)
        with redis_errors("preparing the target for replication"):
            _set_config(client, {"masterauth": token, "repl-diskless-load": "on-empty-db"}, saved)
            client.execute_command("REPLICAOF", feeder.host, feeder.port)
            replica = True
        feeder.wait_replicas(2, 60.0, check)
        phases["handshake_s"] = time.monotonic() - started
        feed(feeder)
        feeder.finish()
        feeder.watch()
        phases["stream_s"] = time.monotonic() - started - phases["handshake_s"]
        deadline = started + timeout
        with redis_errors("waiting for the target to load the backup"):
            pending = {"target": client, "scratch": helper}
            while pending:
                for name, c in list(pending.items()):
                    if _loaded(c):
                        del pending[name]
                if not pending:
                    break
                if feeder.error or feeder.lost:
                    raise IntegrityError(
                        f"{' and '.join(pending)} did not load the backup's RDB "
                        f"({feeder.error or 'the replication link dropped'}); see the log of "
                        f"{conn.address if 'target' in pending else 'the scratch server'}"
                    )
                check()
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(
                        f"the target did not load the backup within {timeout:.0f} s (load_timeout)"
                    )
                time.sleep(0.01)
            phases["loaded_s"] = time.monotonic() - started
            checks = verify()
            if feeder.lost:
                raise IntegrityError("a replication link dropped during the checks")
            feeder.close()  # loaded and checked: no more replication traffic
            _promote(helper, deadline)
            _promote(client, deadline)
            replica = False
        facts = {
            "listen": f"{feeder.host}:{feeder.port}",
            "rdb_bytes": feeder.written,
            "refused_connections": feeder.refused,
            "seconds": round(time.monotonic() - started, 3),
            **{k: round(v, 3) for k, v in phases.items()},
        }
        return facts, checks
    except BaseException:
        if replica or feeder.written:
            feeder.close()
            _undo(client, replica, conn, flush=target_was_empty or feeder.written >= size)
        raise
    finally:
        feeder.close()
        for name, old in saved.items():
            with redis_errors(f"restoring the target's {name}"):
                client.config_set(name, old)
        client.close()
        helper.close()


def _undo(client: redis.Redis, replica: bool, conn: RedisConnection, *, flush: bool) -> None:
    """After a failure: a master again, and empty when it may hold a half load."""
    try:
        if replica:
            _promote(client, time.monotonic() + conn.load_timeout)
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"the restore failed and the target {conn.address} is still a replica "
            f"({scrub(str(exc))}): run REPLICAOF NO ONE and FLUSHALL on it by hand"
        ) from None
    if flush:
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
