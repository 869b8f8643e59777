"""Running external database tools (pg_dump, pg_restore, psql, ...) safely.

Passwords go through the environment, never argv. stderr is collected in a
bounded buffer by a thread (so a chatty tool cannot block or grow memory) and
scrubbed of secrets before it appears in any error.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import queue
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import IO

from strongroom.errors import AccessDenied, ServiceUnavailable, ToolFailed
from strongroom.redact import scrub

STDERR_KEEP = 64 * 1024


def tool_path(name: str, search: Sequence[str] = ()) -> str:
    """Find a tool on PATH or in extra folders (e.g. /usr/lib/postgresql/15/bin)."""
    for folder in search:
        found = shutil.which(name, path=folder)
        if found:
            return found
    found = shutil.which(name)
    if not found:
        raise ToolFailed(f"{name} is not installed (not on PATH)")
    return found


F_SETPIPE_SZ = 1031  # Linux fcntl: pipe capacity
PIPE_SIZE = 1024 * 1024


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe lets the tool run ahead while we compress (Linux; best effort)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


READ_AHEAD_CHUNKS = 8


class ReadAhead(io.RawIOBase):
    """Reads a tool's pipe in a thread, up to ``depth`` 1 MiB chunks ahead of the consumer.

    The tool then never waits while a chunk is hashed, compressed and encrypted: with
    only the pipe's 1 MiB between them, every burst of work on our side stalled the
    tool. Memory stays bounded (``depth`` chunks); ``os.read`` releases the GIL.
    """

    def __init__(self, stream: IO[bytes], depth: int = READ_AHEAD_CHUNKS) -> None:
        super().__init__()
        self._fd = stream.fileno()
        self._chunks: queue.Queue[bytes | bytearray | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._item: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = bytearray(PIPE_SIZE)
                view, filled = memoryview(chunk), 0
                while filled < PIPE_SIZE:
                    n = os.readv(self._fd, [view[filled:]])
                    if n == 0:
                        break
                    filled += n
                view.release()
                if filled:
                    # a full chunk goes on as it is (no copy); consumers only read it
                    self._put(chunk if filled == PIPE_SIZE else chunk[:filled])
                if filled < PIPE_SIZE:
                    self._put(b"")
                    return
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: bytes | bytearray | BaseException) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._chunks.put(item, timeout=0.2)
                return

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes | bytearray:
        if self._pos >= len(self._item):
            if self._eof:
                return b""
            item = self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._eof = True
                return b""
            self._item, self._pos = item, 0
        left = len(self._item) - self._pos
        size = left if n is None or n < 0 else min(n, left)
        if self._pos == 0 and size == len(self._item):
            data = self._item  # the usual case: a whole chunk, no copy
        else:
            data = self._item[self._pos : self._pos + size]
        self._pos += size
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stop.set()
        super().close()


# (tool name, what it was doing, exit code, scrubbed stderr) -> the error to raise
Classifier = Callable[[str, str, int, str], Exception]


class Tool:
    """A running tool with a bounded, scrubbed stderr tail; ``check`` raises the error
    ``classify`` makes of a non-zero exit (PostgreSQL tools' by default)."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        stdin: int | IO[bytes] | None = None,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        pass_fds: Sequence[int] = (),
        classify: Classifier | None = None,
    ) -> None:
        self.name = argv[0].rsplit("/", 1)[-1]
        self._classify = classify or classify_failure
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            bufsize=0,
            pass_fds=pass_fds,
        )
        if stdout == subprocess.PIPE and self.proc.stdout is not None:
            _widen_pipe(self.proc.stdout.fileno())
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            self._tail.append(line)
            self._tail_size += len(line)
            while self._tail_size > STDERR_KEEP and len(self._tail) > 1:
                self._tail_size -= len(self._tail.popleft())

    @property
    def stderr(self) -> str:
        self._reader.join(timeout=5)
        return scrub(b"".join(self._tail).decode("utf-8", "replace")).strip()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)

    def check(self, what: str) -> None:
        """Raise a classified error if the tool failed."""
        code = self.wait()
        if code == 0:
            return
        raise self._classify(self.name, what, code, self.stderr)


def classify_failure(tool: str, what: str, code: int, stderr: str) -> Exception:
    text = stderr.lower()
    last = stderr.strip().splitlines()[-3:] if stderr.strip() else []
    detail = " | ".join(last) or f"exit code {code}"
    if "password authentication failed" in text or "no password supplied" in text:
        return AccessDenied(f"{what}: the server refused the credentials ({tool}: {detail})")
    transient = (
        "could not connect",
        "connection refused",
        "timeout expired",
        "server closed the connection unexpectedly",
        "terminating connection due to administrator command",
    )
    if any(phrase in text for phrase in transient):
        return ServiceUnavailable(f"{what}: server unreachable ({tool}: {detail})")
    return ToolFailed(f"{what}: {tool} failed with exit code {code}: {detail}")
