"""A restore's bounded pool of loads: every artifact (a table, or one partition of a
partitioned table) streamed into its staging table on its own HTTP connection, at most
``jobs`` at once, and each table's fingerprint check run as soon as its last artifact
is in.

Why parallel: the server turns each INSERT into parts in one thread, and writes a part
only once its block is complete, so a single stream leaves cores idle (on 2 cores a
sequential restore of 1 GB spent a third of its time waiting for the server to finish
the last block of each artifact). Loads of different tables, and of different
partitions of one MergeTree table, are independent: each INSERT makes its own parts.

On the first failure no further load starts, the running ones are cut off (their
staging tables are dropped by the rollback: nothing is visible before the swap) and
the error is raised once every thread has stopped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from strongroom.errors import StrongroomError

MAX_JOBS = 64
DEFAULT_MAX = 8


def default_jobs() -> int:
    """The default number of parallel loads: the cores this process may use, at least 2
    (the server builds parts while the restore decrypts the next stream), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(2, min(DEFAULT_MAX, cores))


class Cancelled(StrongroomError):
    """A load stopped because another one failed (never the error that is reported)."""


class StopAware:
    """A sink that refuses further bytes once ``stop`` is set, so a load in flight ends
    promptly when another failed."""

    def __init__(self, sink: Any, stop: threading.Event) -> None:
        self._sink = sink
        self._stop = stop

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._stop.is_set():
            raise Cancelled("load stopped: another load of this restore failed")
        return int(self._sink.write(data))


@dataclass
class Staged:
    """One staging table: the artifacts to load into it and the check to run after."""

    artifacts: list[Any]  # catalog Artifacts (their raw_size orders the work)
    check: Callable[[], None]
    left: int = field(default=0, init=False)


def load_all(
    tables: Sequence[Staged], jobs: int, load: Callable[[Any, threading.Event], None]
) -> None:
    """Run ``load(artifact, stop)`` for every artifact of ``tables``, the largest first,
    ``jobs`` at a time; a table's ``check`` runs in the thread that loaded its last
    artifact. Raises the first real error (not a ``Cancelled`` that followed it)."""
    lock = threading.Lock()
    stop = threading.Event()
    work = [(t, a) for t in tables for a in t.artifacts]
    work.sort(key=lambda item: -int(item[1].raw_size or 0))
    for table in tables:
        table.left = len(table.artifacts)
    errors: list[BaseException] = []

    def one(table: Staged, artifact: Any) -> None:
        if stop.is_set():
            return
        try:
            load(artifact, stop)
            with lock:
                table.left -= 1
                last = table.left == 0
            if last:
                table.check()
        except BaseException as exc:
            with lock:
                errors.append(exc)
            stop.set()
            raise

    empty = [t for t in tables if not t.artifacts]
    if jobs <= 1:
        for table, artifact in work:
            one(table, artifact)
    else:
        pool = ThreadPoolExecutor(
            max_workers=min(jobs, max(1, len(work))), thread_name_prefix="ch-load"
        )
        try:
            futures = [pool.submit(one, t, a) for t, a in work]
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            stop.set()  # interrupted: running loads stop at their next write
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if errors:
            real = [e for e in errors if not isinstance(e, Cancelled)]
            raise (real or errors)[0]
    for table in empty:
        table.check()
