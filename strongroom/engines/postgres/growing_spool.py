"""A local file that one thread writes while others read it from the start as it grows.

A parallel restore needs every ``pg_restore`` to read the archive at its own pace:
one pass over the artifact (hash, decrypt, decompress, checksums) writes its plaintext
here, and each follower copies the file into its own ``pg_restore``'s stdin, waiting
at the end for more until the writer finishes. Followers far ahead never block the
writer and a slow one never holds the others back (the file, in the page cache, is
the buffer), so tables load in parallel from a single read of the repository. Once
complete and verified, the file itself is an ordinary seekable archive for
``pg_restore -j``.

Followers see only what was published: the writer publishes what it has written
each time the stored chunks it came from matched the signed manifest
(``read_artifact``'s ``on_verified``) and everything at ``finish``, so no byte a
backup did not write ever reaches a ``pg_restore``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import IO

CHUNK = 1024 * 1024


class SpoolAborted(Exception):
    """The restore gave up: the writer stops at its next write."""


class GrowingSpool:
    """Written through ``write`` (a pipeline sink), published through ``publish`` and
    ``finish``, followed through ``follow``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._size = 0
        self._visible = 0
        self._done = False
        self._aborted = False
        self._cond = threading.Condition()

    def publish(self) -> None:
        """Everything written so far is verified: followers may read it."""
        with self._cond:
            self._visible = self._size
            self._cond.notify_all()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._aborted:
            raise SpoolAborted("restore aborted")
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(self._fd, view[written:])
        with self._cond:
            self._size += written
        return written

    def finish(self) -> None:
        """Every byte is written (and the caller has checked them): followers may end."""
        self._close()
        with self._cond:
            self._visible = self._size
            self._done = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Stop the writer and every follower; what was written is never used."""
        self._close()
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def _close(self) -> None:
        with self._cond:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def follow(self, pipe: IO[bytes]) -> None:
        """Copy the file into ``pipe`` from its start until the reader stops reading or
        the file is complete; the pipe is closed either way (an abort closes it early,
        so the reader sees a truncated archive and fails)."""
        try:
            with self.path.open("rb", buffering=0) as source:
                position = 0
                while True:
                    with self._cond:
                        while self._visible == position and not (self._done or self._aborted):
                            self._cond.wait()
                        if self._aborted or (self._done and self._visible == position):
                            return
                        size = self._visible
                    while position < size:
                        position += _copy(source, pipe, position, min(CHUNK, size - position))
        except BrokenPipeError:
            return  # the reader has what it needs
        finally:
            with contextlib.suppress(OSError):
                pipe.close()


def _copy(source: IO[bytes], pipe: IO[bytes], position: int, count: int) -> int:
    """``count`` bytes of ``source`` at ``position`` into ``pipe``: in the kernel
    (``sendfile``, no copy through Python) when the pipe has a descriptor."""
    try:
        out = pipe.fileno()
    except (AttributeError, OSError, ValueError):
        out = -1
    if out >= 0:
        sent = os.sendfile(out, source.fileno(), position, count)
    else:
        source.seek(position)
        data = source.read(count)
        view = memoryview(data)
        while view:
            written = pipe.write(view)
            view = view[written if written is not None else len(view) :]
        sent = len(data)
    if sent <= 0:
        raise OSError(f"spool {Path(source.name).name} shrank while being read")
    return sent
