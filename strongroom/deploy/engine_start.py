"""The flow-run command of strongroom's process work pools (``python -m ...engine_start``).

A process worker starts one process per flow run; a fresh ``python -m prefect.engine``
spends seconds importing Prefect and the flows before the run begins. When a warm
starter runs next to the worker (strongroom.deploy.warm: an interpreter that has
imported them once) and ``STRONGROOM_WARM_SOCKET`` names its socket, this command asks
it to fork a ready process for the run instead: it hands over its stdin, stdout and
stderr, its environment and working directory, forwards SIGTERM/SIGINT to the forked
run and exits with its exit code. Without a warm starter (no variable, no socket, a
refused request) it becomes ``python -m prefect.engine`` itself (exec), as if it were
not there.

Imports nothing but the standard library: it is on the path of every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from typing import NoReturn

SOCKET_ENV = "STRONGROOM_WARM_SOCKET"


def _engine(argv: list[str]) -> NoReturn:
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *argv])  # noqa: S606


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def exit_code(status: int) -> int:
    """A wait status as a shell would report it (128 + N when killed by signal N)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    path = os.environ.get(SOCKET_ENV)
    if not path:
        _engine(argv)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)})
        payload = request.encode()
        socket.send_fds(sock, [len(payload).to_bytes(4, "big")], [0, 1, 2])
        sock.sendall(payload)
        pid = int.from_bytes(_read_exact(sock, 8) or b"\0", "big")
    except OSError:
        pid = 0
    if pid <= 0:  # no warm starter, or it could not fork: start the engine the usual way
        sock.close()
        _engine(argv)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    status = _read_exact(sock, 4)
    if len(status) != 4:
        print("strongroom warm starter went away during the run", file=sys.stderr)
        return 1
    return exit_code(int.from_bytes(status, "big", signed=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
