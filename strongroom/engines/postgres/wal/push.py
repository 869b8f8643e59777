"""``wal-push``: PostgreSQL's archive_command, with parallel push-ahead.

PostgreSQL calls ``archive_command`` once per WAL file, one at a time, and
waits. Doing the upload inside that call (one interpreter start, one TLS
handshake, one serial upload per 16 MiB) is what makes archiving lag on slow
object storage. So:

* A **pusher** (``run_pusher``) uploads every file that has a ``.ready`` marker
  in ``pg_wal/archive_status``, oldest first and ``parallel`` at a time, and for
  each file it stored durably makes an ``ok`` marker in the spool
  (``pg_wal/strongroom/push/ok-<repository id>/<name>``): a hard link to the
  very file it read, so ``[ MARKER -ef %p ]`` in the shell can answer PostgreSQL
  (a text record of size, mtime, inode and repository where links are
  impossible). The folder is per repository and target: a copy of the data
  directory that archives somewhere else never inherits "stored" answers. A
  failure writes an ``err`` marker with the message.
* ``wal_push`` (the archive_command) returns 0 at once when a valid ``ok``
  marker exists for its file. Otherwise it starts the pusher (``async``
  mode: a detached process that lingers briefly for the next files; ``sync``
  mode: in-process, for this file plus the next ready ones) and waits for the
  file's marker. It returns 0 only for a marker written after the storage
  confirmed the object, so "0" always means "durably archived".

This module imports only the standard library at load time; the storage and
crypto stack is imported by the pusher.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal import spool as spooling
from strongroom.engines.postgres.wal.config import WalConfig
from strongroom.engines.postgres.wal.fast import (
    file_identity,
    format_marker,
    marker_matches,
    ok_dir,
    push_dir,
)
from strongroom.engines.postgres.wal.spool import lock_held  # the tests import it from here

if TYPE_CHECKING:
    from strongroom.repository.base import Repository

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class PushSpool(spooling.WorkerSpool):
    """``<spool>/push/``: markers, the pusher's lock and log."""

    repo_id: str

    worker = "pusher"

    @classmethod
    def for_config(cls, cfg: WalConfig, pg_wal: Path) -> PushSpool:
        return cls(Path(push_dir(cfg, str(pg_wal))), pg_wal, cfg.repo_identity())

    @property
    def ok(self) -> Path:
        """Markers of files stored in *this* repository and target (a copied data
        directory archiving elsewhere, or a changed configuration, starts empty)."""
        return Path(ok_dir(str(self.root), self.repo_id))

    @property
    def folders(self) -> tuple[Path, ...]:
        return (self.ok, self.err, self.want)

    @property
    def status(self) -> Path:
        return self.pg_wal / "archive_status"


def marker_valid(spool: PushSpool, cfg: WalConfig, name: str) -> bool:
    """True when ``name`` was stored durably into this repository, as this very file."""
    return marker_matches(str(spool.ok / name), str(spool.pg_wal / name), cfg.repo_identity())


def take_error(spool: PushSpool, name: str) -> tuple[int, str] | None:
    """Consume the pusher's error marker for ``name``: (exit code, message)."""
    record = spooling.take_marker(spool.err / name)
    if record is None:
        return None
    return int(record.get("exit_code", EXIT_FAILED)), str(record.get("error", "push failed"))


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def ready_names(spool: PushSpool) -> list[str]:
    """Files to archive: those a waiting archive_command asked for, then the ones
    PostgreSQL marked ``.ready`` (history files first, then oldest first)."""
    wanted = sorted(n for n in _listdir(spool.want) if not n.startswith("."))
    found = []
    for entry in _listdir(spool.status):
        if not entry.endswith(".ready"):
            continue
        name = entry[: -len(".ready")]
        if name in wanted:
            continue
        try:
            names.kind(name)
        except names.WalNameError:
            continue
        found.append(name)
    return wanted + sorted(found, key=lambda n: (not n.endswith(".history"), n))


# ----------------------------------------------------------------- the pusher


class Pusher:
    """Uploads ready WAL files in parallel and leaves a marker for each outcome."""

    def __init__(self, cfg: WalConfig, spool: PushSpool, repo: Repository | None = None) -> None:
        from strongroom.redact import register

        self.cfg = cfg
        self.spool = spool
        repo_config = cfg.repository_config()
        register(*repo_config.secrets())
        if repo is None:
            from strongroom.repository import open_repository

            repo = open_repository(repo_config)
        self.repo = repo
        self.level = cfg.push_level  # WAL has its own level: lag matters more than ratio
        self._buffers = threading.local()
        from strongroom.pipeline import parse_recipients

        parse_recipients(cfg.recipients)  # fail early on a bad key
        self.pushed = 0
        self.finished: set[str] = set()  # stored (by this or an earlier run)
        self.checked: set[str] = set()  # names whose marker was read once already
        self.bytes_in = 0
        self.bytes_out = 0

    def push_one(self, name: str) -> dict[str, Any]:
        try:
            outcome = self._push_one(name)
            if outcome["exit_code"] == EXIT_OK:
                self.finished.add(name)
            return outcome
        finally:
            with contextlib.suppress(OSError):
                (self.spool.want / name).unlink()

    def _push_one(self, name: str) -> dict[str, Any]:
        from strongroom.engines.postgres.wal.store import push_bytes
        from strongroom.errors import StrongroomError
        from strongroom.redact import scrub

        path = self.spool.pg_wal / name
        try:
            before = file_identity(str(path))
            raw = self._read(path, before[0])
            if file_identity(str(path)) != before:
                raise StrongroomError(f"{name} changed while it was read")
            result = push_bytes(
                self.repo,
                self.cfg.target,
                name,
                raw,
                self.cfg.recipients,
                level=self.level,
                segment_size=self.cfg.segment_size,
                system_identifier=self.cfg.system_identifier,
            )
        except FileNotFoundError:
            outcome = {"exit_code": 3, "error": f"{path} does not exist"}
            spooling.write_marker(self.spool.err / name, outcome)
            return outcome
        except StrongroomError as exc:
            outcome = {"exit_code": exc.exit_code, "error": scrub(str(exc))}
            spooling.write_marker(self.spool.err / name, outcome)
            return outcome
        except Exception as exc:
            outcome = {"exit_code": EXIT_FAILED, "error": scrub(f"{type(exc).__name__}: {exc}")}
            spooling.write_marker(self.spool.err / name, outcome)
            return outcome
        self._mark_ok(path, name, format_marker(before, self.cfg.repo_identity(), result.sha256))
        self.pushed += 1
        self.bytes_in += result.raw_size
        self.bytes_out += result.stored_size
        return {
            "exit_code": EXIT_OK,
            "name": name,
            "sha256": result.sha256,
            "stored_size": result.stored_size,
            "already_archived": result.already_archived,
        }

    def _read(self, path: Path, size: int) -> memoryview:
        """The file's bytes in this thread's reusable buffer: a fresh 16 MiB object per
        segment would cost thousands of page faults each time."""
        buf: bytearray | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, self.cfg.segment_size))
            self._buffers.buf = buf
        view = memoryview(buf)[:size]
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != size or f.read(1):
                from strongroom.errors import StrongroomError

                raise StrongroomError(f"{path.name} changed size while it was read")
        return view

    def _todo(self, busy: set[str], room: int) -> list[str]:
        """Up to ``room`` files to push next. Runs after every completed upload, so it
        stays cheap: a name's marker is read once per run, and the scan stops early."""
        found: list[str] = []
        wanted = set(_listdir(self.spool.want))
        for n in ready_names(self.spool):
            if len(found) >= room:
                break
            if n in busy or (self.spool.err / n).exists():
                continue
            if n in wanted and not marker_valid(self.spool, self.cfg, n):
                found.append(n)  # an archive_command is waiting for it: always look again
                continue
            if n in self.finished:
                continue
            if n not in self.checked:
                self.checked.add(n)
                if marker_valid(self.spool, self.cfg, n):  # pushed by an earlier run
                    self.finished.add(n)
                    continue
            found.append(n)
        return found

    def _mark_ok(self, path: Path, name: str, record: str) -> None:
        """Record "stored": a hard link to the very file (checkable by the shell), or a
        text record where the spool cannot hold links to pg_wal."""
        final = self.spool.ok / name
        tmp = self.spool.ok / f".{name}.{os.getpid()}.{threading.get_ident()}.link"
        try:
            os.link(path, tmp)
            os.replace(tmp, final)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            spooling.write_atomic(final, record.encode())

    def clean_markers(self) -> None:
        """Drop markers of files PostgreSQL has marked done (or removed), and those
        left for another repository (their links would pin old files)."""
        for other in self.spool.root.glob("ok-*"):
            if other != self.spool.ok:
                shutil.rmtree(other, ignore_errors=True)
        for folder in (self.spool.ok, self.spool.err):
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(folder):
                    if name.startswith("."):  # a link or record a killed pusher left
                        with contextlib.suppress(OSError):
                            if time.time() - (folder / name).lstat().st_mtime > 60:
                                (folder / name).unlink()
                        continue
                    if (
                        not (self.spool.status / f"{name}.ready").exists()
                        and not (self.spool.want / name).exists()
                    ):
                        with contextlib.suppress(FileNotFoundError):
                            (folder / name).unlink()

    def run(self, *, linger_s: float, limit: int | None = None) -> None:
        """Push ready files until none is left for ``linger_s`` seconds (or ``limit``
        files were started)."""
        self.clean_markers()
        cleaned = time.monotonic()
        started = 0
        busy: dict[Future[dict[str, Any]], str] = {}
        idle_since = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.cfg.push_parallel) as pool:
            while True:
                if time.monotonic() - cleaned > 5.0:  # markers pin acknowledged files
                    self.clean_markers()
                    cleaned = time.monotonic()
                room = self.cfg.push_parallel - len(busy)
                if room > 0 and (limit is None or started < limit):
                    if limit is not None:
                        room = min(room, limit - started)
                    for name in self._todo(set(busy.values()), room):
                        busy[pool.submit(self.push_one, name)] = name
                        started += 1
                if busy:
                    spooling.drop_finished(busy, timeout=0.05)
                    idle_since = time.monotonic()
                    continue
                if (limit is not None and started >= limit) or (
                    time.monotonic() - idle_since >= linger_s
                ):
                    self.clean_markers()  # do not leave links pinning acknowledged files
                    return
                time.sleep(0.02)


def run_pusher(cfg: WalConfig, pg_wal: Path) -> int:
    """The detached pusher process (``strongroom-wal push-worker``)."""
    spool = PushSpool.for_config(cfg, pg_wal)

    def work() -> None:
        Pusher(cfg, spool).run(linger_s=cfg.push_linger_s)

    def failed(exc: Exception, message: str) -> int:
        """The pusher cannot even open the repository: tell the waiters."""
        from strongroom.errors import StrongroomError

        code = exc.exit_code if isinstance(exc, StrongroomError) else EXIT_FAILED
        for name in ready_names(spool):
            if not marker_valid(spool, cfg, name):
                spooling.write_marker(spool.err / name, {"exit_code": code, "error": message})
        return code

    return spooling.run_worker(spool, work, failed)


def _spawn_pusher(cfg: WalConfig, spool: PushSpool) -> subprocess.Popen[bytes]:
    return spooling.spawn_worker(spool, cfg.path, "push-worker")


def wal_push(cfg: WalConfig, wal_path: str, *, mode: str | None = None) -> tuple[int, str]:
    """Archive ``wal_path`` (PostgreSQL's %p); returns (exit code, message)."""
    path = Path(wal_path).absolute()
    name = path.name
    try:
        names.kind(name)
    except names.WalNameError as exc:
        return 2, str(exc)
    if not path.is_file():
        return 3, f"{path} does not exist"
    spool = PushSpool.for_config(cfg, path.parent)
    if marker_valid(spool, cfg, name):
        return EXIT_OK, ""
    spool.ensure()
    error = take_error(spool, name)
    if error is not None:
        return error
    (spool.want / name).touch()
    if (mode or cfg.push_mode) == "sync":
        return _push_sync(cfg, spool, name)
    return _push_async(cfg, spool, name)


def _outcome(spool: PushSpool, cfg: WalConfig, name: str) -> tuple[int, str] | None:
    if marker_valid(spool, cfg, name):
        return EXIT_OK, ""
    return take_error(spool, name)


def _push_sync(cfg: WalConfig, spool: PushSpool, name: str) -> tuple[int, str]:
    with spooling.exclusive(spool.lock) as mine:
        if mine:
            pusher = Pusher(cfg, spool)
            # this file first, plus the next ready ones (bounded) while we are here
            pusher.run(linger_s=0.0, limit=max(cfg.push_parallel * 4, 1))
            if not marker_valid(spool, cfg, name) and not (spool.err / name).exists():
                pusher.push_one(name)
    found = _outcome(spool, cfg, name)
    if found is not None:
        return found
    return _push_async(cfg, spool, name, fallback=False)  # another pusher holds the lock


def _push_async(
    cfg: WalConfig, spool: PushSpool, name: str, *, fallback: bool = True
) -> tuple[int, str]:
    found = spooling.await_worker(
        spool,
        lambda: _outcome(spool, cfg, name),
        lambda: _spawn_pusher(cfg, spool),
        spawns_allowed=2 if fallback else 0,
    )
    if found is not None:
        return found
    if lock_held(spool.lock):
        return EXIT_FAILED, f"timed out waiting for the pusher to archive {name}"
    # the pusher keeps failing to start: push this file ourselves
    return _push_sync(cfg, spool, name)
