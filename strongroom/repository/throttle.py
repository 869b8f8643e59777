"""Bandwidth limit of a repository (``max_bytes_per_second``): backups and copies that
share a link with production traffic must not fill it.

One ``RateLimit`` per repository object, shared by every reader and writer it opens
(parallel uploads share the budget): a token bucket with a quarter-second burst. The
limit applies to the bytes stored or read (after compression and encryption), where
the link is. The clock and sleep are injectable so tests check the schedule without
timing anything.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from strongroom.repository.base import ObjectWriter


class RateLimit:
    """At most ``bytes_per_second`` on average, bursts of ``burst_s`` seconds' worth."""

    def __init__(
        self,
        bytes_per_second: int,
        *,
        burst_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self.bytes_per_second = bytes_per_second
        self._burst_s = burst_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._free_at = clock() - burst_s  # when the bytes taken so far are paid for

    def take(self, n: int) -> None:
        """Account for ``n`` bytes; sleeps until they fit the rate."""
        if n <= 0:
            return
        with self._lock:
            now = self._clock()
            self._free_at = max(self._free_at, now - self._burst_s) + n / self.bytes_per_second
            wait = self._free_at - now
        if wait > 0:
            self._sleep(wait)


class ThrottledWriter(ObjectWriter):
    """An ObjectWriter whose writes pass through a RateLimit."""

    def __init__(self, inner: ObjectWriter, limit: RateLimit) -> None:
        self._inner = inner
        self._limit = limit

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._limit.take(memoryview(data).nbytes)
        return self._inner.write(data)

    def commit(self) -> int:
        return self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()


class _ThrottledRaw(io.RawIOBase):
    def __init__(self, inner: BinaryIO, limit: RateLimit) -> None:
        self._inner = inner
        self._limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._limit.take(n)
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def throttled_reader(inner: BinaryIO, limit: RateLimit) -> BinaryIO:
    """``inner`` read through ``limit`` (buffered, 1 MiB)."""
    return io.BufferedReader(_ThrottledRaw(inner, limit), buffer_size=1024 * 1024)
