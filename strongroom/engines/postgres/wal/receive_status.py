"""What an operator watches on a WAL receiver: lag, slot retention, liveness, readiness.

The receiver (receive.py) runs a :class:`Monitor` thread beside its loop. Every
``interval_s`` seconds the monitor asks the server one question (``STATUS_SQL``
through ``psql``: the server's WAL position, the slot, the receiver's replication
connection) and combines the answer with what the receiver has pushed:

* ``flush_lag_bytes``: WAL the server wrote that the receiver has not flushed;
* ``repository_lag_bytes``: WAL the server wrote that is not in the repository
  (completed segments plus the pushed ``.partial``): what a lost primary costs now;
* ``repository_lag_seconds``: the same as time: how long ago the server first wrote
  WAL the repository still lacks (resolution: ``interval_s``), i.e. the RPO now;
* ``slot_retained_bytes``: WAL the server keeps for the slot. While the receiver is
  down it grows until the server's disk fills (slot hygiene: docs/pitr.md).

:func:`serve` publishes them over HTTP for the Kubernetes Deployment
(deployments/k8s/wal-receive.yaml) and the ``wal-receive-health`` flow: ``/metrics``
(Prometheus), ``/status`` (JSON), ``/healthz`` (liveness: the receiver's loop is
turning) and ``/readyz`` (readiness: streaming, slot active, server answering,
repository accepting pushes). The same ``STATUS_SQL`` serves the health flow, which
asks the server directly, so a dead receiver is still seen.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# One JSON object: positions as byte offsets (pg_lsn - '0/0'), the slot and the
# connection streaming from it (pg_stat_replication row of the slot's walsender).
# On a standby the position is the last WAL received (cascading receivers).
STATUS_SQL = """
SELECT json_build_object(
  'in_recovery', pg_is_in_recovery(),
  'server_lsn', (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                 ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint,
  'slot', (SELECT json_build_object(
             'active', s.active, 'wal_status', s.wal_status,
             'restart_lsn', (s.restart_lsn - '0/0'::pg_lsn)::bigint,
             'safe_wal_size', s.safe_wal_size)
           FROM pg_replication_slots s WHERE s.slot_name = :'slot'),
  'stream', (SELECT json_build_object(
             'state', r.state, 'sync_state', r.sync_state,
             'flush_lsn', (r.flush_lsn - '0/0'::pg_lsn)::bigint,
             'flush_lag_s', extract(epoch FROM r.flush_lag))
           FROM pg_stat_replication r
           WHERE r.pid = (SELECT active_pid FROM pg_replication_slots
                          WHERE slot_name = :'slot'))
);
"""
STATUS_APPLICATION = "strongroom_wal_receive_status"


def server_status(env: Mapping[str, str], slot: str, *, timeout_s: float = 15.0) -> dict[str, Any]:
    """The server's answer to ``STATUS_SQL`` for ``slot`` (libpq environment ``env``;
    database ``PGDATABASE`` or ``postgres``). Raises ``StrongroomError`` classified
    like every PostgreSQL failure (credentials, unreachable...)."""
    from strongroom.engines.postgres.pg_bin import pg_tool
    from strongroom.errors import ServiceUnavailable
    from strongroom.process import classify_failure

    run_env = {
        **env,
        "PGDATABASE": env.get("PGDATABASE") or "postgres",
        "PGAPPNAME": STATUS_APPLICATION,
        "PGCONNECT_TIMEOUT": env.get("PGCONNECT_TIMEOUT") or "5",
    }
    args = [pg_tool("psql"), "-XAtq", "--no-password", "-v", "ON_ERROR_STOP=1"]
    try:
        done = subprocess.run(
            [*args, "-v", f"slot={slot}", "-f", "-"],
            input=STATUS_SQL,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(f"PostgreSQL status query: no answer in {timeout_s:g} s") from None
    if done.returncode != 0:
        what = "the WAL receiver status query"
        raise classify_failure("psql", what, done.returncode, done.stderr)
    answer: dict[str, Any] = json.loads(done.stdout.strip())
    return answer


class LagClock:
    """The server's WAL positions over time, to tell how many seconds of its writes a
    position trails: the time of the first sample beyond the position."""

    def __init__(self, keep_s: float = 6 * 3600) -> None:
        self.keep_s = keep_s
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, at: float, lsn: int) -> None:
        if not self._samples or lsn > self._samples[-1][1]:
            self._samples.append((at, lsn))
        while len(self._samples) > 1 and self._samples[1][0] < at - self.keep_s:
            self._samples.popleft()

    def seconds_behind(self, at: float, covered: int) -> float:
        """0 when ``covered`` reaches the newest position; else the age of the oldest
        sample beyond it (at least the keep window when even that one is beyond)."""
        for when, lsn in self._samples:
            if lsn > covered:
                return max(0.0, at - when)
        return 0.0


@dataclass
class ReceiverView:
    """What the receiver reports to its monitor (receive.Receiver.view)."""

    streaming: bool
    repository_lsn: int
    spool_lsn: int
    push_failures: int
    last_push_at: float | None
    pushed: int
    partials_pushed: int
    restarts: int
    last_error: str


class Monitor:
    """Asks the server every ``interval_s`` seconds and keeps the figures for ``/status``."""

    def __init__(
        self,
        env: Mapping[str, str],
        slot: str,
        view: Callable[[], ReceiverView],
        *,
        interval_s: float = 5.0,
        probe: Callable[[Mapping[str, str], str], dict[str, Any]] = server_status,
    ) -> None:
        self.env, self.slot, self.view, self.interval_s, self.probe = (
            dict(env),
            slot,
            view,
            interval_s,
            probe,
        )
        self.clock = LagClock()
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {"checked_at": None}
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Called by the receiver's loop on every turn (liveness)."""
        self._beat = time.monotonic()

    def refresh(self) -> dict[str, Any]:
        """One server question; the figures it gives (also kept for ``snapshot``)."""
        from strongroom.errors import StrongroomError
        from strongroom.redact import scrub

        now = time.time()
        view = self.view()
        status: dict[str, Any] = {"checked_at": now, "slot": self.slot, "server_error": ""}
        try:
            answer = self.probe(self.env, self.slot)
        except StrongroomError as exc:
            answer = {}
            status["server_error"] = scrub(str(exc))
        server_lsn = answer.get("server_lsn")
        slot = answer.get("slot") or {}
        stream = answer.get("stream") or {}
        if server_lsn is not None:
            self.clock.observe(now, int(server_lsn))
        flush = stream.get("flush_lsn")
        restart = slot.get("restart_lsn")
        status.update(
            server_lsn=server_lsn,
            slot_exists=bool(slot),
            slot_active=bool(slot.get("active")),
            slot_wal_status=slot.get("wal_status"),
            slot_retained_bytes=behind(server_lsn, restart),
            slot_safe_wal_size=slot.get("safe_wal_size"),
            sync_state=stream.get("sync_state"),
            flush_lsn=flush,
            flush_lag_bytes=behind(server_lsn, flush),
            flush_lag_seconds=(stream.get("flush_lag_s") or 0.0) if stream else None,
            repository_lsn=view.repository_lsn,
            repository_lag_bytes=behind(server_lsn, view.repository_lsn),
            repository_lag_seconds=(
                self.clock.seconds_behind(now, view.repository_lsn)
                if server_lsn is not None
                else None
            ),
            spool_lsn=view.spool_lsn,
            streaming=view.streaming,
            push_failures=view.push_failures,
            last_push_at=view.last_push_at,
            pushed=view.pushed,
            partials_pushed=view.partials_pushed,
            restarts=view.restarts,
            last_error=view.last_error,
        )
        with self._lock:
            self._status = status
        return status

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            status = dict(self._status)
        status["loop_age_s"] = round(time.monotonic() - self._beat, 3)
        return status

    def live(self) -> tuple[bool, str]:
        """Liveness: the loop turned within ``max(90 s, 6 x interval)`` (a storage outage
        backs the loop off up to 30 s: not ready then, but alive)."""
        age = time.monotonic() - self._beat
        bound = max(90.0, 6 * self.interval_s)
        return (age <= bound, f"loop last turned {age:.1f} s ago (bound {bound:g} s)")

    def ready(self) -> tuple[bool, str]:
        """Readiness: every reason it is not ready, or 'ready'."""
        status = self.snapshot()
        if status.get("checked_at") is None:
            return False, "no status yet"
        reasons = [
            *(["pg_receivewal is not running"] if not status["streaming"] else []),
            *([f"server: {status['server_error']}"] if status["server_error"] else []),
            *(
                [f"slot {self.slot!r} is not active"]
                if not status["server_error"] and not status["slot_active"]
                else []
            ),
            *(
                [f"repository: {status['push_failures']} failed push(es) in a row"]
                if status["push_failures"]
                else []
            ),
        ]
        return (not reasons, "; ".join(reasons) or "ready")

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # a probe failure never kills the thread
                    self.refresh()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="wal-receive-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def behind(server: Any, position: Any) -> int | None:
    """Bytes from ``position`` up to ``server`` (None when either is unknown)."""
    if server is None or position is None:
        return None
    return max(0, int(server) - int(position))


# name, help, key in the status
GAUGES = (
    ("streaming", "1 while pg_receivewal runs", "streaming"),
    ("slot_active", "1 while the slot has a connected receiver", "slot_active"),
    ("server_lsn_bytes", "the server's WAL position (bytes)", "server_lsn"),
    ("flush_lag_bytes", "WAL the server wrote that the receiver has not flushed",
     "flush_lag_bytes"),
    ("repository_lag_bytes", "WAL the server wrote that is not in the repository",
     "repository_lag_bytes"),
    ("repository_lag_seconds", "seconds since the server wrote WAL the repository lacks (RPO now)",
     "repository_lag_seconds"),
    ("slot_retained_bytes", "WAL the server keeps for the slot", "slot_retained_bytes"),
    ("push_failures", "failed repository pushes in a row", "push_failures"),
    ("last_push_timestamp_seconds", "when a segment or partial was last stored", "last_push_at"),
    ("segments_pushed", "segments and history files stored since the start", "pushed"),
    ("partials_pushed", "partial segment pushes since the start", "partials_pushed"),
    ("restarts", "pg_receivewal restarts since the start", "restarts"),
)  # fmt: skip


def prometheus_text(status: Mapping[str, Any], target: str) -> bytes:
    """The status as Prometheus text (``strongroom_wal_receive_*{target, slot}``)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    class _Collector:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            for name, doc, key in GAUGES:
                value = status.get(key)
                if value is None:
                    continue
                family = GaugeMetricFamily(
                    f"strongroom_wal_receive_{name}", doc, labels=["target", "slot"]
                )
                family.add_metric([target, str(status.get("slot", ""))], float(value))
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return bytes(generate_latest(registry))


def serve(monitor: Monitor, target: str, host: str, port: int) -> ThreadingHTTPServer:
    """Start the HTTP endpoints in a daemon thread; ``server.shutdown()`` stops them."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, prometheus_text(monitor.snapshot(), target), "text/plain")
            elif path == "/status":
                body = json.dumps({"target": target, **monitor.snapshot()}).encode()
                self._send(200, body, "application/json")
            elif path in ("/healthz", "/readyz"):
                ok, why = monitor.live() if path == "/healthz" else monitor.ready()
                self._send(200 if ok else 503, f"{why}\n".encode(), "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # probes every few seconds: not worth a log line each

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="wal-receive-http", daemon=True).start()
    return server


@dataclass(frozen=True)
class Bounds:
    """When the ``wal-receive-health`` flow alerts (docs/pitr.md, "Running the receiver")."""

    max_lag_s: float = 60.0
    max_lag_bytes: int = 64 * 1024 * 1024
    max_slot_retained_bytes: int = 8 * 1024**3


def findings(
    server: Mapping[str, Any], receiver: Mapping[str, Any] | None, bounds: Bounds
) -> list[tuple[str, str]]:
    """(kind, message) for every bound a receiver passes: ``down`` (slot missing, lost or
    without a receiver; the receiver's endpoint not answering or not ready), ``lagging``
    (the repository trails by more than the bounds) and ``slot-retention``. ``server``
    is the STATUS_SQL answer; ``receiver`` its ``/status`` (None: not published,
    {"error": ...}: not answering)."""
    found: list[tuple[str, str]] = []
    slot, lsn = server.get("slot"), server.get("server_lsn")
    if not slot:
        found.append(("down", "the replication slot does not exist"))
    else:
        if slot.get("wal_status") == "lost":
            found.append(("down", "the slot lost WAL it needed (wal_status lost): re-base"))
        if not slot.get("active"):
            found.append(("down", "no receiver is streaming from the slot"))
        retained = behind(lsn, slot.get("restart_lsn"))
        if retained is not None and retained > bounds.max_slot_retained_bytes:
            found.append(
                (
                    "slot-retention",
                    f"the slot retains {retained / 2**20:.1f} MiB of WAL "
                    f"(bound {bounds.max_slot_retained_bytes / 2**20:.0f} MiB)",
                )
            )
    if receiver is not None and receiver.get("error"):
        found.append(("down", f"the receiver's /status: {receiver['error']}"))
    elif receiver is not None:
        if not receiver.get("streaming"):
            found.append(("down", "the receiver's pg_receivewal is not running"))
        if receiver.get("push_failures"):
            found.append(("down", f"{receiver['push_failures']} failed push(es) in a row"))
        lag_s = receiver.get("repository_lag_seconds")
        lag_b = receiver.get("repository_lag_bytes")
        if (lag_s is not None and lag_s > bounds.max_lag_s) or (
            lag_b is not None and lag_b > bounds.max_lag_bytes
        ):
            found.append(
                (
                    "lagging",
                    f"the repository trails the server by {lag_s or 0:.0f} s / "
                    f"{(lag_b or 0) / 2**20:.1f} MiB (bounds {bounds.max_lag_s:g} s / "
                    f"{bounds.max_lag_bytes / 2**20:.0f} MiB)",
                )
            )
    return found
