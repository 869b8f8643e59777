"""The replication protocol, client side: what ``redis-cli --rdb`` does, as a byte stream.

Handshake on a plain (or TLS) socket::

    AUTH [user] password             -> +OK
    REPLCONF capa eof capa psync2    -> +OK      (we accept the diskless EOF-marked form)
    REPLCONF rdb-only 1              -> +OK      (Redis 7+: send the RDB, then close; optional)
    INFO keyspace                    -> $<n> ... (key counts one round trip before the fork)
    PSYNC ? -1                       -> +FULLRESYNC <replid> <offset>   (or SYNC on old servers)

then zero or more ``\\n`` keep-alives while the server forks, then either
``$<length>\\r\\n`` and exactly that many bytes (disk-based transfer), or
``$EOF:<40 random bytes>\\r\\n`` and the payload followed by the same 40
bytes (diskless transfer). ``ReplicationSnapshot.read`` hands out the payload
and nothing else, so it can feed ``store_artifact`` directly; it checks the
RDB's trailing CRC64 as the last bytes pass and raises on a short stream.

A server that refuses REPLCONF/PSYNC/SYNC (managed Redis renames or ACL-blocks
them) raises ``SyncRefused`` before a byte of payload has been read, so the
caller can fall back to another method.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import IO, Any, cast

from strongroom.engines.redis.conn import RedisConnection, parse_keyspace_text
from strongroom.engines.redis.rdb import RdbTracker
from strongroom.errors import (
    AccessDenied,
    IntegrityError,
    ServiceUnavailable,
    StrongroomError,
    ToolFailed,
)
from strongroom.redact import register, scrub

MARK_LEN = 40
READ_BUFFER = 1024 * 1024


class SyncRefused(StrongroomError):
    """The server does not allow this client to replicate (fall back to another method)."""


def encode(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


MAX_TEXT_REPLY = 16 * 1024 * 1024  # INFO and other text replies; the RDB payload is streamed
MAX_PAYLOAD = 1 << 62


def bulk_length(line: str, where: str, limit: int) -> int:
    """The ``<n>`` of a ``$<n>`` reply: digits only, 0 <= n <= ``limit``, else ToolFailed."""
    digits = line[1:]
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        raise ToolFailed(f"{where}: malformed bulk length in reply {line[:64]!r}")
    size = int(digits)
    if size > limit:
        raise ToolFailed(f"{where}: bulk length {size} exceeds the limit of {limit} bytes")
    return size


def _refusal(line: str) -> bool:
    return "unknown command" in line or line.startswith("-NOPERM") or "not allowed" in line


class ReplicationSnapshot:
    """A file-like source over a full resynchronization's RDB payload."""

    def __init__(self, conn: RedisConnection, *, timeout: float | None = None) -> None:
        register(*conn.secrets())
        self.conn = conn
        self.timeout = timeout or max(conn.command_timeout, 60.0)
        self.tracker = RdbTracker()
        self.facts: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._sock: socket.socket | None = None
        self._file: IO[bytes] | None = None
        self._remaining: int | None = None
        self._mark = b""
        self._pending = b""
        self._done = False

    # -- handshake -------------------------------------------------------------------------

    def open(self) -> dict[str, Any]:
        """Connect, authenticate and ask for a full resync; returns facts for the manifest."""
        where = f"replication from {self.conn.address}"
        try:
            sock = socket.create_connection(
                (self.conn.host, self.conn.port), timeout=self.conn.connect_timeout
            )
        except OSError as exc:
            raise ServiceUnavailable(f"{where}: server unreachable ({exc})") from None
        try:
            if self.conn.tls:
                context = ssl.create_default_context(cafile=self.conn.tls_ca_file)
                sock = context.wrap_socket(sock, server_hostname=self.conn.host)
            sock.settimeout(self.timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            self._sock = sock
            self._file = cast(IO[bytes], sock.makefile("rb", buffering=READ_BUFFER))
            self._handshake(where)
        except BaseException:
            self.close()
            raise
        return self.facts

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(payload)
        except OSError as exc:
            raise ServiceUnavailable(f"replication: connection lost ({exc})") from None

    def _line(self) -> str:
        assert self._file is not None
        try:
            raw = self._file.readline(64 * 1024)
        except (OSError, TimeoutError) as exc:
            raise ServiceUnavailable(f"replication: no reply from the server ({exc})") from None
        if not raw:
            raise ServiceUnavailable("replication: the server closed the connection")
        return scrub(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def _bulk_text(self) -> str:
        head = self._line()
        if not head.startswith("$"):
            raise ToolFailed(f"replication: unexpected reply {head[:200]!r}")
        size = bulk_length(head, "replication", MAX_TEXT_REPLY)
        assert self._file is not None
        body = self._file.read(size + 2)
        return body[:size].decode("utf-8", "replace")

    def _handshake(self, where: str) -> None:
        conn = self.conn
        if conn.password is not None:
            secret = conn.password.get_secret_value()
            args = ("AUTH", conn.username, secret) if conn.username else ("AUTH", secret)
            self._send(encode(*args))
            reply = self._line()
            if not reply.startswith("+"):
                raise AccessDenied(f"{where}: the server refused the credentials ({reply[1:]})")
        self._send(encode("REPLCONF", "capa", "eof", "capa", "psync2"))
        reply = self._line()
        if reply.startswith("-NOAUTH") or reply.startswith("-WRONGPASS"):
            raise AccessDenied(f"{where}: authentication required ({reply[1:]})")
        if not reply.startswith("+"):
            raise SyncRefused(f"REPLCONF refused: {reply[1:]}")
        self._send(encode("REPLCONF", "rdb-only", "1"))
        self.facts["rdb_only"] = self._line().startswith("+")
        # Key counts one round trip before the fork (PSYNC refuses to run while a reply is
        # pending, so the two cannot share one write); exact when nothing writes meanwhile.
        self._send(encode("INFO", "keyspace"))
        keys_reply = self._line()
        if keys_reply.startswith("$"):
            size = bulk_length(keys_reply, f"{where}: INFO keyspace", MAX_TEXT_REPLY)
            assert self._file is not None
            self.facts["keyspace"] = parse_keyspace_text(
                self._file.read(size + 2)[:size].decode("utf-8", "replace")
            )
        self._send(encode("PSYNC", "?", "-1"))
        reply = self._line()
        if reply.startswith("+FULLRESYNC"):
            parts = reply.split()
            self.facts["command"] = "PSYNC"
            if len(parts) >= 3:
                if not parts[2].isascii() or not parts[2].lstrip("-").isdigit():
                    raise ToolFailed(f"{where}: malformed FULLRESYNC reply {reply[:120]!r}")
                self.facts["replid"] = parts[1]
                self.facts["offset"] = int(parts[2])
            self._read_bulk_header(where, None)
            return
        if reply.startswith("+CONTINUE"):
            raise ToolFailed(f"{where}: server offered a partial resync to a new replica")
        if not _refusal(reply):
            self._read_bulk_header(where, reply)  # not PSYNC-aware: this was the payload
            return
        # PSYNC refused or unknown: try the old SYNC (some proxies only rename PSYNC)
        self._send(encode("SYNC"))
        self.facts["command"] = "SYNC"
        first = self._line()
        if _refusal(first):
            raise SyncRefused(f"PSYNC and SYNC refused: {reply[1:]} / {first[1:]}")
        self._read_bulk_header(where, first)

    def _read_bulk_header(self, where: str, first: str | None) -> None:
        line = first
        while not line:  # keep-alive newlines arrive while the server forks
            line = self._line()
        if line.startswith("-"):
            if _refusal(line):
                raise SyncRefused(f"replication refused: {line[1:]}")
            raise ToolFailed(f"{where}: the server failed the snapshot: {line[1:]}")
        if line.startswith("$EOF:"):
            self._mark = line[5:].encode("latin-1")  # 40 random hex characters
            if len(self._mark) != MARK_LEN:
                raise ToolFailed(f"{where}: malformed EOF marker")
            self.facts["transfer"] = "diskless"
            return
        if line.startswith("$"):
            self._remaining = bulk_length(line, where, MAX_PAYLOAD)
            self.facts["transfer"] = "disk"
            self.facts["payload_size"] = self._remaining
            return
        raise ToolFailed(f"{where}: unexpected reply {line[:200]!r}")

    # -- payload ---------------------------------------------------------------------------

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` payload bytes; b"" at the end (after the CRC64 check passed)."""
        try:
            return self._read(n if n and n > 0 else READ_BUFFER)
        except BaseException as exc:
            self.error = exc
            raise

    def _read(self, n: int) -> bytes:
        if self._done:
            return b""
        assert self._file is not None
        while True:
            want = n if self._remaining is None else min(n, self._remaining)
            try:
                data = self._file.read1(want) if want else b""  # type: ignore[attr-defined]
            except (OSError, TimeoutError) as exc:
                raise ServiceUnavailable(f"replication stream broke ({exc})") from None
            if self._remaining is not None:
                if not data and self._remaining:
                    raise ServiceUnavailable(
                        f"replication stream ended {self._remaining} bytes early"
                    )
                self._remaining -= len(data)
                if self._remaining == 0:
                    self._finish()
                self.tracker.update(data)
                if self._remaining == 0:
                    self._check_end()
                return data
            if not data:
                raise ServiceUnavailable("replication stream ended before its EOF marker")
            joined = self._pending + data
            found = joined.find(self._mark)
            if found >= 0:
                out = joined[:found]
                self._pending = b""
                self._finish()
                self.tracker.update(out)
                self._check_end()
                return out
            keep = min(len(joined), MARK_LEN)
            out, self._pending = joined[:-keep], joined[-keep:]
            if out:
                self.tracker.update(out)
                return out

    def _finish(self) -> None:
        self._done = True
        self.close()

    def _check_end(self) -> None:
        facts = self.tracker.finish()
        self.facts["rdb"] = facts

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._sock.close()
            self._sock = None


def check_complete(snapshot: ReplicationSnapshot) -> None:
    """After the store: the payload must have ended cleanly."""
    if "rdb" not in snapshot.facts:
        raise IntegrityError("replication stream ended without a complete RDB")
