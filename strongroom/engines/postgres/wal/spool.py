"""The spool plumbing ``wal-push`` and ``wal-fetch`` share.

Both commands hand their work to a detached worker (the pusher, the fetcher) and
talk to it only through files in a spool folder next to ``pg_wal``: markers
written atomically and consumed once, the worker's lock (held while it runs) and
its log. How those files are written and read, how a worker is started and how a
command waits for its answer was the same code in both modules; it lives here
once, so the archive and restore sides cannot drift apart on it.

Standard library only at load time: PostgreSQL runs these commands once per WAL
file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

WAIT_TIMEOUT_S = 3600.0
LOG_LIMIT = 1024 * 1024

Answer = TypeVar("Answer")
Result = TypeVar("Result")


@dataclass(frozen=True)
class WorkerSpool:
    """One worker's folder in the spool (``<spool>/push/`` or ``<spool>/fetch/``)."""

    root: Path
    pg_wal: Path

    worker: ClassVar[str]  # "pusher" or "fetcher": names the lock and the log

    @property
    def err(self) -> Path:
        """Error markers: a JSON record per WAL file the worker failed on."""
        return self.root / "err"

    @property
    def want(self) -> Path:
        """What a waiting command asked for: for the fetcher a file holding the name a
        restore_command waits for; for the pusher a folder with an empty file per name an
        archive_command waits for (pushed first, .ready or not)."""
        return self.root / "want"

    @property
    def lock(self) -> Path:
        """Locked (flock) by the running worker for as long as it runs."""
        return self.root / f"{self.worker}.lock"

    @property
    def log(self) -> Path:
        """The detached worker's stdout and stderr."""
        return self.root / f"{self.worker}.log"

    @property
    def folders(self) -> tuple[Path, ...]:
        """The marker folders ``ensure`` creates."""
        return (self.err,)

    def ensure(self) -> None:
        for path in self.folders:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_marker(path: Path, record: Mapping[str, object]) -> None:
    """Leave a JSON marker (an error, a miss) for the command waiting on a file."""
    write_atomic(path, json.dumps(record).encode())


def take_marker(path: Path) -> dict[str, Any] | None:
    """Consume the JSON marker at ``path``: its record, None when there is none (yet)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    return dict(record)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking flock on ``path``; yields False if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def lock_held(path: Path) -> bool:
    """True while some process holds the lock on ``path`` (a worker is running)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def run_worker(
    spool: WorkerSpool,
    work: Callable[[], None],
    failed: Callable[[Exception, str], int],
    *,
    cleanup: Callable[[], None] | None = None,
) -> int:
    """The body of a detached worker process: ``work`` under the spool's lock (0 at once
    when another worker holds it), then ``cleanup``. When ``work`` fails (the repository
    cannot be opened, the key read) the scrubbed message goes to the log and ``failed``
    tells the waiting commands and gives the exit code."""
    spool.ensure()
    with exclusive(spool.lock) as mine:
        if not mine:
            return 0  # another worker is running
        try:
            work()
        except Exception as exc:
            from strongroom.redact import scrub

            message = scrub(f"{type(exc).__name__}: {exc}")
            sys.stderr.write(f"strongroom {spool.worker}: {message}\n")
            return failed(exc, message)
        finally:
            if cleanup is not None:
                cleanup()
    return 0


def drop_finished(busy: dict[Future[Result], str], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the first of a worker's ``busy`` jobs (future ->
    WAL file name) to finish, and drop those that did."""
    done, _ = wait(list(busy), timeout=timeout, return_when=FIRST_COMPLETED)
    for future in done:
        busy.pop(future)


def spawn_worker(spool: WorkerSpool, config_path: str, command: str) -> subprocess.Popen[bytes]:
    """Start ``strongroom-wal <command>`` (the worker) detached, logging to the spool."""
    if spool.log.exists() and spool.log.stat().st_size > LOG_LIMIT:
        spool.log.unlink()
    log = os.open(spool.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            [
                sys.executable,
                *(["-S"] if sys.flags.no_site else []),
                "-m",
                "strongroom.cli.wal",
                command,
                "--config",
                config_path,
                "--pg-wal",
                str(spool.pg_wal),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # PostgreSQL (archiver, startup process) must not wait
        )
    finally:
        os.close(log)


def await_worker(
    spool: WorkerSpool,
    answer: Callable[[], Answer | None],
    spawn: Callable[[], subprocess.Popen[bytes]],
    *,
    spawns_allowed: int = 2,
) -> Answer | None:
    """Poll ``answer`` until it gives one, starting the worker with ``spawn`` (at most
    ``spawns_allowed`` times) whenever none is running. None when no answer came: the
    deadline passed (the lock is still held) or the worker does not stay up."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    spawned: subprocess.Popen[bytes] | None = None
    spawns = 0
    delay = 0.002
    while time.monotonic() < deadline:
        found = answer()
        if found is not None:
            return found
        alive = (spawned is not None and spawned.poll() is None) or lock_held(spool.lock)
        if not alive:
            if spawns >= spawns_allowed:
                break
            spawned = spawn()
            spawns += 1
        time.sleep(delay)
        delay = min(delay * 1.5, 0.02)
    return None
