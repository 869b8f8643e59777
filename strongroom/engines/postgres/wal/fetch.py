"""``wal-fetch``: PostgreSQL's restore_command, with parallel prefetch into a local cache.

During recovery PostgreSQL asks for one WAL file at a time and replays it
before asking for the next, so one download per call (process start, TLS,
GET, decrypt) is paid serially. Here:

* A **fetcher** (``run_fetcher``, a detached process) serves the file a waiting
  restore_command asked for (``want``) and keeps the ``prefetch`` segments after
  PostgreSQL's newest position (``want`` or ``took``, the file last taken from
  the cache) downloaded, ``parallel`` at a time. Each object is decrypted,
  decompressed and checked (age authentication of every chunk, zstd frame
  checksum, size recorded at push, WAL page header against the name, segment
  size and system identifier) into a temporary file that is renamed into the
  cache only once every check passed. A file that is not archived gets a
  ``miss`` marker; a corrupt one, a gap or an unreachable repository an ``err``
  marker.
* ``wal_fetch`` (the restore_command) renames a cached file into place (``%p``)
  and returns 0, or waits for the fetcher's verdict on its file. (A PITR restore
  puts a shell ``mv`` of the cached file in front of it: see
  ``pg_pitr_restore.restore_command``.)

Exit codes are what PostgreSQL expects: 0 restored; 1 not in the archive
(PostgreSQL then ends recovery, or a standby keeps polling); ``EXIT_FATAL``
(> 125) when continuing would be wrong: a corrupt file, a missing segment with
later segments archived on the same timeline (a gap), an unreachable
repository, a bad configuration. PostgreSQL aborts recovery on exit codes above
125 instead of treating them as "end of the archive", so a damaged archive can
never silently shorten a recovery. Never is a file handed over unverified.

Standard library only at load time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal import spool as spooling
from strongroom.engines.postgres.wal.config import WalConfig
from strongroom.engines.postgres.wal.fast import fetch_dir

if TYPE_CHECKING:
    from strongroom.repository.base import Repository

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_FATAL = 200
LIST_REFRESH_S = 0.5


@dataclass(frozen=True)
class FetchSpool(spooling.WorkerSpool):
    """``<spool>/fetch/``: the cache, markers, the fetcher's lock and log."""

    worker = "fetcher"

    @classmethod
    def for_config(cls, cfg: WalConfig, pg_wal: Path) -> FetchSpool:
        return cls(Path(fetch_dir(cfg, str(pg_wal))), pg_wal)

    @property
    def seg(self) -> Path:
        return self.root / "cache"

    @property
    def miss(self) -> Path:
        return self.root / "miss"

    @property
    def took(self) -> Path:
        """The file a restore_command took from the cache last."""
        return self.root / "took"

    @property
    def folders(self) -> tuple[Path, ...]:
        return (self.seg, self.miss, self.err)


def _place(source: Path, dest: Path) -> None:
    """Move a verified file to PostgreSQL's %p (rename when on the same file system)."""
    try:
        os.replace(source, dest)
    except OSError:
        tmp = dest.with_name(f".{dest.name}.strongroom-tmp")
        with open(source, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
        source.unlink(missing_ok=True)


# ------------------------------------------------------------------ the fetcher


class Fetcher:
    """Fetches, verifies and caches WAL files ahead of PostgreSQL's requests."""

    def __init__(self, cfg: WalConfig, spool: FetchSpool, repo: Repository | None = None) -> None:
        from strongroom.redact import register

        self.cfg = cfg
        self.spool = spool
        repo_config = cfg.repository_config()
        self.identities = [
            i.get_secret_value() for i in cfg.encryption_config(need_identity=True).identities
        ]
        register(*repo_config.secrets(), *self.identities)
        if repo is None:
            from strongroom.repository import open_repository

            repo = open_repository(repo_config)
        self.repo = repo
        self.listing: set[str] = set()
        self.listed_at = 0.0
        self.fetched = 0
        self.trace = bool(os.environ.get("STRONGROOM_WAL_TRACE"))  # a file: see wal_cli
        if self.trace:
            sys.stderr.write(f"{time.time():.3f} fetcher ready\n")

    def refresh(self) -> None:
        from strongroom.engines.postgres.wal.store import wal_prefix

        prefix = wal_prefix(self.cfg.target)
        self.listing = {info.key.rsplit("/", 1)[-1] for info in self.repo.list(prefix)}
        self.listed_at = time.monotonic()

    def fetch_one(self, name: str, *, look_again: bool = True) -> None:
        """Fetch and verify ``name`` into the cache, or leave a miss/err marker."""
        from strongroom.engines.postgres.wal.store import fetch_to_file
        from strongroom.errors import NotFound, StrongroomError
        from strongroom.redact import scrub

        try:
            fetch_to_file(
                self.repo,
                self.cfg.target,
                name,
                self.identities,
                str(self.spool.seg / name),
                segment_size=self.cfg.segment_size,
                system_identifier=self.cfg.system_identifier,
            )
        except NotFound:
            if look_again:
                self.verdict_missing(name, refreshed=False)
            else:
                self.mark(self.spool.miss, name, "not in the archive")
            return
        except StrongroomError as exc:
            self.mark(self.spool.err, name, scrub(str(exc)))
            return
        except Exception as exc:
            self.mark(self.spool.err, name, scrub(f"{type(exc).__name__}: {exc}"))
            return
        self.fetched += 1
        if self.trace:
            sys.stderr.write(f"{time.time():.3f} cached {name}\n")

    def mark(self, folder: Path, name: str, message: str) -> None:
        spooling.write_marker(folder / name, {"error": message, "at": time.time()})

    def verdict_missing(self, name: str, *, refreshed: bool) -> None:
        """``name`` is not archived: a gap (fatal) or simply not there (yet)."""
        if not refreshed:
            try:
                self.refresh()
            except Exception as exc:
                self.mark(self.spool.err, name, f"listing the archive failed: {exc}")
                return
            if name in self.listing:
                self.fetch_one(name)
                return
        if names.is_segment(name) and names.partial_name(name) in self.listing:
            # served from the receiver's partial (store.fetch_to_file)
            self.fetch_one(name, look_again=False)
            return
        gap = gap_around(name, self.listing, self.cfg.segment_size)
        if gap is not None:
            self.mark(self.spool.err, name, gap)
        else:
            self.mark(self.spool.miss, name, "not in the archive")

    def after(self, anchor: str) -> list[str]:
        """The archived segments after ``anchor`` on its timeline (the prefetch window)."""
        if names.kind(anchor) != "segment":
            return []
        tli = names.timeline_of(anchor)
        segno = names.segno_of(anchor, self.cfg.segment_size)
        found = []
        for step in range(1, self.cfg.fetch_prefetch + 1):
            candidate = names.segment_name(tli, segno + step, self.cfg.segment_size)
            if candidate in self.listing:
                found.append(candidate)
        return found

    def evict(self, keep: set[str]) -> None:
        """Drop cached files PostgreSQL has gone past (outside the window)."""
        for entry in os.listdir(self.spool.seg):
            if entry.startswith(".") or entry in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.spool.seg / entry).unlink()

    def _known(self, name: str) -> bool:
        return any((folder / name).exists() for folder in (self.spool.seg, self.spool.err))

    def run(self, linger_s: float) -> None:
        """Serve requests and keep the window after the newest position filled.

        ``want`` is written by a restore_command that waits for a file (it must be
        served even if it was delivered before: PostgreSQL re-reads the last segment
        at the end of recovery); ``took`` by one that found its file cached. The window
        starts after whichever is newer, so a delivered file is never fetched again
        just because it was the last one taken."""
        self.refresh()
        last_state: tuple[tuple[str, int], tuple[str, int]] | None = None
        last_activity = time.monotonic()
        busy: dict[Future[None], str] = {}
        with ThreadPoolExecutor(max_workers=self.cfg.fetch_parallel) as pool:
            want = took = ("", 0)
            while True:
                if not (self.spool.pg_wal.is_dir() and self.spool.root.is_dir()):
                    return  # the cluster being restored is gone: nobody will ask again
                # a file being rewritten reads as empty for an instant: keep the last value
                want = _read_name(self.spool.want) or want
                took = _read_name(self.spool.took) or took
                pending = want[0] if want[0] and want[1] >= took[1] else ""
                # the window follows segments only: a history file asked for in between
                # must not empty the cache
                positions = [(m, n) for n, m in (want, took) if n and names.is_segment(n)]
                anchor = max(positions)[1] if positions else ""
                state = (want, took)
                if state != last_state:
                    last_state = state
                    last_activity = time.monotonic()
                    window = set(self.after(anchor)) if anchor else set()
                    with contextlib.suppress(OSError):
                        self.evict(window | {pending})
                if (
                    pending
                    and pending not in self.listing
                    and pending not in busy.values()
                    and not self._known(pending)
                    and not (self.spool.miss / pending).exists()
                ):
                    self.verdict_missing(
                        pending, refreshed=time.monotonic() - self.listed_at <= LIST_REFRESH_S
                    )
                targets = ([pending] if pending else []) + (self.after(anchor) if anchor else [])
                for name in targets:
                    if len(busy) >= self.cfg.fetch_parallel:
                        break
                    if name in busy.values() or self._known(name) or name not in self.listing:
                        continue
                    busy[pool.submit(self.fetch_one, name)] = name
                if busy:
                    spooling.drop_finished(busy, timeout=0.02)
                    last_activity = time.monotonic()
                    continue
                if time.monotonic() - last_activity >= linger_s:
                    return
                time.sleep(0.01)


def gap_around(name: str, listing: set[str], segment_size: int) -> str | None:
    """A message when ``name`` is missing while its timeline has archived segments both
    before and after it (a hole in the archive, not its end), else None."""
    if names.kind(name) != "segment":
        return None
    tli = names.timeline_of(name)
    segno = names.segno_of(name, segment_size)
    before = after = None
    for other in listing:
        if not names.is_segment(other) or names.timeline_of(other) != tli:
            continue
        n = names.segno_of(other, segment_size)
        if n < segno and (before is None or n > before):
            before = n
        elif n > segno and (after is None or n < after):
            after = n
    if before is None or after is None:
        return None
    return (
        f"WAL segment {name} is missing from the archive but later segments of timeline "
        f"{tli} are archived (gap from {names.segment_name(tli, before + 1, segment_size)} "
        f"to {names.segment_name(tli, after - 1, segment_size)}): recovery cannot continue "
        "past this point; restore to a target before the gap"
    )


def _read_name(path: Path) -> tuple[str, int] | None:
    """(WAL file name, mtime in ns) from a ``want``/``took`` file, None if none. The
    restore_command shortcut writes ``took`` with a plain shell redirection, so a
    half-written name can be seen: it counts as none (the next read gets all of it)."""
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read().strip()
        names.kind(text)
    except (OSError, names.WalNameError):
        return None
    return text, st.st_mtime_ns


def _read_want(spool: FetchSpool) -> str:
    found = _read_name(spool.want)
    return found[0] if found else ""


def run_fetcher(cfg: WalConfig, pg_wal: Path) -> int:
    """The detached fetcher process (``strongroom-wal fetch-worker``)."""
    spool = FetchSpool.for_config(cfg, pg_wal)

    def work() -> None:
        Fetcher(cfg, spool).run(cfg.fetch_linger_s)

    def failed(exc: Exception, message: str) -> int:
        """The fetcher cannot start (no repository, no key): tell the waiting file."""
        want = _read_want(spool)
        if want:
            spooling.write_marker(spool.err / want, {"error": message, "at": time.time()})
        return EXIT_FATAL

    def empty_cache() -> None:
        for entry in os.listdir(spool.seg):  # nothing cached outlives the fetcher
            with contextlib.suppress(OSError):
                (spool.seg / entry).unlink()

    return spooling.run_worker(spool, work, failed, cleanup=empty_cache)


def _spawn_fetcher(cfg: WalConfig, spool: FetchSpool) -> subprocess.Popen[bytes]:
    return spooling.spawn_worker(spool, cfg.path, "fetch-worker")


def _fetch_sync(cfg: WalConfig, name: str, dest: Path) -> tuple[int, str]:
    from strongroom.engines.postgres.wal.store import fetch_to_file
    from strongroom.errors import NotFound, StrongroomError
    from strongroom.redact import register, scrub

    try:
        repo_config = cfg.repository_config()
        identities = [
            i.get_secret_value() for i in cfg.encryption_config(need_identity=True).identities
        ]
        register(*repo_config.secrets(), *identities)
        from strongroom.repository import open_repository

        repo = open_repository(repo_config)
        try:
            fetch_to_file(
                repo,
                cfg.target,
                name,
                identities,
                str(dest),
                segment_size=cfg.segment_size,
                system_identifier=cfg.system_identifier,
            )
        except NotFound:
            from strongroom.engines.postgres.wal.store import wal_prefix

            listing = {i.key.rsplit("/", 1)[-1] for i in repo.list(wal_prefix(cfg.target))}
            gap = gap_around(name, listing, cfg.segment_size)
            if gap is not None:
                return EXIT_FATAL, gap
            return EXIT_NOT_FOUND, f"{name} is not in the archive"
    except StrongroomError as exc:
        return EXIT_FATAL, scrub(str(exc))
    return EXIT_OK, ""


def wal_fetch(cfg: WalConfig, name: str, dest_path: str) -> tuple[int, str]:
    """Restore WAL file ``name`` (PostgreSQL's %f) to ``dest_path`` (%p)."""
    try:
        names.kind(name)
    except names.WalNameError as exc:
        return EXIT_FATAL, str(exc)
    dest = Path(dest_path).absolute()
    if cfg.fetch_prefetch == 0:
        return _fetch_sync(cfg, name, dest)
    spool = FetchSpool.for_config(cfg, dest.parent)
    cached = spool.seg / name
    with contextlib.suppress(FileNotFoundError):
        _place(cached, dest)
        spooling.write_atomic(spool.took, name.encode())  # the fetcher moves its window on
        return EXIT_OK, ""
    spool.ensure()
    error = spooling.take_marker(spool.err / name)
    if error is not None:
        return EXIT_FATAL, str(error.get("error", "fetch failed"))
    asked = time.time()
    spooling.write_atomic(spool.want, name.encode())

    def answer() -> tuple[int, str] | None:
        with contextlib.suppress(FileNotFoundError):
            _place(cached, dest)
            spooling.write_atomic(spool.took, name.encode())
            return EXIT_OK, ""
        error = spooling.take_marker(spool.err / name)
        if error is not None:
            return EXIT_FATAL, str(error.get("error", "fetch failed"))
        miss = spooling.take_marker(spool.miss / name)
        if miss is not None and float(str(miss.get("at", 0))) >= asked:
            return EXIT_NOT_FOUND, f"{name} is not in the archive"
        # (an older "miss" answered an earlier request: the fetcher looks again)
        return None

    found = spooling.await_worker(spool, answer, lambda: _spawn_fetcher(cfg, spool))
    if found is not None:
        return found
    if spooling.lock_held(spool.lock):
        return EXIT_FATAL, f"timed out waiting for the fetcher to restore {name}"
    return _fetch_sync(cfg, name, dest)
