"""A slow, controllable TCP proxy on loopback between a client and an HTTP server (moto).

Why: the WAL fault tests need storage that is slow (bandwidth limit, added latency)
and a way to stop a real upload at an exact point (mid-request, or after the server
has stored the object but before the client hears about it), so that a SIGKILL lands
there on any machine. Everything runs in threads of the test process; the client and
the server are real processes talking real HTTP through it.

Requests are recognised in the client-to-server stream (HTTP/1.1 heads and their
``Content-Length``), so a ``Hold`` can match one request by a substring of its head
(e.g. a WAL segment name in the URL of a PUT).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

CHUNK = 16 * 1024


@dataclass
class Hold:
    """Stops requests whose head contains ``match`` (and ``method``) at a point.

    ``after_body_bytes``: forward that many body bytes, then stop the upload.
    ``response``: forward the whole request, then keep the server's answer from the
    client. ``held`` counts the requests stopped so far; ``release()`` lets them go on,
    ``release(drop=True)`` closes their connections instead (what a killed client's
    connection does)."""

    match: bytes
    method: bytes = b"PUT"
    after_body_bytes: int | None = None
    response: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _held: int = 0
    _released: bool = False
    _drop: bool = False
    responses: int = 0  # answers that arrived from the server while held

    def wants(self, head: bytes) -> bool:
        return head.startswith(self.method + b" ") and self.match in head

    def wait_held(self, count: int = 1, timeout: float = 60.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._held >= count, timeout):
                raise AssertionError(f"no request matching {self.match!r} reached the hold")

    def wait_responses(self, count: int = 1, timeout: float = 60.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.responses >= count, timeout):
                raise AssertionError(f"the server never answered {self.match!r}")

    @property
    def held(self) -> int:
        with self._cond:
            return self._held

    def release(self, *, drop: bool = False) -> None:
        """Let held requests go on (or drop them); the first call decides."""
        with self._cond:
            if not self._released:
                self._released, self._drop = True, drop
            self._cond.notify_all()

    def _arrive(self) -> bool:
        """Block the calling stream until released; True if the connection must drop."""
        with self._cond:
            self._held += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._released)
            return self._drop

    def _answered(self) -> None:
        with self._cond:
            self.responses += 1
            self._cond.notify_all()


class _Pacer:
    """A shared byte budget per second (one link for all connections)."""

    def __init__(self, bps: int | None) -> None:
        self.bps = bps
        self._lock = threading.Lock()
        self._free_at = 0.0

    def spend(self, n: int) -> None:
        if not self.bps:
            return
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + n / self.bps
            until = self._free_at
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _Conn:
    """One client connection and its upstream twin."""

    def __init__(self, proxy: ThrottleProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = socket.create_connection(proxy.upstream, timeout=30)
        self.upstream.settimeout(None)
        self.client.settimeout(None)
        self.last_dir = ""
        self.hold_down: Hold | None = None  # holding the server's answer to the client
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _turn(self, direction: str) -> None:
        """Added latency each time the conversation changes direction (request/answer)."""
        if self.last_dir != direction and self.proxy.latency_s:
            time.sleep(self.proxy.latency_s)
        self.last_dir = direction

    def _send_up(self, data: bytes) -> None:
        self._turn("up")
        for i in range(0, len(data), CHUNK):
            piece = data[i : i + CHUNK]
            self.proxy.pacer_up.spend(len(piece))
            self.upstream.sendall(piece)
            self.proxy.bytes_up += len(piece)

    def pump_up(self) -> None:
        """Client to server: parse request heads, apply holds, pace the bytes."""
        buf = b""
        try:
            while not self.closed.is_set():
                data = self.client.recv(CHUNK)
                if not data:
                    break
                buf += data
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head, buf = buf[: end + 4], buf[end + 4 :]
                    length = _content_length(head)
                    hold = next((h for h in self.proxy.holds if h.wants(head)), None)
                    self._send_up(head)
                    rest = self._body(buf, length, hold)
                    if rest is None:
                        return
                    buf = rest
        except OSError:
            pass
        finally:
            self.close()

    def _body(self, buf: bytes, length: int, hold: Hold | None) -> bytes | None:
        """Forward ``length`` body bytes (``buf`` holds the first ones); returns what
        follows the body, None when the connection was dropped."""
        sent = 0
        stop_at = hold.after_body_bytes if hold is not None else None
        while sent < length:
            if not buf:
                buf = self.client.recv(CHUNK)
                if not buf:
                    raise OSError("client closed mid-body")
            take = buf[: length - sent]
            if stop_at is not None and sent + len(take) >= stop_at:
                take = take[: max(stop_at - sent, 0)]
                if take:
                    self._send_up(take)
                    sent += len(take)
                    buf = buf[len(take) :]
                assert hold is not None
                stop_at = None
                if hold._arrive():
                    return None
                continue
            if hold is not None and hold.response and sent + len(take) == length:
                self.hold_down = hold  # before the last byte: the answer cannot slip by
            self._send_up(take)
            sent += len(take)
            buf = buf[len(take) :]
        if hold is not None and hold.response and length == 0:
            self.hold_down = hold
        return buf

    def pump_down(self) -> None:
        """Server to client: pace the bytes; keep a held answer from the client."""
        try:
            while not self.closed.is_set():
                data = self.upstream.recv(CHUNK)
                if not data:
                    break
                hold = self.hold_down
                if hold is not None and not data.startswith(b"HTTP/1.1 100"):
                    self.hold_down = None
                    hold._answered()
                    if hold._arrive():
                        return
                self._turn("down")
                self.proxy.pacer_down.spend(len(data))
                self.client.sendall(data)
                self.proxy.bytes_down += len(data)
        except OSError:
            pass
        finally:
            self.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class ThrottleProxy:
    """``127.0.0.1:<port>`` forwarding to ``upstream`` with a bandwidth limit (bytes per
    second, per direction, shared by all connections), added latency per turn of the
    conversation, and holds. Start with ``start()``, stop with ``stop()``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        bandwidth_bps: int | None = None,
        latency_s: float = 0.0,
    ) -> None:
        self.upstream = upstream
        self.latency_s = latency_s
        self.pacer_up = _Pacer(bandwidth_bps)
        self.pacer_down = _Pacer(bandwidth_bps)
        self.holds: list[Hold] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._conns: list[_Conn] = []
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self, hold: Hold) -> Hold:
        self.holds.append(hold)
        return hold

    def clear_holds(self) -> None:
        for hold in self.holds:
            hold.release()
        self.holds = []

    def start(self) -> ThrottleProxy:
        self._server.listen(64)
        self._thread = threading.Thread(target=self._accept, name="throttle-proxy", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                conn = _Conn(self, client)
            except OSError:
                client.close()
                continue
            self._conns.append(conn)
            for pump in (conn.pump_up, conn.pump_down):
                threading.Thread(target=pump, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self.clear_holds()
        with contextlib.suppress(OSError):
            self._server.close()
        for conn in self._conns:
            conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
