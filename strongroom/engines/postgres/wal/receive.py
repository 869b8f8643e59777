"""``wal-receive``: stream WAL with ``pg_receivewal`` on a slot, push completed segments.

``pg_receivewal`` writes into a local spool directory: the segment being received
is ``<name>.partial`` and is renamed to ``<name>`` once complete. The receiver
supervises it (restarting it when it exits) and pushes every completed segment
(and timeline history file) into the repository with ``store.push_bytes``: the
same key, stored form and duplicate rules as ``wal-push``. A segment that
``archive_command`` already stored is accepted when identical; a different one is
refused (``Conflict``, exit code 9) and the receiver stops rather than run beside
an archive it disagrees with. Nothing is ever overwritten. An unreachable or full
repository is retried with backoff (the slot keeps the WAL meanwhile).

Restart safety: the physical replication slot keeps WAL the receiver has not
flushed; a pushed segment gets a marker in ``<spool>/.pushed/`` and is removed from
the spool (the newest pushed segment stays, so ``pg_receivewal`` resumes after it);
a segment left without a marker by a killed receiver is pushed again (identical:
accepted); a ``.partial`` is resumed by ``pg_receivewal`` itself.

Partials: the segment being received is pushed as ``<segment>.partial`` (see
``store.push_partial``) every ``partial_interval_s`` seconds and when the receiver stops, so
a recovery after the primary is lost reaches the receiver's last byte.

With ``synchronous`` the stream runs ``pg_receivewal --synchronous`` (flush and
report after every write) under the application name ``APPLICATION_NAME``, so
``synchronous_standby_names = 'strongroom_wal_receive'`` makes commits wait for
the receiver's disk.

The connection comes from libpq's environment (PGHOST, PGPORT, PGUSER,
PGPASSWORD ...): no password on a command line. Standard library at load time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.config import WalConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from strongroom.engines.postgres.wal.receive_status import Monitor, ReceiverView
    from strongroom.repository.base import Repository

APPLICATION_NAME = "strongroom_wal_receive"
DEFAULT_SLOT = "strongroom_wal_receive"
PUSHED = ".pushed"


def pg_receivewal() -> str:
    from strongroom.engines.postgres.pg_bin import pg_tool

    return pg_tool("pg_receivewal")


def completed_names(spool: Path) -> list[str]:
    """Completed WAL files in the spool (segments and history files), history first,
    then oldest first. ``.partial`` files are still being written."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(spool):
            try:
                what = names.kind(entry)
            except names.WalNameError:
                continue
            if what in ("segment", "history"):
                found.append(entry)
    return sorted(found, key=lambda n: (not n.endswith(".history"), n))


@dataclass
class ReceiveStats:
    pushed: int = 0
    already_archived: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    restarts: int = 0
    last_pushed: str = ""
    partials_pushed: int = 0
    last_partial: str = ""
    errors: list[str] = field(default_factory=list)
    push_failures: int = 0  # failed push rounds in a row (storage down or full)
    last_push_at: float | None = None  # time.time() of the last stored segment or partial
    repository_lsn: int = 0  # the WAL position the repository holds up to (this run)

    def as_dict(self) -> dict[str, object]:
        return {
            "pushed": self.pushed,
            "already_archived": self.already_archived,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "restarts": self.restarts,
            "last_pushed": self.last_pushed,
            "partials_pushed": self.partials_pushed,
            "last_partial": self.last_partial,
            "errors": list(self.errors),
        }


class Receiver:
    """Runs ``pg_receivewal`` into ``spool`` and pushes what it completes."""

    def __init__(
        self,
        cfg: WalConfig,
        spool: Path,
        *,
        slot: str = DEFAULT_SLOT,
        synchronous: bool = False,
        env: Mapping[str, str] | None = None,
        repo: Repository | None = None,
        status_interval_s: int = 10,
        partial_interval_s: float = 0.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        from strongroom.pipeline import parse_recipients
        from strongroom.redact import register

        self.cfg = cfg
        self.spool = Path(spool)
        self.slot = slot
        self.synchronous = synchronous
        self.env = dict(os.environ if env is None else env)
        self.env["PGAPPNAME"] = APPLICATION_NAME
        self.status_interval_s = status_interval_s
        self.partial_interval_s = partial_interval_s
        repo_config = cfg.repository_config()
        register(*repo_config.secrets())
        if self.env.get("PGPASSWORD"):
            register(self.env["PGPASSWORD"])
        if repo is None:
            from strongroom.repository import open_repository

            repo = open_repository(repo_config)
        self.repo = repo
        parse_recipients(cfg.recipients)  # fail early on a bad key
        self.stats = ReceiveStats()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = log or (lambda text: sys.stderr.write(f"strongroom wal-receive: {text}\n"))
        self._started_at = 0.0

    # ------------------------------------------------------------------ pg_receivewal
    @property
    def pushed_dir(self) -> Path:
        return self.spool / PUSHED

    @property
    def stream_log(self) -> Path:
        return self.spool / "pg_receivewal.log"

    def _base_args(self) -> list[str]:
        return [pg_receivewal(), "--slot", self.slot, "--no-password"]

    def create_slot(self) -> None:
        """Create the physical slot, or adopt it when it exists."""
        from strongroom.errors import ToolFailed

        args = [*self._base_args(), "--create-slot", "--if-not-exists"]
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            from strongroom.redact import scrub

            raise ToolFailed(f"pg_receivewal --create-slot failed: {scrub(done.stderr.strip())}")

    def stream_command(self) -> list[str]:
        args = [
            *self._base_args(),
            "--directory",
            str(self.spool),
            "--no-loop",
            f"--status-interval={self.status_interval_s}",
            "--verbose",
        ]
        if self.synchronous:
            args.append("--synchronous")
        return args

    def start_stream(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        self.pushed_dir.mkdir(exist_ok=True)
        import shutil

        # pg_receivewal dies with the receiver (even on SIGKILL): an orphan would hold
        # the slot and the restarted receiver could not stream
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig=INT"] if setpriv else []
        with open(self.stream_log, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, *self.stream_command()],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._started_at = time.monotonic()

    def stop_stream(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # pg_receivewal flushes and exits on SIGINT
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _supervise(self) -> None:
        """Restart ``pg_receivewal`` when it exited (server restart, network)."""
        if self.proc is None:
            self.start_stream()
            return
        code = self.proc.poll()
        if code is None:
            return
        ran = time.monotonic() - self._started_at
        self._log(f"pg_receivewal exited with {code} after {ran:.1f} s; see {self.stream_log}")
        self.stats.restarts += 1
        if ran < 5.0:
            time.sleep(1.0)  # a failing server: do not spin
        self.start_stream()

    # ---------------------------------------------------------------------- pushing
    def is_pushed(self, name: str) -> bool:
        return (self.pushed_dir / name).exists()

    def push_one(self, name: str) -> None:
        """Push one completed file; raises Conflict when the archive differs."""
        from strongroom.engines.postgres.wal.store import push_bytes

        path = self.spool / name
        raw = path.read_bytes()
        result = push_bytes(
            self.repo,
            self.cfg.target,
            name,
            raw,
            self.cfg.recipients,
            level=self.cfg.push_level,
            segment_size=self.cfg.segment_size,
            system_identifier=self.cfg.system_identifier,
        )
        marker = self.pushed_dir / name
        tmp = self.pushed_dir / f".{name}.tmp"
        tmp.write_text(result.sha256 + "\n")
        os.replace(tmp, marker)
        self.stats.bytes_in += result.raw_size
        self.stats.bytes_out += result.stored_size
        if result.already_archived:
            self.stats.already_archived += 1
        else:
            self.stats.pushed += 1
        self.stats.last_push_at = time.time()
        if names.is_segment(name):
            self.stats.last_pushed = name
            end = (names.segno_of(name, self.cfg.segment_size) + 1) * self.cfg.segment_size
            self.stats.repository_lsn = max(self.stats.repository_lsn, end)

    def push_completed(self) -> list[str]:
        """Push every completed file not pushed yet; returns their names. A failure
        (Conflict: the archive holds a different file under a name) is recorded in
        ``stats.errors`` and raised."""
        from strongroom.errors import StrongroomError

        done = []
        for name in completed_names(self.spool):
            if self.is_pushed(name):
                continue
            try:
                self.push_one(name)
            except StrongroomError as exc:
                from strongroom.redact import scrub

                self.stats.errors.append(scrub(str(exc)))
                raise
            done.append(name)
        self.prune()
        return done

    def current_partial(self) -> str | None:
        """The newest ``.partial`` pg_receivewal is writing in the spool, if any."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(self.spool):
                with contextlib.suppress(names.WalNameError):
                    if names.kind(entry) == "partial":
                        found.append(entry)
        return max(found) if found else None

    def push_partial(self) -> str | None:
        """Push the spool's ``.partial`` into the repository (``store.push_partial``:
        replaces the archived partial only when it extends it, never a completed
        segment); returns the outcome, None when there is no partial."""
        from strongroom.engines.postgres.wal.store import push_partial

        name = self.current_partial()
        if name is None:
            return None
        try:
            raw = (self.spool / name).read_bytes()
        except FileNotFoundError:  # completed (renamed) meanwhile: pushed as a segment
            return None
        result = push_partial(
            self.repo,
            self.cfg.target,
            names.segment_of_partial(name),
            raw,
            self.cfg.recipients,
            level=self.cfg.push_level,
            segment_size=self.cfg.segment_size,
            system_identifier=self.cfg.system_identifier,
        )
        if result.outcome in ("stored", "replaced"):
            self.stats.partials_pushed += 1
            self.stats.last_partial = f"{name}:{result.raw_size}"
            self.stats.last_push_at = time.time()
        start = names.segno_of(name, self.cfg.segment_size) * self.cfg.segment_size
        if result.outcome in ("stored", "replaced", "unchanged", "kept_longer"):
            self.stats.repository_lsn = max(self.stats.repository_lsn, start + result.raw_size)
        elif result.outcome == "superseded":  # the completed segment is stored
            end = start + self.cfg.segment_size
            self.stats.repository_lsn = max(self.stats.repository_lsn, end)
        return result.outcome

    def view(self) -> ReceiverView:
        """What the monitor (receive_status.Monitor) reports besides the server's facts."""
        from strongroom.engines.postgres.wal.receive_status import ReceiverView

        proc = self.proc
        return ReceiverView(
            streaming=proc is not None and proc.poll() is None,
            repository_lsn=self.stats.repository_lsn,
            spool_lsn=flush_lsn(self.spool, self.cfg.segment_size),
            push_failures=self.stats.push_failures,
            last_push_at=self.stats.last_push_at,
            pushed=self.stats.pushed + self.stats.already_archived,
            partials_pushed=self.stats.partials_pushed,
            restarts=self.stats.restarts,
            last_error=self.stats.errors[-1] if self.stats.errors else "",
        )

    def prune(self) -> None:
        """Remove pushed segments from the spool but the newest (``pg_receivewal``
        resumes after the newest segment it finds), and their markers."""
        segments = [n for n in completed_names(self.spool) if names.is_segment(n)]
        pushed = [n for n in segments if self.is_pushed(n)]
        for name in pushed[:-1]:
            with contextlib.suppress(FileNotFoundError):
                (self.spool / name).unlink()
        present = set(os.listdir(self.spool))
        for marker in os.listdir(self.pushed_dir):
            if marker not in present and not marker.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    (self.pushed_dir / marker).unlink()

    # ------------------------------------------------------------------------- loop
    def run(
        self,
        *,
        poll_s: float = 0.2,
        until: Callable[[], bool] | None = None,
        monitor: Monitor | None = None,
    ) -> int:
        """Receive and push until ``until()`` is true or a signal stops it; returns
        the exit code (0, or 9 when the archive holds a different segment). A
        ``monitor`` (receive_status.Monitor) is told of every turn of the loop."""
        from strongroom.errors import Conflict, IntegrityError, InvalidInput, StrongroomError

        stop = {"now": False}
        failures = 0

        def on_signal(signum: int, _frame: object) -> None:
            stop["now"] = True

        handlers = {}
        if until is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, on_signal)
        self.create_slot()
        code = 0
        partial_at = time.monotonic()
        try:
            while not stop["now"] and not (until is not None and until()):
                if monitor is not None:
                    monitor.beat()
                self._supervise()
                try:
                    self.push_completed()
                    if (
                        self.partial_interval_s > 0
                        and time.monotonic() - partial_at >= self.partial_interval_s
                    ):
                        partial_at = time.monotonic()
                        self.push_partial()
                    failures = self.stats.push_failures = 0
                except (Conflict, InvalidInput, IntegrityError) as exc:
                    self._log(str(exc))  # the archive disagrees: stop, never overwrite
                    code = exc.exit_code
                    break
                except StrongroomError as exc:  # storage down or full: retry, slot keeps WAL
                    failures += 1
                    self.stats.push_failures = failures
                    self._log(f"{exc} (retrying)")
                    del self.stats.errors[:-20]
                    time.sleep(min(30.0, poll_s * 2**failures))
                time.sleep(poll_s)
        finally:
            self.stop_stream()
            for sig, old in handlers.items():
                signal.signal(sig, old)
        if code == 0:
            try:
                self.push_completed()  # what pg_receivewal completed while stopping
                self.push_partial()  # and the newest partial: recovery reaches its end
            except StrongroomError as exc:
                self._log(str(exc))
                code = exc.exit_code
        return code


def flush_lsn(spool: Path, segment_size: int) -> int:
    """The WAL position the spool holds up to (end of the newest completed segment, or
    the start of the newest ``.partial``): for status and tests."""
    best = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(spool):
            try:
                what = names.kind(entry)
            except names.WalNameError:
                continue
            if what == "segment":
                best = max(best, (names.segno_of(entry, segment_size) + 1) * segment_size)
            elif what == "partial":
                best = max(best, names.segno_of(entry, segment_size) * segment_size)
    return best
